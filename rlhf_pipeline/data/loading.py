"""From data cards to `datasets` splits in a stage's canonical format, every dropped row counted and named.

Each card converts once per tokenizer and settings into the data cache (`cache`: its canonical rows, where each
came from, its prompt and its token length); under several processes the main process of each node converts
first and the others read what it wrote. Each load then drops the rows over `data.max_length` (naming them),
mixes the train cards (`data.train` entries with a weight, max_rows or fraction: whole prompts, seeded), carves
the eval split by prompt from the mixed training set, and caps what is left with `data.max_samples`.
`data.streaming` (SFT) reads the train cards as they are trained on instead (`streaming`).
"""

from __future__ import annotations

import bisect
import collections
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_pipeline.data import formats
from rlhf_pipeline.data.cache import CardTable, Drops, card_table, tokenizer_fingerprint
from rlhf_pipeline.data.cards import DataCard, TrainSource
from rlhf_pipeline.data.conversion import (
    HELPER_COLUMNS,
    LENGTH,
    PROMPT,
    SOURCE_WHERE,
    column,
    convert_card_rows,
    prompt_key,
    take,
)
from rlhf_pipeline.data.reading import read_card_rows
from rlhf_pipeline.data.report import DataReport
from rlhf_pipeline.data.sampling import capped_size, prompt_groups, sample_indices, split_indices, weighted_sizes
from rlhf_pipeline.errors import PipelineError, RecipeError

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from transformers import PreTrainedTokenizerBase

    from rlhf_pipeline.recipe import Recipe

__all__ = ["DataReport", "answer_key", "cards_of", "convert_card_rows", "load_datasets", "load_rows", "prompt_key",
           "read_card_rows", "sample_prompts", "split_by_prompt"]

logger = logging.getLogger(__name__)


def cards_of(recipe: Recipe, split: str) -> list[DataCard]:
    """The recipe's cards listed under `data.<split>` (train, eval, ptx); a card in eval is not in train."""
    return [card for card, _ in _sources_of(recipe, split)]


def _listed(card: DataCard, refs: list[str]) -> bool:
    names = {Path(ref).stem for ref in refs}
    return card.name in names or card.file.stem in names


def _sources_of(recipe: Recipe, split: str) -> list[tuple[DataCard, TrainSource]]:
    """The cards of `data.<split>`, each with its train entry (how much of it the mixture takes)."""
    entries = recipe.data.sources() if split == "train" else [TrainSource(ref) for ref in recipe.data.refs(split)]
    found: dict[Path, tuple[DataCard, TrainSource]] = {}
    for card in recipe.cards:
        entry = next((entry for entry in entries if _listed(card, [entry.card])), None)
        if entry is not None and not (split == "train" and _listed(card, recipe.data.eval)):
            found.setdefault(card.file, (card, entry))
    return list(found.values())


def _within_length(table: CardTable, max_length: int) -> tuple[Dataset, Drops]:
    """The card's rows that fit `max_length` tokens; the others counted as `too_long` and named."""
    drops = Drops(collections.Counter(table.drops.counts), {reason: list(lines) for reason, lines in
                                                            table.drops.where.items()})
    fits = [length <= max_length for length in column(table.rows, LENGTH)]
    if all(fits):
        return table.rows, drops
    for where, fit in zip(column(table.rows, SOURCE_WHERE), fits, strict=True):
        if not fit:
            drops.add("too_long", where)
    return take(table.rows, [index for index, fit in enumerate(fits) if fit]), drops


