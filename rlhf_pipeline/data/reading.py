"""A card's raw rows, each with where it came from, so every later drop can name its line.

Local JSON/JSONL files (plain or compressed) are read line by line: a malformed line is a counted drop named
by its number (`line 7`, `item 3` of a JSON array), never the end of the whole file. CSV and Parquet go
through `datasets`, Hub ids through `datasets.load_dataset` with the card's revision and split (`row 12`).
The loader turns the raw rows into canonical ones in `conversion`; `read_card_rows` gives them as Python
rows for small jobs (tests, benchmarks).
"""

from __future__ import annotations

import codecs
import collections
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_pipeline.data import formats
from rlhf_pipeline.data.cards import DataCard, file_suffixes, open_local
from rlhf_pipeline.errors import RecipeError

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset

RAW, WHERE = "raw", "where"  # the columns of a JSON card's raw table: the line's bytes, and `line 7`
_PEEK = 1 << 16  # bytes read to tell a JSON array from JSON lines


def is_json_card(card: DataCard) -> bool:
    path = card.local_path()
    return path is not None and file_suffixes(path)[0] in (".json", ".jsonl")


def _json_array(path: Path) -> bool:
    """A `.json` file holding one array (else JSON lines, whatever the suffix says)."""
    if file_suffixes(path)[0] != ".json":
        return False
    with open_local(path) as handle:
        return handle.read(_PEEK).removeprefix(codecs.BOM_UTF8).lstrip().startswith(b"[")


def json_records(path: str) -> Iterator[dict[str, Any]]:
    """{where, raw} for every non-blank line of a JSONL file, or every item of a JSON array.

    Lines are split at b"\\n" only, so line numbers are those an editor shows; a UTF-8 byte order mark (Windows
    editors) is skipped.
    """
    local = Path(path)
    if _json_array(local):
        with open_local(local) as handle:
            text = handle.read().removeprefix(codecs.BOM_UTF8)
        try:
            items = json.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RecipeError(local, None, f"not a valid JSON array ({err}); fix the file or use JSONL") from None
        for number, item in enumerate(items, start=1):
            yield {WHERE: f"item {number}", RAW: json.dumps(item).encode()}
        return
    with open_local(local) as handle:
        for number, line in enumerate(handle, start=1):
            if number == 1:
                line = line.removeprefix(codecs.BOM_UTF8)
            if line.strip():
                yield {WHERE: f"line {number}", RAW: line.rstrip(b"\n")}


def parse_record(raw: bytes) -> dict[str, Any] | str:
    """One JSON line as a row, or the reason it cannot be one."""
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return "not_utf8"
    except (json.JSONDecodeError, RecursionError):
        return "malformed_json"
    return row if isinstance(row, dict) else "not_an_object"


def table_dataset(card: DataCard, streaming: bool = False) -> Dataset | IterableDataset:
    """A CSV/Parquet card's file or a Hub card's split through `datasets`."""
    from datasets import load_dataset

    path = card.local_path()
    if path is not None:
        return load_dataset(file_suffixes(path)[0].lstrip("."), data_files=str(path), split="train",
                            streaming=streaming)
    try:
        return load_dataset(card.source.hub_id, card.source.subset, revision=card.source.revision,
                            split=card.source.split, streaming=streaming)
    except ConnectionError as err:  # offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) or no network
        raise RecipeError(card.file, "source.hub_id", f"cannot reach '{card.source.hub_id}' on the Hub and "
                          f"it is not in the local cache ({err}); run once online (without "
                          "HF_HUB_OFFLINE=1) to cache it, or point source.path at a local copy") from None


REQUIRED = {
    "messages": {"messages"},
    "prompt_completion": {"prompt", "completion"},
    "prompt_chosen_rejected": {"prompt", "chosen", "rejected"},
    "chosen_rejected_messages": {"chosen", "rejected"},
    "hh_transcript": {"chosen", "rejected"},
    "ranking": {"prompt"},
    "pair_with_label": {"prompt", "answer_a", "answer_b", "label"},
    "nested_completions": {"prompt", "completions"},
    "prompt_only": {"prompt"},
    "prompt_completion_label": {"prompt", "completion", "label"},
    "classification": {"prompt", "answer", "label"},
    "stepwise": {"prompt", "steps", "labels"},
    "prm800k": {"question", "label"},
    "math_shepherd": {"input", "label"},
}


class Renamer:
    """The card's file columns renamed to the format's canonical names (a listed column: one per answer)."""

    def __init__(self, card: DataCard) -> None:
        columns = {name: card.column(name) for name in sorted(formats.CANONICAL_COLUMNS[card.format])}
        self.card = card
        self.listed = {name: column for name, column in columns.items() if isinstance(column, list)}
        self.mapping = {column: name for name, column in columns.items() if isinstance(column, str)}
        if card.margin_column:
            self.mapping[card.margin_column] = "margin"

    def check(self, rows: list[dict[str, Any]]) -> None:
        """Fail before any conversion when a required column is missing from the first rows."""
        if not rows:
            return
        present = set().union(*(row.keys() for row in rows))
        wanted = [*self.mapping.items(), *((column, name) for name, names in self.listed.items() for column in names)]
        for file_column, canonical in wanted:
            if canonical in REQUIRED[self.card.format] and file_column not in present:
                where = self.card.local_path() or self.card.source.hub_id
                raise RecipeError(self.card.file, f"columns.{canonical}", f"column '{file_column}' not found in "
                                  f"{where}; its columns are: {', '.join(sorted(present))}")

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        return {self.mapping.get(k, k): v for k, v in row.items()} | {
            name: [row.get(column) for column in names] for name, names in self.listed.items()}


def first_rows(card: DataCard, count: int = 100) -> list[dict[str, Any]]:
    """The first readable rows of a card, to check its columns before the whole card is converted or streamed."""
    if is_json_card(card):
        rows = []
        for record in json_records(str(card.local_path())):
            row = parse_record(record[RAW])
            if isinstance(row, dict):
                rows.append(row)
            if len(rows) == count:
                break
        return rows
    return list(table_dataset(card, streaming=card.source.hub_id is None).take(count))


def read_card_rows(card: DataCard) -> tuple[list[dict[str, Any]], collections.Counter[str], dict[str, list]]:
    """All rows of a card with columns renamed to canonical names; unreadable rows counted, not raised."""
    rename = Renamer(card)
    dropped: collections.Counter[str] = collections.Counter()
    where: dict[str, list[str]] = {}
    if is_json_card(card):
        rows = []
        for record in json_records(str(card.local_path())):
            row = parse_record(record[RAW])
            if isinstance(row, str):
                dropped[row] += 1
                where.setdefault(row, []).append(record[WHERE])
            else:
                rows.append(row)
    else:
        rows = table_dataset(card).to_list()
    rename.check(rows[:100])
    return [rename(row) for row in rows], dropped, {reason: lines[:5] for reason, lines in where.items()}
