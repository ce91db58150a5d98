"""SFT on train cards too large to hold: rows read, converted and measured as the trainer consumes them.

With `data.streaming: true` the train split is a `datasets.IterableDataset`: each card is read lazily (local
JSON lines, or `datasets` streaming for tables and the Hub), converted by the same batched `Converter` as the
cached path, rows over `data.max_length` dropped, weighted cards interleaved with their weights as
probabilities (seeded), and the result shuffled through a buffer of `data.shuffle_buffer` rows. Nothing is
cached and no card is ever held whole.

The data report counts what the stream read, as it reads it: rows read, kept and dropped by reason with their
lines, per card, for the pass over the data that went furthest (the trainer starts a stream again each epoch
and may peek at its first rows), so metrics.json says exactly what training saw. `data.min_valid_fraction` is
checked once a card has given 1,000 rows and again at its end. Eval cards are loaded whole as usual; a train
row whose prompt is an eval prompt is skipped and counted (`eval_prompt`) with `data.eval_overlap: drop`, or
trained on and counted with `warn`. What a stream cannot do honestly (an eval split carved from it, caps,
`max_samples`) is refused when the recipe is read (`DataSpec`).
"""

from __future__ import annotations

import collections
import itertools
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rlhf_pipeline.data.cache import Drops
from rlhf_pipeline.data.cards import DataCard, TrainSource
from rlhf_pipeline.data.conversion import (
    DROP,
    LENGTH,
    PROMPT,
    SOURCE_WHERE,
    Converter,
    canonical_columns,
    table_features,
)
from rlhf_pipeline.data.reading import Renamer, first_rows, is_json_card, json_records, table_dataset
from rlhf_pipeline.errors import PipelineError

if TYPE_CHECKING:
    from datasets import IterableDataset
    from transformers import PreTrainedTokenizerBase

    from rlhf_pipeline.data.report import DataReport
    from rlhf_pipeline.recipe import Recipe

BATCH = 256  # raw rows converted together
# Tallies by key: `datasets` copies a generator's arguments, so the generator finds its tally here (the report it
# fills lives in the training process; a stream read by DataLoader workers is refused in load_recipe)
_TALLIES: dict[str, Tally] = {}
CHECK_AFTER = 1_000  # rows a card gives before data.min_valid_fraction is checked
EVAL_PROMPT = "eval_prompt"  # the drop reason of a streamed train row whose prompt is held out


@dataclass
class Pass:
    """One pass over a card's stream: what it read, kept and dropped so far."""

    read: int = 0
    kept: int = 0
    drops: Drops = field(default_factory=Drops)
    prompts: set[str] = field(default_factory=set)
    shared: set[str] = field(default_factory=set)  # eval prompts met in training


class Tally:
    """The data report's figures for streamed cards: each card's furthest pass, added to what was loaded whole.

    Passes only count; the report is refreshed from them when it is read (`DataReport.refresh`).
    """

    def __init__(self, report: DataReport, cards: list[DataCard]) -> None:
        self.report, self.cards = report, cards
        self.base = (report.read, report.kept, collections.Counter(report.dropped),
                     {reason: list(lines) for reason, lines in report.examples.items()})
        self.best = [Pass() for _ in cards]
        self.current = [Pass() for _ in cards]
        self.records = [{"card": card.name, "split": "train", "streamed": True} for card in cards]
        report.sources[:0] = self.records
        report.refresh = self.refresh
        self.refresh()

    def start(self, index: int) -> Pass:
        """A new pass over card `index`; the one before it is kept if it went furthest."""
        if self.current[index].read >= self.best[index].read:
            self.best[index] = self.current[index]
        self.current[index] = Pass()
        return self.current[index]

    def refresh(self) -> None:
        read, kept, dropped, examples = self.base
        report = self.report
        furthest = [max(best, current, key=lambda p: p.read) for best, current in zip(self.best, self.current,
                                                                                      strict=True)]
        report.read, report.kept = read + sum(p.read for p in furthest), kept + sum(p.kept for p in furthest)
        report.dropped = collections.Counter(dropped)
        report.examples = {reason: list(lines) for reason, lines in examples.items()}
        for card, seen, record in zip(self.cards, furthest, self.records, strict=True):
            report.add(card, 0, 0, seen.drops.counts, seen.drops.where)
            record.update(rows_read=seen.read, rows_kept=seen.kept, rows_taken=seen.kept, train_rows=seen.kept)
        report.splits["train"] = {"rows": sum(p.kept for p in furthest),
                                  "prompts": len(set().union(*(p.prompts for p in furthest)))}
        if report.eval_prompts_in_train is not None:
            report.eval_prompts_in_train = len(set().union(*(p.shared for p in furthest)))


