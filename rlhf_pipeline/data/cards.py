"""Data cards: one small YAML file per dataset, read by people as documentation and by us as a loading spec.

A card says where the data lives (a local JSON/JSONL/CSV/Parquet file, plain or compressed, or a Hub id
with revision and split), its format, how its columns map onto the format's canonical names, its license,
size, intended stages and known issues. Markdown cards with YAML front matter work too.

A recipe's `data.train` lists cards by name, or as mixture entries (`{card: name, weight: 0.3}`,
`{card: name, max_rows: 10000}`, `{card: name, fraction: 0.5}`) checked here before anything loads.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from rlhf_pipeline.data.formats import EXPANDING_FORMATS, FORMATS
from rlhf_pipeline.data.pairs import PAIR_LABELS
from rlhf_pipeline.data.steps import PRM800K_RATINGS
from rlhf_pipeline.errors import RecipeError
from rlhf_pipeline.schema import build_section, read_yaml, suggest

LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# Compressed local files: JSON/JSONL and CSV (Parquet compresses inside the file)
COMPRESSIONS: dict[str, Callable[[Path], IO[bytes]]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def file_suffixes(path: str | Path) -> tuple[str, str | None]:
    """(data suffix, compression suffix or None): `x.jsonl.gz` -> (".jsonl", ".gz"), `x.csv` -> (".csv", None)."""
    suffixes = [suffix.lower() for suffix in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        return (suffixes[-2] if len(suffixes) > 1 else ""), suffixes[-1]
    return (suffixes[-1] if suffixes else ""), None


def open_local(path: Path) -> IO[bytes]:
    """A local data file opened for reading bytes, decompressed on the fly when its name says it is compressed."""
    return COMPRESSIONS.get(file_suffixes(path)[1] or "", open)(path, "rb")


MIXTURE_KEYS = ("card", "weight", "max_rows", "fraction")


@dataclass(frozen=True)
class TrainSource:
    """One `data.train` entry: a card and how much of it the training mixture takes.

    `weight` is the card's share of the mixture (weights are relative: 3 and 7 mean 30% and 70%); `max_rows`
    caps the examples taken from the card and `fraction` takes that share of them. Rows are taken by whole
    prompts, in an order seeded by `data.seed`.
    """

    card: str
    weight: float | None = None
    max_rows: int | None = None
    fraction: float | None = None

    @property
    def sampled(self) -> bool:
        return (self.weight, self.max_rows, self.fraction) != (None, None, None)

    def options(self) -> dict[str, float | int]:
        return {key: value for key in MIXTURE_KEYS[1:] if (value := getattr(self, key)) is not None}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_train_entry(entry: Any, key: str) -> TrainSource:
    """A card name, or a mapping with `card` and at most one of `max_rows`/`fraction` plus an optional `weight`."""
    if isinstance(entry, str):
        if not entry.strip():
            raise ValueError(f"{key}: name a data card (got an empty name)")
        return TrainSource(entry)
    for name in entry:
        if name not in MIXTURE_KEYS:
            raise ValueError(f"{key}.{name}: unknown key{suggest(str(name), MIXTURE_KEYS)}; a mixture entry takes "
                             f"{', '.join(MIXTURE_KEYS)}")
    card, weight, max_rows, fraction = (entry.get(name) for name in MIXTURE_KEYS)
    if not isinstance(card, str) or not card.strip():
        raise ValueError(f"{key}.card: name the data card (e.g. {{card: hh_rlhf, weight: 0.3}}), got {card!r}")
    if weight is not None and not (_number(weight) and weight > 0):
        raise ValueError(f"{key}.weight: must be a positive number (the card's share of the mixture), got {weight!r}")
    if max_rows is not None and not (isinstance(max_rows, int) and not isinstance(max_rows, bool) and max_rows >= 1):
        raise ValueError(f"{key}.max_rows: must be a whole number of rows, at least 1, got {max_rows!r}")
    if fraction is not None and not (_number(fraction) and 0 < fraction <= 1):
        raise ValueError(f"{key}.fraction: must be in (0, 1], the share of the card's rows to take, got {fraction!r}")
    if max_rows is not None and fraction is not None:
        raise ValueError(f"{key}.fraction: give max_rows or fraction, not both")
    return TrainSource(card, weight, max_rows, fraction)


@dataclass
class DataSpec:
    """Datasets by data card name (looked up in data_cards/) or card path, and how to split them."""

    train: list[str | dict]  # card names, or mixture entries {card, weight | max_rows | fraction} (TrainSource)
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
    num_proc: int | None = None  # processes converting a card on its first load (None: from the CPUs and its size)
    streaming: bool = False  # SFT: read the train cards as they are trained on, never held whole (no cache)
    shuffle_buffer: int = 10_000  # streaming: rows shuffled together (a stream cannot be permuted whole)

    def __post_init__(self) -> None:
        if not self.train:
            raise ValueError("train: list at least one data card")
        sources = self.sources()
        weighted = [source.weight is not None for source in sources]
        if any(weighted) and not all(weighted):
            index = weighted.index(False)
            raise ValueError(f"train[{index}]: give every data.train entry a weight, or none (weights are each "
                             "card's share of the mixture)")
        seen: dict[str, int] = {}
        for index, source in enumerate(sources):
            first = seen.setdefault(source.card, index)
            if first != index and (source.sampled or sources[first].sampled):
                raise ValueError(f"train[{index}]: card '{source.card}' is already data.train[{first}]; list it once")
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
        if self.num_proc is not None and self.num_proc < 1:
            raise ValueError("num_proc: must be at least 1 (or null: from the CPU count and the card's size)")
        if self.shuffle_buffer < 1:
            raise ValueError("shuffle_buffer: must be at least 1 row")
        if self.streaming:
            self._check_streaming(sources)

    def _check_streaming(self, sources: list[TrainSource]) -> None:
        """What a stream cannot do honestly is refused: anything that needs every row before training starts."""
        for index, source in enumerate(sources):
            for key in ("max_rows", "fraction"):
                if getattr(source, key) is not None:
                    raise ValueError(f"train[{index}].{key}: a streamed card's size is not known before it is read; "
                                     "use weights (a share of the mixture) or streaming: false")
        if self.max_samples is not None:
            raise ValueError("max_samples: cannot take whole prompts from a stream; remove it or set streaming: false")
        if self.eval_split and not self.eval:
            raise ValueError("eval_split: a held-out share of the prompts needs every row read first; give eval cards "
                             "(data.eval) or set eval_split: 0 with streaming")
        if self.eval_overlap == "error":
            raise ValueError("eval_overlap: error cannot be checked before a stream is read; use drop (train rows "
                             "with an eval prompt are skipped and counted) or warn")

    def sources(self) -> list[TrainSource]:
        """The `train` entries as sources (a bare name takes the whole card)."""
        return [parse_train_entry(entry, f"train[{index}]") for index, entry in enumerate(self.train)]

    def refs(self, split: str) -> list[str]:
        """The card references of `train`, `eval` or `ptx`."""
        if split == "train":
            return [source.card for source in self.sources()]
        return list(getattr(self, split))


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
        if self.path is not None:
            suffix, compression = file_suffixes(self.path)
            if suffix not in LOCAL_SUFFIXES or (compression and suffix == ".parquet"):
                raise ValueError(f"path: use one of {', '.join(LOCAL_SUFFIXES)} files, the first three also "
                                 f"compressed ({', '.join(COMPRESSIONS)}) (got {self.path})")


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
        for index, ref in enumerate(data.refs(split)):
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
            if split == "train":
                _check_cap(data.sources()[index], card, data, recipe_path, f"data.train[{index}].max_rows")
            cards.append(card)
    return cards


def known_rows(card: DataCard) -> tuple[int, str] | None:
    """The card's row count and where it comes from: its `size.rows`, else the non-blank lines of a local JSONL
    file (counted without parsing); None when neither is at hand."""
    rows = card.size.get("rows")
    if isinstance(rows, int) and not isinstance(rows, bool):
        return rows, "its card's size.rows"
    local = card.local_path()
    if local is None or file_suffixes(local)[0] != ".jsonl" or not local.is_file():
        return None
    return count_lines(local), f"counted in {local.name}"


def count_lines(path: Path) -> int:
    """The non-blank lines of a local JSONL file (its rows, readable or not), counted without parsing."""
    with open_local(path) as handle:
        return sum(1 for line in handle if line.strip())


def _check_cap(source: TrainSource, card: DataCard, data: DataSpec, recipe_path: Path, key: str) -> None:
    """A `max_rows` above what the card has is a mistake (a typo, or the wrong card): said before anything loads.

    Only where one file row gives at most one example: a ranking row gives several pairs, KTO's unpairing two
    answers per pair, so their caps are not bounded by the row count.
    """
    if source.max_rows is None or card.format in EXPANDING_FORMATS or data.unpair or \
            any(isinstance(column, list) for column in card.columns.values()):
        return
    known = known_rows(card)
    if known is not None and source.max_rows > known[0]:
        raise RecipeError(recipe_path, key, f"{source.max_rows} is more than the {known[0]} rows card '{card.name}' "
                          f"has ({known[1]}); lower it, or remove max_rows to take every row")
