"""A card converted once per tokenizer and settings, kept on disk, read back memory-mapped by every later load.

Where: `$RLHF_PIPELINE_DATA_CACHE`, else `data/` in the pipeline's cache (`$RLHF_PIPELINE_CACHE`, default
`~/.cache/rlhf_pipeline`). One folder per card and key, `<card>-<key>/`: `rows/` (the kept canonical rows with
where each came from, its prompt hash and its token length; `datasets.save_to_disk`, so the trainers' own
tokenisation caches land beside it) and `card.json` (rows read, drops by reason with their first lines).
Deleting the folder, or all of `data/`, is always safe: the next load converts again.

The key covers everything that changes the result: the data file's bytes (sha256) or the Hub dataset's
fingerprint (its revision and files), the card's loading settings (format, columns, ...), `data.system_prompt`,
`data.unpair`, whether only prompts are kept, the tokenizer (vocabulary, normaliser, chat template, special
tokens) and the conversion code itself. `data.max_length` is not in it: rows keep their length and the limit
is applied when they are read. A folder is written beside its final name and renamed into place when
complete, so a reader sees a whole entry or none; when two processes convert a card at once (two runs, two
nodes on one file system) the entry placed first stays, as the other may already be reading it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_pipeline.data import formats
from rlhf_pipeline.data.cards import DataCard, DataSpec
from rlhf_pipeline.data.conversion import (
    DROP,
    LENGTH,
    PROMPT,
    SOURCE_WHERE,
    Converter,
    Measure,
    canonical_columns,
    column,
    prompt_hash,
    table_features,
    take,
)
from rlhf_pipeline.data.reading import RAW, WHERE, Renamer, first_rows, is_json_card, json_records, table_dataset
from rlhf_pipeline.embedded import cache_root
from rlhf_pipeline.outputs import file_sha256, new_folder, write_json

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

FIRST_BAD = 5  # line labels kept per drop reason: enough to find the pattern, never the whole file
ROWS_PER_PROCESS = 20_000  # below this a card converts in one process (starting workers costs more than it saves)
_DOCUMENTATION = {"name", "description", "license", "stages", "size", "language", "known_issues", "file"}


def data_cache() -> Path:
    """The folder holding converted cards."""
    env = os.environ.get("RLHF_PIPELINE_DATA_CACHE")
    return Path(env).expanduser() if env else cache_root() / "data"


@dataclass
class Drops:
    """Dropped rows counted by reason, with the first few lines of each."""

    counts: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    where: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def add(self, reason: str, where: str, once_per_row: bool = True) -> None:
        """Count one drop; a row dropped several times for one reason (pairs of a ranking) is named once."""
        self.counts[reason] += 1
        lines = self.where.setdefault(reason, [])
        if len(lines) < FIRST_BAD and not (once_per_row and lines and lines[-1] == where):
            lines.append(where)


@dataclass
class CardTable:
    """A card's usable canonical rows (before the length limit) and what reading it dropped."""

    rows: Dataset
    read: int
    drops: Drops
    built: bool  # converted by this call; False when read from the cache


