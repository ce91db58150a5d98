"""Data cards: one small YAML file per dataset, read by people as documentation and by us as a loading spec.

A card says where the data lives (a local JSON/JSONL/CSV/Parquet file, or a Hub id with revision and
split), its format, how its columns map onto the format's canonical names, its license, size,
intended stages and known issues. Markdown cards with YAML front matter work too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlhf_pipeline.data.formats import FORMATS
from rlhf_pipeline.data.pairs import PAIR_LABELS
from rlhf_pipeline.data.steps import PRM800K_RATINGS
from rlhf_pipeline.errors import RecipeError
from rlhf_pipeline.schema import build_section, read_yaml, suggest

LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
@dataclass
class DataSpec:
    """Datasets by data card name (looked up in data_cards/) or card path, and how to split them."""

    train: list[str]
    eval: list[str] = field(default_factory=list)
    ptx: list[str] = field(default_factory=list)  # PPO-ptx: demonstrations whose SFT loss joins the policy loss
    eval_split: float = 0.1
    max_length: int = 1024
    max_samples: int | None = None
    system_prompt: str | None = None
    min_valid_fraction: float = 0.5
    seed: int = 42
    unpair: bool = False  # KTO: preference pairs become answers labelled desirable or undesirable (formats.unpair)
    eval_overlap: str = "warn"  # eval cards' prompts that training also has: warn, drop (from training) or error

    def __post_init__(self) -> None:
        if not self.train:
            raise ValueError("train: list at least one data card")
        if not 0 <= self.eval_split < 1:
            raise ValueError("eval_split: must be in [0, 1)")
        if self.max_length < 8:
            raise ValueError("max_length: must be at least 8 tokens")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError("max_samples: must be at least 1 (or null for all rows)")
        if not 0 < self.min_valid_fraction <= 1:
            raise ValueError("min_valid_fraction: must be in (0, 1]")
        if self.eval_overlap not in ("warn", "drop", "error"):
            raise ValueError("eval_overlap: warn (train on them anyway, counted in the data report), drop (remove "
                             "them from training) or error")


@dataclass
class SourceSpec:
    """Where the rows come from: exactly one of a local path (relative to the card) or a Hub id."""

    path: str | None = None
    hub_id: str | None = None
    subset: str | None = None
    revision: str = "main"
    split: str = "train"

    def __post_init__(self) -> None:
        if (self.path is None) == (self.hub_id is None):
            raise ValueError("path: give exactly one of path (a local file) or hub_id")
        if self.path is not None and Path(self.path).suffix not in LOCAL_SUFFIXES:
            raise ValueError(f"path: use one of {', '.join(LOCAL_SUFFIXES)} files (got {self.path})")


@dataclass
class DataCard:
    """A validated card; `file` is where it was read from, so paths and errors can name it."""

    name: str
    description: str
    source: SourceSpec
    format: str
    license: str
    stages: list[str]
    # canonical name -> file column; a classification card may map answer and label to lists of columns
    columns: dict[str, str | list[str]] = field(default_factory=dict)
    size: dict[str, Any] = field(default_factory=dict)
    language: str | None = None
    known_issues: str | None = None
    margin_column: str | None = None
    # pair_with_label: which label value means the first answer (answer_a) is the preferred one
    first_preferred_when: int | None = None
    # nested_completions: the keys of each completion record holding the answer text and its score
    completion_answer_key: str = "response"
    completion_score_key: str = "overall_score"
    # classification: the label value meaning the answer breaks the rule (false for an `is_safe` column)
    violation_when: bool | None = None
    # prm800k: the step ratings (-1 bad, 0 neutral, 1 good) that count as a good step
    good_ratings: list[int] | None = None
    file: Path = field(default=Path(), metadata={"internal": True})

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format: unknown format '{self.format}'{suggest(self.format, FORMATS)}; "
                             f"one of {', '.join(sorted(FORMATS))}")
        labelled_pair = self.format == "pair_with_label"
        if labelled_pair and self.first_preferred_when not in PAIR_LABELS:
            raise ValueError(f"first_preferred_when: pair_with_label cards must say which label value means "
                             f"answer_a is preferred: one of {', '.join(map(str, PAIR_LABELS))} "
                             f"(got {self.first_preferred_when})")
        if not labelled_pair and self.first_preferred_when is not None:
            raise ValueError("first_preferred_when: only pair_with_label cards take it; remove the key")
        classified = self.format == "classification"
        if classified and self.violation_when is None:
            raise ValueError("violation_when: classification cards must say which label value means the answer "
                             "breaks the rule: true (label 1/true = violation, the pipeline's convention) or false "
                             "(label true = safe, as in an is_safe column)")
        if not classified and self.violation_when is not None:
            raise ValueError("violation_when: only classification cards take it; remove the key")
        rated = self.format == "prm800k"
        if rated and (not self.good_ratings or not set(self.good_ratings) <= set(PRM800K_RATINGS)):
            raise ValueError(f"good_ratings: prm800k cards must say which step ratings count as good, a list "
                             f"from {list(PRM800K_RATINGS)} (e.g. [1], or [0, 1] to count neutral steps as good); "
                             f"got {self.good_ratings}")
        if not rated and self.good_ratings is not None:
            raise ValueError("good_ratings: only prm800k cards take it; remove the key")
        self._check_columns()

    def _check_columns(self) -> None:
        """File column names are strings; only a classification card's answer and label may list several."""
        listed = {name: value for name, value in self.columns.items() if isinstance(value, list)}
        for name, value in self.columns.items():
            names = value if isinstance(value, list) else [value]
            if not names or not all(isinstance(column, str) and column for column in names):
                raise ValueError(f"columns: {name} must name a file column (got {value!r})")
        if not listed:
            return
        if self.format != "classification" or set(listed) - {"answer", "label"}:
            raise ValueError(f"columns: only a classification card's answer and label may list several columns "
                             f"(got a list for {', '.join(sorted(listed))})")
        if set(listed) != {"answer", "label"} or len(listed["answer"]) != len(listed["label"]):
            raise ValueError("columns: answer and label must list the same number of columns, one label column "
                             "per answer column (e.g. answer: [response_0, response_1], label: [is_response_0_safe, "
                             "is_response_1_safe])")

    def column(self, canonical: str) -> str | list[str]:
        """The file's name for a canonical column (the same name unless the card maps it), or its names when a
        classification card lists one column per answer."""
        return self.columns.get(canonical, canonical)

    def local_path(self) -> Path | None:
        return (self.file.parent / self.source.path).resolve() if self.source.path else None


