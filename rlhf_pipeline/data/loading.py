"""From data cards to `datasets.Dataset` splits in a stage's canonical format, every dropped row counted.

Local JSON/JSONL files are read line by line so that a malformed line is reported by its number instead
of failing the whole file; CSV and Parquet go through `datasets`, Hub ids through
`datasets.load_dataset` with the card's revision and split.
"""

from __future__ import annotations

import codecs
import collections
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_pipeline.data import formats
from rlhf_pipeline.data.cards import DataCard, DataSpec
from rlhf_pipeline.errors import PipelineError, RecipeError
from rlhf_pipeline.steps import join_steps

if TYPE_CHECKING:
    from datasets import DatasetDict
    from transformers import PreTrainedTokenizerBase

    from rlhf_pipeline.recipe import Recipe

logger = logging.getLogger(__name__)


@dataclass
class DataReport:
    """Rows read, kept and dropped (by reason, with the first few row numbers) for every card, and the prompts and
    rows each split got."""

    read: int = 0
    kept: int = 0
    dropped: collections.Counter[str] = field(default_factory=collections.Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    splits: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> {"rows", "prompts"}
    eval_prompts_in_train: int | None = None  # given eval cards only: their prompts that training also has

    def add(self, card: DataCard, read: int, kept: int, dropped: collections.Counter[str],
            where: dict[str, list[Any]]) -> None:
        self.read += read
        self.kept += kept
        self.dropped.update(dropped)
        for reason, rows in where.items():
            self.examples.setdefault(reason, []).extend(f"{card.name}:{row}" for row in rows[:5])

    def count_split(self, name: str, rows: list[dict[str, Any]]) -> None:
        self.splits[name] = {"rows": len(rows), "prompts": len({prompt_key(row["prompt"]) for row in rows})}

    def summary(self) -> str:
        reasons = ", ".join(f"{reason} {count} (e.g. {', '.join(self.examples.get(reason, [])[:3])})"
                            for reason, count in self.dropped.most_common())
        # a ranking row gives several pairs, and a pair split for KTO two answers: more examples than rows
        kept = f"{self.kept} of {self.read} rows kept" if self.kept <= self.read else \
            f"{self.kept} examples from {self.read} rows"
        sides = "; ".join(f"{name} {part['rows']} rows of {part['prompts']} prompts"
                          for name, part in self.splits.items())
        overlap = (f"; {self.eval_prompts_in_train} eval prompts also in train"
                   if self.eval_prompts_in_train else "")
        return kept + (f"; dropped: {reasons}" if reasons else "") + (f"; {sides}" if sides else "") + overlap

    def as_dict(self) -> dict[str, Any]:
        return {"rows_read": self.read, "rows_kept": self.kept, "rows_dropped": dict(self.dropped),
                "first_dropped": {reason: rows[:_FIRST_BAD] for reason, rows in self.examples.items()},
                "splits": self.splits, "eval_prompts_in_train": self.eval_prompts_in_train}


_FIRST_BAD = 5  # row numbers kept per reason: enough to find the pattern, never the whole file
Where = dict[str, list[str]]


def _note(where: Where, reason: str, label: str) -> None:
    rows = where.setdefault(reason, [])
    if len(rows) < _FIRST_BAD:
        rows.append(label)


def _read_json_lines(path: Path) -> tuple[list[dict[str, Any]], collections.Counter[str], Where, list[str]]:
    """Read JSONL (or a JSON array) keeping good rows and noting bad lines by 1-based line number.

    Returns the rows, drops by reason, the first bad lines per reason, and each kept row's line label.
    """
    raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    dropped, where = collections.Counter[str](), {}
    if path.suffix == ".json" and raw.lstrip().startswith(b"["):
        try:
            items = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RecipeError(path, None, f"not a valid JSON array ({err}); fix the file or use JSONL") from None
        rows, labels = [], []
        for number, item in enumerate(items, start=1):
            if isinstance(item, dict):
                rows.append(item)
                labels.append(f"item {number}")
            else:
                dropped["not_an_object"] += 1
                _note(where, "not_an_object", f"item {number}")
        return rows, dropped, where, labels
    rows, labels = [], []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            reason = "not_utf8"
        except (json.JSONDecodeError, RecursionError):
            reason = "malformed_json"
        else:
            if isinstance(row, dict):
                rows.append(row)
                labels.append(f"line {number}")
                continue
            reason = "not_an_object"
        dropped[reason] += 1
        _note(where, reason, f"line {number}")
    return rows, dropped, where, labels


def read_card_rows(card: DataCard) -> tuple[list[dict[str, Any]], collections.Counter[str], dict[str, list]]:
    """All rows of a card with columns renamed to canonical names; unreadable rows counted, not raised."""
    rows, dropped, where, _ = _read_card(card)
    return rows, dropped, where


def _read_card(card: DataCard) -> tuple[list[dict[str, Any]], collections.Counter[str], Where, list[str]]:
    """`read_card_rows` plus where each row came from (`line 7` of a JSONL file, `row 7` of a table)."""
    path = card.local_path()
    if path is not None and path.suffix in (".json", ".jsonl"):
        rows, dropped, where, labels = _read_json_lines(path)
    else:
        from datasets import load_dataset

        if path is not None:
            dataset = load_dataset(path.suffix.lstrip("."), data_files=str(path), split="train")
        else:
            try:
                dataset = load_dataset(card.source.hub_id, card.source.subset, revision=card.source.revision,
                                       split=card.source.split)
            except ConnectionError as err:  # offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) or no network
                raise RecipeError(card.file, "source.hub_id", f"cannot reach '{card.source.hub_id}' on the Hub and "
                                  f"it is not in the local cache ({err}); run once online (without "
                                  "HF_HUB_OFFLINE=1) to cache it, or point source.path at a local copy") from None
        rows, dropped, where = dataset.to_list(), collections.Counter(), {}
        labels = [f"row {number}" for number in range(1, len(rows) + 1)]
    columns = {name: card.column(name) for name in formats.CANONICAL_COLUMNS[card.format]}
    listed = {name: column for name, column in columns.items() if isinstance(column, list)}  # one per answer
    mapping = {column: name for name, column in columns.items() if isinstance(column, str)}
    if card.margin_column:
        mapping[card.margin_column] = "margin"
    if rows:
        present = set().union(*(row.keys() for row in rows[:100]))
        wanted = [*mapping.items(), *((column, name) for name, names in listed.items() for column in names)]
        for file_column, canonical in wanted:
            needed = canonical in _REQUIRED[card.format]
            if needed and file_column not in present:
                raise RecipeError(card.file, f"columns.{canonical}",
                                  f"column '{file_column}' not found in {path or card.source.hub_id}; "
                                  f"its columns are: {', '.join(sorted(present))}")
    renamed = [{mapping.get(k, k): v for k, v in row.items()}
               | {name: [row.get(column) for column in names] for name, names in listed.items()} for row in rows]
    return renamed, dropped, where, labels


_REQUIRED = {
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


def _convert_rows(card: DataCard, rows: list[dict[str, Any]], labels: list[str], data: DataSpec,
                  prompts_only: bool, dropped: collections.Counter[str],
                  where: Where) -> list[tuple[str, dict[str, Any]]]:
    """Canonical rows, each with the line or row it came from, so every later drop names it too.

    Rows are converted one at a time for that; stages that sample answers keep only the distinct prompts (and
    their references, the right answers an outcome check needs), and with `data.unpair` the card's pairs become
    labelled single answers (KTO; `formats.unpair`).
    """
    out: list[tuple[str, dict[str, Any]]] = []
    for label, row in zip(labels, rows, strict=True):
        converted = convert_card_rows(card, [row], data.system_prompt)
        for reason, count in converted.dropped.items():
            dropped[reason] += count
            _note(where, reason, label)
        out.extend((label, canonical) for canonical in converted.rows)
    if data.unpair and card.format in formats.PREFERENCE_FORMATS:
        answers, ambiguous = formats.unpair([canonical for _, canonical in out])
        for index in ambiguous:
            dropped[formats.AMBIGUOUS_ANSWER] += 1
            _note(where, formats.AMBIGUOUS_ANSWER, out[index][0])
        out = [(out[index][0], answer) for index, answer in answers]
    if prompts_only:
        distinct: dict[str, tuple[str, dict[str, Any]]] = {}
        for label, canonical in out:
            distinct.setdefault(prompt_key(canonical["prompt"]),
                                (label, {key: canonical[key] for key in ("prompt", "reference") if key in canonical}))
        out = list(distinct.values())
    return out


def prompt_key(prompt: list[dict[str, str]]) -> str:
    """One string per distinct chat prompt, the whole conversation answered (system turn included): what makes
    two rows "the same prompt" for held-out splits and distinct prompts, and what right answers are looked up by."""
    return json.dumps(prompt, sort_keys=True)


def _token_length(tokenizer: PreTrainedTokenizerBase) -> Callable[[dict[str, Any]], int]:
    """Length of a canonical row once rendered with the chat template (longest answer for pairs)."""
    def length(row: dict[str, Any]) -> int:
        answers = [row[k] for k in ("completion", "chosen", "rejected") if k in row] or [[]]
        if "steps" in row:
            answers = [[{"role": "assistant", "content": join_steps(row["steps"])}]]
        # return_dict=False: a BatchEncoding's len() is its number of keys (2), which filtered nothing
        return max(len(tokenizer.apply_chat_template(row["prompt"] + answer, tokenize=True, return_dict=False,
                                                     add_generation_prompt=not answer)) for answer in answers)
    return length


def load_rows(recipe: Recipe, split: str, tokenizer: PreTrainedTokenizerBase, report: DataReport,
              prompts_only: bool = False) -> list[dict[str, Any]]:
    """Canonical rows of every card in `data.<split>`, with unusable and over-long rows dropped and counted."""
    from tqdm.auto import tqdm

    from rlhf_pipeline.distributed import is_main_process

    cards = cards_of(recipe, split)
    length = _token_length(tokenizer)
    kept_rows: list[dict[str, Any]] = []
    for card in cards:
        rows, dropped, where, labels = _read_card(card)
        read = len(rows) + sum(dropped.values())  # so far only unreadable lines are counted
        converted = _convert_rows(card, rows, labels, recipe.data, prompts_only, dropped, where)
        kept = []
        for label, row in tqdm(converted, desc=f"data: token lengths ({card.name})", leave=False,
                               disable=len(converted) < 2000 or not is_main_process()):
            if length(row) > recipe.data.max_length:
                dropped["too_long"] += 1
                _note(where, "too_long", label)
            else:
                kept.append(row)
        report.add(card, read, len(kept), dropped, where)
        kept_rows.extend(kept)
    return kept_rows


def cards_of(recipe: Recipe, split: str) -> list[DataCard]:
    """The recipe's cards listed under `data.<split>` (train, eval, ptx); a card in eval is not in train."""
    def listed(card: DataCard, refs: list[str]) -> bool:
        names = {Path(ref).stem for ref in refs}
        return card.name in names or card.file.stem in names

    refs = {"train": recipe.data.train, "eval": recipe.data.eval, "ptx": recipe.data.ptx}[split]
    found = {card.file: card for card in recipe.cards
             if listed(card, refs) and not (split == "train" and listed(card, recipe.data.eval))}
    return list(found.values())


def _prompt_groups(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The rows gathered by prompt, groups in the order their prompts first appear."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(prompt_key(row["prompt"]), []).append(row)
    return list(groups.values())


def split_by_prompt(rows: list[dict[str, Any]], share: float,
                    seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Hold out a seeded `share` of the distinct prompts, each with all its rows: no eval prompt is trained on.

    The prompts are permuted as `datasets.Dataset.train_test_split` permutes rows, so a card whose prompts are
    all distinct splits exactly as a row split with the same seed would.
    """
    from datasets import Dataset

    groups = _prompt_groups(rows)
    parts = Dataset.from_dict({"group": range(len(groups))}).train_test_split(test_size=share, seed=seed)
    return ([row for group in parts["train"]["group"] for row in groups[group]],
            [row for group in parts["test"]["group"] for row in groups[group]])


def sample_prompts(rows: list[dict[str, Any]], max_rows: int, seed: int) -> list[dict[str, Any]]:
    """At most `max_rows` rows, taken by whole prompts in a seeded order (a prompt's rows are never cut in
    half); with distinct prompts, the rows `Dataset.shuffle(seed)` puts first."""
    from datasets import Dataset

    groups = _prompt_groups(rows)
    kept: list[dict[str, Any]] = []
    for group in Dataset.from_dict({"group": range(len(groups))}).shuffle(seed=seed)["group"]:
        if len(kept) + len(groups[group]) <= max_rows:
            kept.extend(groups[group])
    return kept


MIN_PROMPTS_TO_SPLIT = 4  # fewer distinct prompts than this and an eval_split would leave training nearly empty


def _held_out(recipe: Recipe, train: list[dict[str, Any]], evaluation: list[dict[str, Any]],
              report: DataReport) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train and eval rows with no prompt on both sides: carved by prompt from train, or given by eval cards (whose
    prompts that training shares are counted, and kept, dropped from training or refused by `data.eval_overlap`)."""
    data = recipe.data
    if not evaluation:
        prompts = len(_prompt_groups(train))
        if data.eval_split == 0:
            return train, []
        if prompts < MIN_PROMPTS_TO_SPLIT:
            logger.warning("data: eval_split %s ignored: only %d distinct prompts to split", data.eval_split,
                           prompts)
            return train, []
        return split_by_prompt(train, data.eval_split, data.seed)
    held_out = {prompt_key(row["prompt"]) for row in evaluation}
    shared = held_out & {prompt_key(row["prompt"]) for row in train}
    report.eval_prompts_in_train = len(shared)
    if shared and data.eval_overlap == "error":
        raise RecipeError(recipe.path, "data.eval", f"{len(shared)} of the {len(held_out)} eval prompts also occur "
                          "in the train cards; remove them from one side, or set data.eval_overlap: drop (train "
                          "without them) or warn")
    if shared and data.eval_overlap == "drop":
        return [row for row in train if prompt_key(row["prompt"]) not in shared], evaluation
    if shared:
        logger.warning("data: %d of the %d eval prompts also occur in training (data.eval_overlap: drop removes "
                       "them from training, error refuses)", len(shared), len(held_out))
    return train, evaluation


def load_datasets(recipe: Recipe, tokenizer: PreTrainedTokenizerBase,
                  prompts_only: bool = False) -> tuple[DatasetDict, DataReport]:
    """Train and eval datasets for a stage; an eval split is carved from train, by prompt, when no eval card is
    given.

    `prompts_only` is for stages that sample their own answers (label, PPO, eval): any card format works
    and only its distinct prompts are kept.
    """
    from datasets import Dataset, DatasetDict

    report = DataReport()
    train = load_rows(recipe, "train", tokenizer, report, prompts_only)
    evaluation = load_rows(recipe, "eval", tokenizer, report, prompts_only) if recipe.data.eval else []
    if report.read and report.kept / report.read < recipe.data.min_valid_fraction:
        raise PipelineError(f"{recipe.path}: data: only {report.summary()}, below "
                            f"data.min_valid_fraction={recipe.data.min_valid_fraction}; fix the rows named "
                            "above or lower the threshold")
    if not train:
        raise PipelineError(f"{recipe.path}: data.train: no usable rows ({report.summary()})")
    train, evaluation = _held_out(recipe, train, evaluation, report)
    if recipe.data.max_samples:
        train = sample_prompts(train, recipe.data.max_samples, recipe.data.seed)
        if not train:
            raise RecipeError(recipe.path, "data.max_samples", f"{recipe.data.max_samples} rows is fewer than any "
                              "one prompt has, and prompts are taken whole; raise it")
    report.count_split("train", train)
    if evaluation:
        report.count_split("eval", evaluation)
    logger.info("data: %s", report.summary())
    splits = {"train": Dataset.from_list(train)} | ({"eval": Dataset.from_list(evaluation)} if evaluation else {})
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
                if "reference" in row:
                    key.setdefault(prompt_key(row["prompt"]), row["reference"])
    return key
