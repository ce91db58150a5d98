"""Raw rows of one card -> canonical rows with their token lengths, a batch at a time (a `datasets.map` function).

Every input row comes out as its canonical rows or as one record per drop (its reason), each carrying where the
input row came from (`line 7`), so the data report names the same lines as a row-by-row pass would. Token
lengths are measured for a whole batch in one `apply_chat_template` call: the same ids as row by row, without
the per-call overhead, and the map spreads batches over processes.
"""

from __future__ import annotations

import array
import hashlib
import json
from typing import TYPE_CHECKING, Any

from rlhf_pipeline.data import formats
from rlhf_pipeline.data.cards import DataCard
from rlhf_pipeline.data.lengths import LengthMeter
from rlhf_pipeline.data.reading import RAW, WHERE, Renamer, parse_record

if TYPE_CHECKING:
    from datasets import Dataset, Features
    from transformers import PreTrainedTokenizerBase

# Columns the loader keeps beside the canonical ones while it works (removed before a trainer sees the rows)
SOURCE_WHERE, DROP, PROMPT, LENGTH = "_where", "_drop", "_prompt", "_length"
HELPER_COLUMNS = (SOURCE_WHERE, DROP, PROMPT, LENGTH)


def prompt_key(prompt: list[dict[str, str]]) -> str:
    """One string per distinct chat prompt, the whole conversation answered (system turn included): what makes
    two rows "the same prompt", and what right answers are looked up by."""
    return json.dumps(prompt, sort_keys=True)


def prompt_hash(row: dict[str, Any]) -> str:
    """`prompt_key` of a row's prompt in 32 hex digits: what the tables store to group, split and compare rows by
    prompt."""
    return hashlib.blake2b(prompt_key(row["prompt"]).encode(), digest_size=16).hexdigest()


def column(rows: Dataset, name: str) -> list[Any]:
    """One column of a table as a list, read through Arrow (fast for hundreds of thousands of rows)."""
    return rows.with_format("arrow")[name].to_pylist()


def take(rows: Dataset, indices: list[int]) -> Dataset:
    """`rows.select(indices)`, fingerprinted by the indices' bytes: `datasets` would pickle the list to hash it,
    seconds for a few hundred thousand rows."""
    digest = hashlib.blake2b(rows._fingerprint.encode(), digest_size=16)
    digest.update(array.array("q", indices).tobytes())
    return rows.select(indices, new_fingerprint=digest.hexdigest())


def convert_card_rows(card: DataCard, rows: list[dict[str, Any]], system_prompt: str | None) -> formats.Converted:
    """Convert with the card's own format."""
    if card.format in formats.SFT_FORMATS:
        return formats.to_sft(rows, card.format, system_prompt=system_prompt)
    if card.format in formats.PREFERENCE_FORMATS:
        return formats.to_preference(rows, card.format, margin_key="margin" if card.margin_column else None,
                                     system_prompt=system_prompt, first_preferred_when=card.first_preferred_when,
                                     answer_key=card.completion_answer_key, score_key=card.completion_score_key)
    if card.format in formats.LABELLED_FORMATS:
        return formats.to_labelled(rows, card.format, system_prompt=system_prompt)
    if card.format in formats.CLASSIFICATION_FORMATS:
        return formats.to_classified(rows, bool(card.violation_when), card.format, system_prompt=system_prompt)
    if card.format in formats.STEPWISE_FORMATS:
        return formats.to_stepwise(rows, card.format, card.good_ratings, system_prompt=system_prompt)
    return formats.to_prompts(rows, card.format, system_prompt=system_prompt)


def canonical_columns(card: DataCard, prompts_only: bool, unpaired: bool = False) -> dict[str, str]:
    """The canonical columns of a card's rows as a stage gets them: a stage that samples answers gets the prompts
    (with their references, the right answers an outcome check needs, when the card is a prompt set)."""
    if prompts_only:
        return {"prompt": "messages"} | ({"reference": "string"} if card.format in formats.PROMPT_FORMATS else {})
    if unpaired:
        return formats.output_columns(next(iter(formats.LABELLED_FORMATS)))
    return formats.output_columns(card.format, with_margin=bool(card.margin_column))