def _read_card_mapping(path: Path) -> dict[str, Any]:
    if path.suffix == ".md":
        text = path.read_text(encoding="utf-8")
        if not text.startswith("---"):
            raise RecipeError(path, None, "a Markdown data card must start with YAML front matter (---)")
        front = text.split("---", 2)[1]
        data = yaml.safe_load(front)
        if not isinstance(data, dict):
            raise RecipeError(path, None, "the front matter must be a mapping of keys")
        return data
    return read_yaml(path, what="data card")


def load_card(path: Path) -> DataCard:
    """Read and validate one card; errors name the card file and the key."""
    card: DataCard = build_section(DataCard, _read_card_mapping(path), path, "")
    card.file = path.resolve()
    return card


def find_card(ref: str, recipe_path: Path, key: str = "data") -> Path:
    """Resolve a card reference: a path to a card file, or a name looked up in a data_cards/ folder.

    Names are searched in the data_cards/ folders of the recipe's directory and its parents, then of
    the working directory, so shipped recipes work from any directory.
    """
    as_path = Path(ref)
    if as_path.suffix in (".yaml", ".yml", ".md"):
        for candidate in (as_path, recipe_path.parent / as_path):
            if candidate.is_file():
                return candidate
        raise RecipeError(recipe_path, key, f"data card file '{ref}' not found")
    folders = [p / "data_cards" for p in (recipe_path.resolve().parent, *recipe_path.resolve().parents)]
    folders.append(Path.cwd() / "data_cards")
    for folder in folders:
        for suffix in (".yaml", ".yml", ".md"):
            if (folder / f"{ref}{suffix}").is_file():
                return folder / f"{ref}{suffix}"
    known = sorted({p.stem for folder in folders if folder.is_dir() for p in folder.glob("*.y*ml")})
    raise RecipeError(recipe_path, key, f"no data card named '{ref}'{suggest(ref, known)} "
                      f"(looked in the data_cards/ folders above the recipe and in the working directory)")


def _is_pending(ref: str, recipe_path: Path, pending_outputs: list[Path]) -> bool:
    """A card an earlier pipeline stage will generate (inside its output folder) cannot be checked yet."""
    candidates = [Path(ref).resolve(), (recipe_path.parent / ref).resolve()]
    return any(c.is_relative_to(p.resolve()) and not c.is_file() for c in candidates for p in pending_outputs)


def check_cards(data: DataSpec, recipe_path: Path, stage: str, formats: frozenset[str],
                pending_outputs: list[Path] | None = None,
                extra_splits: dict[str, frozenset[str]] | None = None) -> list[DataCard]:
    """Load every card a recipe's data section names and check it has one of the stage's `formats`.

    `extra_splits` are the further card lists the stage takes (PPO's `ptx`) and their formats; any other
    stage refuses them. Cards inside `pending_outputs` (an earlier pipeline stage writes them) are passed
    over for now.
    """
    accepted = {"train": formats, "eval": formats, **(extra_splits or {})}
    cards = []
    for split in ("train", "eval", "ptx"):
        if getattr(data, split) and split not in accepted:
            raise RecipeError(recipe_path, f"data.{split}", f"the {stage} stage does not take {split} cards; "
                              "remove the key")
        for index, ref in enumerate(getattr(data, split)):
            if _is_pending(ref, recipe_path, pending_outputs or []):
                continue
            card = load_card(find_card(ref, recipe_path, f"data.{split}[{index}]"))
            if card.format not in accepted[split]:
                raise RecipeError(recipe_path, f"data.{split}[{index}]",
                                  f"card '{ref}' has format '{card.format}', but the {stage} stage "
                                  f"takes {', '.join(sorted(accepted[split]))} there")
            local = card.local_path()
            if local is not None and not local.is_file():
                raise RecipeError(card.file, "source.path", f"data file not found: {local}")
            cards.append(card)
    return cards