def _card_rows(recipe: Recipe, split: str, tokenizer: PreTrainedTokenizerBase, report: DataReport,
               prompts_only: bool) -> list[tuple[DataCard, TrainSource, Dataset]]:
    """Every card of `data.<split>` converted (or read from the cache) and within the length limit, counted."""
    from rlhf_pipeline.distributed import node_main_process_first

    tokenizer_id = tokenizer_fingerprint(tokenizer)
    loaded = []
    for card, entry in _sources_of(recipe, split):
        with node_main_process_first():
            table = card_table(card, recipe.data, tokenizer, tokenizer_id, prompts_only)
        rows, drops = _within_length(table, recipe.data.max_length)
        report.add(card, table.read, len(rows), drops.counts, drops.where)
        report.sources.append({"card": card.name, "split": split, "rows_read": table.read, "rows_kept": len(rows),
                               "cache": "converted" if table.built else "read"} | entry.options())
        loaded.append((card, entry, rows))
    return loaded


def load_rows(recipe: Recipe, split: str, tokenizer: PreTrainedTokenizerBase, report: DataReport,
              prompts_only: bool = False) -> list[dict[str, Any]]:
    """Canonical rows of every card in `data.<split>`, with unusable and over-long rows dropped and counted."""
    return [{name: value for name, value in row.items() if name not in HELPER_COLUMNS}
            for _, _, rows in _card_rows(recipe, split, tokenizer, report, prompts_only) for row in rows]


def _mixed(recipe: Recipe, loaded: list[tuple[DataCard, TrainSource, Dataset]],
           records: list[dict[str, Any]]) -> Dataset:
    """The train cards as one table: each card's share taken by whole prompts (seeded), in the order listed."""
    entries = recipe.data.sources()
    sizes = [capped_size(len(rows), entry.max_rows, entry.fraction) for _, entry, rows in loaded]
    if all(entry.weight is not None for _, entry, _ in loaded):
        for (card, entry, _), size in zip(loaded, sizes, strict=True):
            if not size:
                raise RecipeError(recipe.path, f"data.train[{entries.index(entry)}]", f"card '{card.name}' gives "
                                  "no usable rows, so a mixture keeping its weight's share would take nothing; "
                                  "fix its rows or remove it from the mixture")
        sizes = weighted_sizes(sizes, [entry.weight for _, entry, _ in loaded])
    parts = []
    for (card, entry, rows), size, record in zip(loaded, sizes, records, strict=True):
        if size < len(rows):
            rows = take(rows, sample_indices(column(rows, PROMPT), size, recipe.data.seed))
            if not len(rows):
                index = entries.index(entry)
                key = next(key for key in ("weight", "max_rows", "fraction") if getattr(entry, key) is not None)
                raise RecipeError(recipe.path, f"data.train[{index}].{key}", f"card '{card.name}' would give "
                                  f"{size} rows, fewer than any one of its prompts has (prompts are taken whole); "
                                  "raise it")
        record["rows_taken"] = len(rows)
        parts.append(rows)
    return _concatenated(parts, [card for card, _, _ in loaded])


def _concatenated(parts: list[Dataset], cards: list[DataCard]) -> Dataset:
    """Tables of several cards as one: the columns they all have (a margin only some cards give is dropped)."""
    from datasets import concatenate_datasets

    if len(parts) == 1:
        return parts[0]
    shared = [name for name in parts[0].column_names if all(name in part.column_names for part in parts)]
    for part, card in zip(parts, cards, strict=True):
        if extra := sorted(set(part.column_names) - set(shared)):
            logger.warning("data: %s's column(s) %s dropped: not every card has them", card.name, ", ".join(extra))
    try:
        return concatenate_datasets([part.select_columns(shared) for part in parts])
    except ValueError as err:
        raise PipelineError(f"data: the cards {', '.join(card.name for card in cards)} give rows of different "
                            f"shapes and cannot be trained on together ({err})") from None


