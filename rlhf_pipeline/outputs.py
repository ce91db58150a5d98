"""Stage outputs on disk: atomic writes, the completion marker, reading a finished stage back, and how
its files are named off this machine (content hashes, portable paths).

A stage's folder holds its checkpoints while it runs; at the end the final adapter (or model), the
tokenizer, the resolved recipe and the metrics are moved in, and `stage.json` is written last. Only a
folder with `stage.json` counts as a finished stage, so a crash at any point is re-run, never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlhf_pipeline.errors import PipelineError

MARKER = "stage.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ANSWERS = "answers.jsonl"  # a sampling stage's every answer with its scores (eval, best-of-n)


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder and rename it: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_jsonl(path: Path, rows: Iterable[Any]) -> None:
    """One JSON value per line (a data file a card names), written atomically."""
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def check_writable(folder: Path) -> None:
    """Create the folder and a scratch file in it, so a read-only or full disk is an error before any work."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check-")
    try:
        os.write(fd, b"ok")
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(probe)


def move_into_place(folder: Path, target: Path) -> None:
    """Rename a fully written folder to `target`: readers see the old folder or the new one, never half of one.

    An existing `target` is first renamed aside (one step) and then removed.
    """
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(folder, target)


@contextmanager
def new_folder(target: Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a scratch folder beside `target`; when the block succeeds it replaces `target` whole.

    A block that fails leaves `target` as it was and removes the scratch. With `keep_existing` (a cache entry,
    the same whoever writes it) a `target` another process put in place meanwhile is kept, as it may be in use,
    and the scratch is dropped.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield scratch
        if not keep_existing:
            move_into_place(scratch, target)
        elif not target.exists():
            try:
                os.rename(scratch, target)
            except OSError:
                if not target.exists():  # not another process's folder placed first: a real failure
                    raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def staging_dir(output_dir: Path) -> Iterator[Path]:
    """Yield a scratch folder next to the outputs; on success its files replace the outputs' one by one."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.glob(".final-*"):  # left by a run killed while saving: never finished outputs
        shutil.rmtree(stale, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(dir=output_dir, prefix=".final-"))
    try:
        yield scratch
        for item in scratch.iterdir():
            target = output_dir / item.name
            if target.is_dir() and item.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@dataclass
class StageManifest:
    """What `stage.json` records: enough to load the result and to decide whether to re-run."""

    stage: str
    fingerprint: str
    base_model: dict[str, Any]
    adapter: bool
    lineage: list[str] = field(default_factory=list)  # finished stage folders this stage started from, oldest first
    task: str = "causal-lm"
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    finished_at: str = ""


def mark_complete(output_dir: Path, manifest: StageManifest) -> None:
    """Write the completion marker; call it only after every other output file is in place."""
    manifest.finished_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json(output_dir / MARKER, manifest.__dict__)


def read_manifest(output_dir: Path) -> StageManifest | None:
    """The manifest of a finished stage, or None when the folder holds no finished stage."""
    marker = Path(output_dir) / MARKER
    if not marker.is_file():
        return None
    record = json.loads(marker.read_text(encoding="utf-8"))
    if record.pop("merged_adapters", None):
        raise PipelineError(f"{marker}: written by an earlier rlhf-pipeline whose adapters apply on top of merged "
                            "ones, which this version no longer loads; re-run that stage (delete its stage.json)")
    return StageManifest(**record)


def require_finished(output_dir: Path, stage: str | tuple[str, ...], key: str) -> StageManifest:
    """A finished stage's manifest (of `stage`, or of one of several), or an error naming the recipe key that
    points at it."""
    stages = (stage,) if isinstance(stage, str) else stage
    wanted = " or ".join(stages)
    manifest = read_manifest(output_dir)
    if manifest is None:
        raise PipelineError(f"{key}: {output_dir} is not a finished {wanted} stage (no {MARKER}); "
                            f"run the {wanted} stage first, or let it finish")
    if manifest.stage not in stages:
        raise PipelineError(f"{key}: {output_dir} holds a finished '{manifest.stage}' stage, not "
                            f"{' or '.join(repr(s) for s in stages)}")
    return manifest


def read_recipe(output_dir: Path) -> tuple[dict[str, Any], str]:
    """A finished stage's resolved recipe, parsed and as written (the card quotes it verbatim)."""
    path = output_dir / "recipe.yaml"
    if not path.is_file():
        raise PipelineError(f"{path}: missing; a finished stage keeps its resolved recipe there")
    text = path.read_text(encoding="utf-8")
    return yaml.safe_load(text) or {}, text


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def short_sha(path: Path) -> str:
    """How cards and merged_from.json name a file's content: the first 12 hex digits of its sha256."""
    return file_sha256(path)[:12] if path.is_file() else "missing"


def shown_path(path: str | Path, home: bool = True) -> str:
    """A path as a card shows it: relative to the working directory when inside it, else with `~` for home
    (not in code, where `~` would not be expanded)."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        return str(p)
    for root, prefix in ((Path.cwd(), ""), *(((Path.home(), "~/"),) if home else ())):
        try:
            return prefix + str(p.resolve().relative_to(root.resolve()))
        except ValueError:
            continue
    return str(p)


ROUND_PREFIX = "round-"  # iterated RLHF: round k of the stage in <parent>/<name> writes <parent>/round-k/<name>


def round_dir(output_dir: Path, number: int) -> Path:
    """Where round `number` of a pipeline's rounds (rlhf_pipeline/rounds.py) writes the stage of `output_dir`."""
    return output_dir.parent / f"{ROUND_PREFIX}{number}" / output_dir.name


def round_number(folder: Path) -> int | None:
    """The round a stage folder belongs to (its parent is `round-<k>`), or None outside rounds."""
    name = Path(folder).parent.name
    number = name.removeprefix(ROUND_PREFIX)
    return int(number) if name.startswith(ROUND_PREFIX) and number.isdigit() else None


CHECKPOINT_STATE = "trainer_state.json"  # written last into a checkpoint, by transformers' Trainer and our PPO
CHECKPOINT_PREFIX = "checkpoint-"


def _complete(checkpoint: Path) -> bool:
    """A checkpoint counts once its trainer state, written last, reads back whole (a kill may cut it short)."""
    try:
        json.loads((checkpoint / CHECKPOINT_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def checkpoints(output_dir: str | os.PathLike[str], complete: bool = True) -> list[Path]:
    """The `checkpoint-N` folders of a run, oldest first; with `complete`, only those a resume may use.

    A folder a killed run was still writing (no trainer state yet, or a cut one) is not complete.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*")
             if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (not complete or _complete(p))]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def last_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete `checkpoint-N` folder, so a re-run continues instead of starting over."""
    found = checkpoints(output_dir)
    return found[-1] if found else None


def save_recipe_and_metrics(folder: Path, resolved_recipe: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Every stage keeps the exact recipe it ran and the numbers it measured beside its weights."""
    write_text_atomic(folder / "recipe.yaml", yaml.safe_dump(resolved_recipe, sort_keys=False))
    write_json(folder / "metrics.json", metrics)