def processes(data: DataSpec, rows: int) -> int | None:
    """`data.num_proc`, else one process per idle CPU, for cards big enough to gain from it; None for one
    (`datasets` runs even `num_proc=1` in a worker process).

    On a 2-core machine busy with other jobs two workers took 1.8x longer than one (benchmarks/data_loading.py):
    they share one core and still pay for starting and merging.
    """
    if data.num_proc is not None:
        count = data.num_proc
    else:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        count = min(cpus, rows // ROWS_PER_PROCESS)
        if count > 1:  # worth the quarter second of looking
            count = min(count, round(cpus - _busy_cpus()))
    return count if count > 1 else None


def _busy_cpus(window: float = 0.25) -> float:
    """How many of this process's CPUs other work keeps busy now (this process sleeps meanwhile): from their
    /proc/stat lines over `window` seconds, else the 1-minute load average less this process (which lags a
    minute behind a job that just ended)."""
    mine = {f"cpu{index}" for index in os.sched_getaffinity(0)} if hasattr(os, "sched_getaffinity") else set()

    def ticks() -> tuple[int, int]:
        busy = total = 0
        for line in Path("/proc/stat").read_text().splitlines():
            name, *values = line.split()
            if name in mine:
                fields = [int(value) for value in values]
                busy, total = busy + sum(fields) - fields[3] - fields[4], total + sum(fields)  # less idle, iowait
        return busy, total

    try:
        busy, total = ticks()
        time.sleep(window)
        busy_after, total_after = ticks()
    except (OSError, ValueError, IndexError):  # no /proc (not Linux), or a format this does not know
        total = total_after = 0
    if total_after > total:
        return len(mine) * (busy_after - busy) / (total_after - total)
    return max(0.0, os.getloadavg()[0] - 1) if hasattr(os, "getloadavg") else 0.0


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """What decides a row's token length: vocabulary and pipeline, chat template, special tokens, library version."""
    import transformers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [type(tokenizer).__name__, transformers.__version__,
             backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True),
             json.dumps(tokenizer.chat_template, sort_keys=True),
             json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


@functools.cache
def _code_fingerprint() -> str:
    """The data package's own source: a change to how rows convert makes new cache entries."""
    digest = hashlib.sha256()
    for module in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(module.read_bytes())
    return digest.hexdigest()


def _source_fingerprint(card: DataCard, table: Dataset | None) -> str:
    local = card.local_path()
    return f"sha256:{file_sha256(local)}" if local is not None else f"datasets:{table._fingerprint}"


def card_key(card: DataCard, data: DataSpec, tokenizer_id: str, prompts_only: bool, source: str) -> str:
    settings = {name: value for name, value in dataclasses.asdict(card).items() if name not in _DOCUMENTATION}
    settings["source"] = source
    text = json.dumps([_code_fingerprint(), settings, data.system_prompt, _unpairs(card, data, prompts_only),
                       prompts_only, tokenizer_id], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _unpairs(card: DataCard, data: DataSpec, prompts_only: bool) -> bool:
    return data.unpair and card.format in formats.PREFERENCE_FORMATS and not prompts_only


def card_table(card: DataCard, data: DataSpec, tokenizer: PreTrainedTokenizerBase, tokenizer_id: str,
               prompts_only: bool) -> CardTable:
    """The card's table from the cache, converted and cached first when it is not there yet."""
    from datasets import Dataset

    table = None if card.local_path() is not None else table_dataset(card)
    key = card_key(card, data, tokenizer_id, prompts_only, _source_fingerprint(card, table))
    folder = data_cache() / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', card.name)}-{key}"
    if (folder / "card.json").is_file():
        record = json.loads((folder / "card.json").read_text(encoding="utf-8"))
        logger.info("data: %s read from the cache (%s)", card.name, folder)
        drops = Drops(collections.Counter(record["dropped"]), record["where"])
        return CardTable(Dataset.load_from_disk(str(folder / "rows")), record["read"], drops, built=False)
    if folder.is_dir() and not (folder / "card.json").is_file():  # half deleted by hand (ours are placed whole)
        shutil.rmtree(folder)
    started = time.monotonic()
    with new_folder(folder, keep_existing=True) as scratch:  # another process's entry placed meanwhile is kept
        built = _convert(card, data, tokenizer, prompts_only, table, scratch, key)
        built.rows.save_to_disk(str(scratch / "rows"), num_shards=1 if not len(built.rows) else None)
        write_json(scratch / "card.json", {"card": card.name, "source": str(card.local_path() or card.source.hub_id),
                                           "read": built.read, "dropped": dict(built.drops.counts),
                                           "where": built.drops.where, "rows": len(built.rows)})
        shutil.rmtree(scratch / "work")  # the raw and intermediate tables; the rows were copied out above
    logger.info("data: %s converted (%d rows in %.1f s) and cached in %s", card.name, built.read,
                time.monotonic() - started, folder)
    return CardTable(Dataset.load_from_disk(str(folder / "rows")), built.read, built.drops, built=True)


def _convert(card: DataCard, data: DataSpec, tokenizer: PreTrainedTokenizerBase, prompts_only: bool,
             table: Dataset | None, scratch: Path, key: str) -> CardTable:
    """Read, convert and measure every row of the card (working files in `scratch/work`, removed after)."""
    from datasets import Dataset, Features, Value

    work = scratch / "work"
    json_rows = is_json_card(card)
    if json_rows:
        Renamer(card).check(first_rows(card))
        raw = Dataset.from_generator(json_records, gen_kwargs={"path": str(card.local_path())},
                                     features=Features({WHERE: Value("string"), RAW: Value("binary")}),
                                     cache_dir=str(work / "raw"))
    else:
        raw = table if table is not None else table_dataset(card)
        Renamer(card).check(raw.select(range(min(100, len(raw)))).to_list())
    unpair = _unpairs(card, data, prompts_only)
    converter = Converter(card, data.system_prompt, prompts_only, None if unpair else tokenizer, json_rows)
    converted = raw.map(converter, batched=True, with_indices=True, num_proc=processes(data, len(raw)),
                        remove_columns=raw.column_names, features=table_features(canonical_columns(card, prompts_only)),
                        cache_file_name=str(work / "converted.arrow"), new_fingerprint=f"convert-{key}",
                        desc=f"data: converting {card.name}")
    drops = Drops()
    reasons = converted.data.column(DROP).to_pylist()
    for reason, where in zip(reasons, converted.data.column(SOURCE_WHERE).to_pylist(), strict=True):
        if reason is not None:
            drops.add(reason, where)
    rows = take(converted, [index for index, reason in enumerate(reasons) if reason is None])
    if unpair:
        rows = _unpaired(card, rows, drops, tokenizer, work, key)
    if prompts_only:  # each prompt once, where it first appears
        first: dict[str, int] = {}
        rows = take(rows, [index for index, prompt in enumerate(column(rows, PROMPT))
                           if first.setdefault(prompt, index) == index])
    return CardTable(rows.remove_columns(DROP), len(raw), drops, built=True)


def _unpaired(card: DataCard, pairs: Dataset, drops: Drops, tokenizer: PreTrainedTokenizerBase, work: Path,
              key: str) -> Dataset:
    """KTO: the pairs as labelled single answers (`formats.unpair`), measured; answers with no consistent label
    are dropped and named by the first pair they are in."""
    from datasets import Dataset

    rows = pairs.select_columns(["prompt", "chosen", "rejected", SOURCE_WHERE]).to_list()
    answers, ambiguous = formats.unpair(rows)
    for index in ambiguous:
        drops.add(formats.AMBIGUOUS_ANSWER, rows[index][SOURCE_WHERE], once_per_row=False)
    columns = list(canonical_columns(card, prompts_only=False, unpaired=True))
    records: list[dict[str, Any]] = [answer | {SOURCE_WHERE: rows[index][SOURCE_WHERE], DROP: None,
                                              PROMPT: prompt_hash(answer), LENGTH: None} for index, answer in answers]
    table = Dataset.from_list(records, features=table_features(canonical_columns(card, False, unpaired=True)))
    return table.map(Measure(tokenizer, columns), batched=True, cache_file_name=str(work / "unpaired.arrow"),
                     new_fingerprint=f"unpaired-{key}")