def split_by_prompt(rows: list[dict[str, Any]], share: float,
                    seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Hold out a seeded `share` of the distinct prompts, each with all its rows: no eval prompt is trained on.

    The prompts are permuted as `datasets.Dataset.train_test_split` permutes rows, so a card whose prompts are
    all distinct splits exactly as a row split with the same seed would.
    """
    train, held_out = split_indices([prompt_key(row["prompt"]) for row in rows], share, seed)
    return [rows[index] for index in train], [rows[index] for index in held_out]


def sample_prompts(rows: list[dict[str, Any]], max_rows: int, seed: int) -> list[dict[str, Any]]:
    """At most `max_rows` rows, taken by whole prompts in a seeded order (a prompt's rows are never cut in
    half); with distinct prompts, the rows `Dataset.shuffle(seed)` puts first."""
    return [rows[index] for index in sample_indices([prompt_key(row["prompt"]) for row in rows], max_rows, seed)]


MIN_PROMPTS_TO_SPLIT = 4  # fewer distinct prompts than this and an eval_split would leave training nearly empty


def _held_out(recipe: Recipe, train: list[str], evaluation: list[str],
              report: DataReport) -> tuple[list[int], list[int]]:
    """Train and eval rows (as indices into the prompt keys given) with no prompt on both sides: carved by prompt
    from train, or given by eval cards (whose prompts that training shares are counted, and kept, dropped from
    training or refused by `data.eval_overlap`)."""
    data = recipe.data
    everything = list(range(len(train)))
    if not evaluation:
        prompts = len(prompt_groups(train))
        if data.eval_split == 0:
            return everything, []
        if prompts < MIN_PROMPTS_TO_SPLIT:
            logger.warning("data: eval_split %s ignored: only %d distinct prompts to split", data.eval_split,
                           prompts)
            return everything, []
        return split_indices(train, data.eval_split, data.seed)
    held_out = set(evaluation)
    shared = held_out & set(train)
    report.eval_prompts_in_train = len(shared)
    if shared and data.eval_overlap == "error":
        raise RecipeError(recipe.path, "data.eval", f"{len(shared)} of the {len(held_out)} eval prompts also occur "
                          "in the train cards; remove them from one side, or set data.eval_overlap: drop (train "
                          "without them) or warn")
    if shared and data.eval_overlap == "drop":
        return [index for index, key in enumerate(train) if key not in shared], list(range(len(evaluation)))
    if shared:
        logger.warning("data: %d of the %d eval prompts also occur in training (data.eval_overlap: drop removes "
                       "them from training, error refuses)", len(shared), len(held_out))
    return everything, list(range(len(evaluation)))


def _count_sources(starts: list[int], sources: list[dict[str, Any]], indices: list[int], name: str) -> None:
    """How many rows of each card's part of a table (starting at `starts`) went into split `name`."""
    counts = collections.Counter(bisect.bisect_right(starts, index) - 1 for index in indices)
    for position, source in enumerate(sources):
        source[f"{name}_rows"] = source.get(f"{name}_rows", 0) + counts.get(position, 0)


def _starts(parts: list[int]) -> list[int]:
    return [sum(parts[:index]) for index in range(len(parts))]


def _selected(table: Dataset, indices: list[int]) -> Dataset:
    rows = table if indices == list(range(len(table))) else take(table, indices)
    return rows.remove_columns([name for name in HELPER_COLUMNS if name in rows.column_names])


def _streamed(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, report: DataReport) -> DatasetDict:
    """`data.streaming`: the train cards as one stream; eval cards loaded whole, their prompts kept out of it."""
    from datasets import DatasetDict

    from rlhf_pipeline.data.streaming import streamed_train

    eval_cards = _card_rows(recipe, "eval", tokenizer, report, prompts_only=False)
    evaluation = _concatenated([rows for _, _, rows in eval_cards], [card for card, _, _ in eval_cards]) \
        if eval_cards else None
    held_out = set(column(evaluation, PROMPT)) if evaluation is not None else set()
    sources = _sources_of(recipe, "train")
    report.mixture = len(sources) > 1 or any(entry.sampled for _, entry in sources)
    splits = {"train": streamed_train(recipe, sources, tokenizer, report, held_out)}
    if evaluation is not None:
        report.count_split("eval", column(evaluation, PROMPT))
        splits["eval"] = _selected(evaluation, list(range(len(evaluation))))
    return DatasetDict(splits)


def load_datasets(recipe: Recipe, tokenizer: PreTrainedTokenizerBase,
                  prompts_only: bool = False) -> tuple[DatasetDict, DataReport]:
    """Train and eval datasets for a stage; an eval split is carved from the mixed train cards, by prompt, when
    no eval card is given.

    `prompts_only` is for stages that sample their own answers (label, PPO, eval): any card format works
    and only its distinct prompts are kept. With `data.streaming` the train split is an `IterableDataset`
    whose drops are counted into the report as its rows are read.
    """
    from datasets import DatasetDict

    report = DataReport()
    if recipe.data.streaming:
        return _streamed(recipe, tokenizer, report), report
    train_cards = _card_rows(recipe, "train", tokenizer, report, prompts_only)
    eval_cards = _card_rows(recipe, "eval", tokenizer, report, prompts_only) if recipe.data.eval else []
    report.mixture = len(train_cards) > 1 or any(entry.sampled for _, entry, _ in train_cards)
    if report.read and report.kept / report.read < recipe.data.min_valid_fraction:
        raise PipelineError(f"{recipe.path}: data: only {report.summary()}, below "
                            f"data.min_valid_fraction={recipe.data.min_valid_fraction}; fix the rows named "
                            "above or lower the threshold")
    if not any(len(rows) for _, _, rows in train_cards):
        raise PipelineError(f"{recipe.path}: data.train: no usable rows ({report.summary()})")
    train_sources, eval_sources = report.sources[:len(train_cards)], report.sources[len(train_cards):]
    train = _mixed(recipe, train_cards, train_sources)
    evaluation = _concatenated([rows for _, _, rows in eval_cards], [card for card, _, _ in eval_cards]) \
        if eval_cards else None
    train_keys = column(train, PROMPT)
    eval_keys = column(evaluation, PROMPT) if evaluation is not None else []
    train_index, eval_index = _held_out(recipe, train_keys, eval_keys, report)
    if recipe.data.max_samples:
        train_index = [train_index[i] for i in
                       sample_indices([train_keys[i] for i in train_index], recipe.data.max_samples, recipe.data.seed)]
        if not train_index:
            raise RecipeError(recipe.path, "data.max_samples", f"{recipe.data.max_samples} rows is fewer than any "
                              "one prompt has, and prompts are taken whole; raise it")
    starts = _starts([source["rows_taken"] for source in train_sources])
    report.count_split("train", [train_keys[i] for i in train_index])
    _count_sources(starts, train_sources, train_index, "train")
    splits = {"train": _selected(train, train_index)}
    if eval_index and evaluation is None:  # carved from the mixed train cards
        report.count_split("eval", [train_keys[i] for i in eval_index])
        _count_sources(starts, train_sources, eval_index, "eval")
        splits["eval"] = _selected(train, eval_index)
    elif eval_index:
        report.count_split("eval", eval_keys)
        for source in eval_sources:
            source["rows_taken"] = source["eval_rows"] = source["rows_kept"]
        splits["eval"] = _selected(evaluation, eval_index)
    logger.info("data: %s", report.summary())
    return DatasetDict(splits), report


def answer_key(recipe: Recipe) -> dict[str, str]:
    """The right answer of every prompt of the recipe's cards that carries one (a `reference` column), by
    `prompt_key`: what outcome checks (tasks/answers.py) compare answers with. Read without a tokenizer, so
    it is known before any weights load; prompts get the recipe's system prompt as the stage's rows do. Only
    prompt sets carry references."""
    key: dict[str, str] = {}
    for split in ("train", "eval"):
        for card in cards_of(recipe, split):
            if card.format not in formats.PROMPT_FORMATS:
                continue
            rows, _, _ = read_card_rows(card)
            for row in convert_card_rows(card, rows, recipe.data.system_prompt).rows:
                if row.get("reference") is not None:
                    key.setdefault(prompt_key(row["prompt"]), row["reference"])
    return key