def table_features(columns: dict[str, str], helpers: bool = True) -> Features:
    """The Arrow schema of a card's table: the canonical columns, and (`helpers`) the loader's own."""
    from datasets import Features, List, Value

    types = {"messages": List({"role": Value("string"), "content": Value("string")}), "float": Value("float64"),
             "bool": Value("bool"), "int": Value("int64"), "string": Value("string"),
             "strings": List(Value("string")), "floats": List(Value("float64"))}
    own = {SOURCE_WHERE: Value("string"), DROP: Value("string"), PROMPT: Value("string"), LENGTH: Value("int64")}
    return Features((own if helpers else {}) | {name: types[kind] for name, kind in columns.items()})


class Converter:
    """The batched map function for one card: raw rows in, canonical rows and drop records out.

    An instance holds only picklable settings (the card, the tokenizer), so `datasets` can run it in several
    processes. Without a tokenizer the lengths are left for later (KTO measures answers after unpairing).
    """

    def __init__(self, card: DataCard, system_prompt: str | None, prompts_only: bool,
                 tokenizer: PreTrainedTokenizerBase | None, json_rows: bool) -> None:
        self.card, self.system_prompt, self.prompts_only = card, system_prompt, prompts_only
        self.measure = LengthMeter(tokenizer) if tokenizer is not None else None
        self.json_rows = json_rows
        self.rename = Renamer(card)
        self.columns = list(canonical_columns(card, prompts_only))

    def rows_of(self, batch: dict[str, list[Any]], indices: list[int]) -> list[tuple[str, dict[str, Any] | str]]:
        """(where, row or the reason it is unreadable) for each input row of the batch."""
        if self.json_rows:
            return [(where, parse_record(raw)) for where, raw in zip(batch[WHERE], batch[RAW], strict=True)]
        names = list(batch)
        return [(f"row {index + 1}", {name: batch[name][position] for name in names})
                for position, index in enumerate(indices)]

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        records: list[tuple[str, str | None, dict[str, Any] | None]] = []  # (where, drop reason, canonical row)
        for where, row in self.rows_of(batch, indices):
            if isinstance(row, str):
                records.append((where, row, None))
                continue
            converted = convert_card_rows(self.card, [self.rename(row)], self.system_prompt)
            records.extend((where, reason, None) for reason, count in converted.dropped.items() for _ in range(count))
            records.extend((where, None, {name: canonical.get(name) for name in self.columns} if self.prompts_only
                            else canonical) for canonical in converted.rows)
        return self.table(records)

    def table(self, records: list[tuple[str, str | None, dict[str, Any] | None]]) -> dict[str, list[Any]]:
        kept = [row for _, _, row in records if row is not None]
        lengths = iter(self.measure(kept) if self.measure is not None else [None] * len(kept))
        out: dict[str, list[Any]] = {SOURCE_WHERE: [], DROP: [], PROMPT: [], LENGTH: []} | {
            name: [] for name in self.columns}
        for where, reason, row in records:
            out[SOURCE_WHERE].append(where)
            out[DROP].append(reason)
            out[PROMPT].append(prompt_hash(row) if row is not None else None)
            out[LENGTH].append(next(lengths) if row is not None else None)
            for name in self.columns:
                out[name].append(row.get(name) if row is not None else None)
        return out


class Measure:
    """A batched map function adding `_length` to canonical rows that have none yet (KTO's unpaired answers)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, columns: list[str]) -> None:
        self.measure, self.columns = LengthMeter(tokenizer), columns

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        rows = [dict(zip(self.columns, values, strict=True)) for values in zip(*(batch[c] for c in self.columns),
                                                                               strict=True)]
        return {LENGTH: self.measure(rows)}