def _raw_batches(card: DataCard) -> Iterator[tuple[dict[str, list[Any]], list[int]]]:
    """The card's raw rows in batches, with their positions (as the Converter takes them)."""
    if is_json_card(card):
        records: Iterator[dict[str, Any]] = json_records(str(card.local_path()))
    else:
        records = iter(table_dataset(card, streaming=True))
    position = 0
    while chunk := list(itertools.islice(records, BATCH)):
        yield {name: [record[name] for record in chunk] for name in chunk[0]}, list(range(position,
                                                                                        position + len(chunk)))
        position += len(chunk)


def _card_rows(recipe: Recipe, card: DataCard, index: int, tokenizer: PreTrainedTokenizerBase, tally_key: str,
               held_out: set[str]) -> Iterator[dict[str, Any]]:
    """One pass over a card: its usable rows, each drop counted into the tally as it is met."""
    data, tally = recipe.data, _TALLIES[tally_key]
    converter = Converter(card, data.system_prompt, False, tokenizer, is_json_card(card))
    columns = converter.columns
    current = tally.start(index)
    for batch, positions in _raw_batches(card):
        table = converter(batch, positions)
        last = None
        for position, (where, reason) in enumerate(zip(table[SOURCE_WHERE], table[DROP], strict=True)):
            if where != last:  # the first record of the next input row
                current.read += 1
                last = where
            prompt = table[PROMPT][position]
            if reason is None and table[LENGTH][position] > data.max_length:
                reason = "too_long"
            if reason is None and prompt in held_out:
                current.shared.add(prompt)
                if data.eval_overlap == "drop":
                    reason = EVAL_PROMPT
            if reason is not None:
                current.drops.add(reason, where)
                continue
            current.kept += 1
            current.prompts.add(prompt)
            yield {name: table[name][position] for name in columns}
        _check(recipe, card, current, final=False)
    _check(recipe, card, current, final=True)


def _check(recipe: Recipe, card: DataCard, current: Pass, final: bool) -> None:
    data = recipe.data
    if (final or current.read >= CHECK_AFTER) and current.read and current.kept / current.read < \
            data.min_valid_fraction:
        reasons = ", ".join(f"{reason} {count}" for reason, count in current.drops.counts.most_common())
        raise PipelineError(f"{recipe.path}: data: card {card.name} streamed {current.read} rows and kept only "
                            f"{current.kept} ({reasons}), below data.min_valid_fraction={data.min_valid_fraction}; "
                            "fix the rows named in the report or lower the threshold")
    if final and not current.kept:
        raise PipelineError(f"{recipe.path}: data.train: card {card.name} has no usable rows")


def streamed_train(recipe: Recipe, sources: list[tuple[DataCard, TrainSource]], tokenizer: PreTrainedTokenizerBase,
                   report: DataReport, held_out: set[str]) -> IterableDataset:
    """The train cards as one shuffled stream (weighted cards interleaved by their weights)."""
    from datasets import IterableDataset, interleave_datasets

    data = recipe.data
    cards = [card for card, _ in sources]
    for card in cards:  # a missing column fails now, not as every row dropped once training has started
        Renamer(card).check(first_rows(card))
    if held_out:
        report.eval_prompts_in_train = 0
    tally_key = uuid.uuid4().hex
    _TALLIES[tally_key] = Tally(report, cards)
    report.streamed = [card.name for card in cards]
    streams = [IterableDataset.from_generator(
        _card_rows, features=table_features(canonical_columns(card, prompts_only=False), helpers=False),
        gen_kwargs={"recipe": recipe, "card": card, "index": index, "tokenizer": tokenizer, "tally_key": tally_key,
                    "held_out": held_out}) for index, card in enumerate(cards)]
    if len(streams) == 1:
        stream = streams[0]
    else:
        weights = [entry.weight for _, entry in sources]
        probabilities = [weight / sum(weights) for weight in weights] if all(weights) else None
        stream = interleave_datasets(streams, probabilities=probabilities, seed=data.seed,
                                     stopping_strategy="first_exhausted")
    return stream.shuffle(seed=data.seed, buffer_size=data.shuffle_buffer)
