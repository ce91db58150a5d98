"""Stage outputs on the Hugging Face Hub: a push plan you can review, and the push itself.

    rlhf-pipeline push outputs/smollm2-135m/ppo --repo-id me/smollm2-135m-rlhf --dry-run
    rlhf-pipeline push outputs/smollm2-135m/ppo --repo-id me/smollm2-135m-rlhf          # private

A push uploads what someone needs to load and judge the model (adapter, tokenizer, resolved recipe,
metrics, card) in one commit. `stage.json` stays local: it is this machine's completion marker, full of
absolute paths, and a downloaded copy would pose as a finished local stage of this machine;
the card's lineage section carries its portable part (Hub id of the base, adapter hashes). Checkpoints
and merged weights stay local too. The token is never read here: huggingface_hub finds it (HF_TOKEN or
the login cache) by itself, and nothing we print or write contains it. The card itself is `card.py`'s;
merging is `merge.py`'s.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_pipeline.card import CARD, is_generated_card, redact, render_model_card
from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.outputs import (
    ADAPTER_WEIGHTS,
    MARKER,
    StageManifest,
    file_sha256,
    new_folder,
    write_json,
)
from rlhf_pipeline.sources import hub_offline
from rlhf_pipeline.stages import require_model_stage

if TYPE_CHECKING:
    from rlhf_pipeline.recipe import Recipe

PLAN_FILE = "commit_plan.json"
PLAN_UPLOAD = "upload"
DEFAULT_PLAN_DIR = ".push-plan"

_ADAPTER_FILES = (ADAPTER_WEIGHTS, "adapter_config.json")
_FULL_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
                     "model.safetensors.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "chat_template.jinja", "chat_template.json", "vocab.json", "vocab.txt", "merges.txt",
                    "tokenizer.model", "spiece.model", "*.tiktoken")
_RECORD_FILES = ("recipe.yaml", "metrics.json")
_LEFT_LOCAL = {
    MARKER: "local completion marker with this machine's absolute paths (the card's lineage has the rest)",
    "eval_before_training.json": "already in metrics.json",
}


@dataclass
class PlannedFile:
    """One file of the commit: a file of the output folder, or generated content (the card)."""

    path_in_repo: str
    size: int
    sha256: str
    source: Path | None = None
    content: bytes | None = None


@dataclass
class PushPlan:
    """Everything one push commits, reviewable before anything leaves the machine."""

    output_dir: Path
    repo_id: str
    private: bool
    revision: str | None
    commit_message: str
    files: list[PlannedFile]
    left_local: dict[str, str] = field(default_factory=dict)
    custom_message: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "private": self.private, "revision": self.revision,
                "commit_message": self.commit_message, "output_dir": str(self.output_dir),
                "files": [{"path": f.path_in_repo, "size": f.size, "sha256": f.sha256} for f in self.files],
                "left_local": self.left_local}

    def retry_command(self) -> str:
        """The exact command that repeats this push."""
        parts = ["rlhf-pipeline", "push", str(self.output_dir), "--repo-id", self.repo_id]
        parts.append("--private" if self.private else "--public")
        if self.revision:
            parts += ["--revision", self.revision]
        if self.custom_message:
            parts += ["--commit-message", self.commit_message]
        return shlex.join(parts)

    def describe(self) -> str:
        visibility = "private" if self.private else "public"
        lines = [f"push plan: {self.output_dir} -> {self.repo_id} ({visibility}), revision "
                 f"{self.revision or 'main'}", f"  commit message: {self.commit_message}"]
        width = max(len(f.path_in_repo) for f in self.files)
        lines += [f"  {f.path_in_repo:<{width}}  {f.size:>12,} B  sha256 {f.sha256[:12]}" for f in self.files]
        lines += [f"  not uploaded: {name} ({why})" for name, why in self.left_local.items()]
        return "\n".join(lines)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


def _select_files(output_dir: Path, manifest: StageManifest) -> tuple[list[Path], dict[str, str]]:
    """The output folder's files that belong in the repo, and why every other entry stays local."""
    weights = _ADAPTER_FILES if manifest.adapter else _FULL_MODEL_FILES
    wanted = (*weights, *_TOKENIZER_FILES, *_RECORD_FILES)
    chosen, left = [], {}
    for entry in sorted(output_dir.iterdir()):
        name = entry.name
        if entry.is_dir():
            left[f"{name}/"] = ("training checkpoint (optimizer and resume state)" if name.startswith("checkpoint-")
                                else "scratch or plan folder" if name.startswith(".") else "a folder")
        elif name == CARD:
            continue
        elif entry.is_file() and _matches(name, wanted):
            chosen.append(entry)
        else:
            left[name] = _LEFT_LOCAL.get(name, "not part of the model")
    required = _ADAPTER_FILES if manifest.adapter else ("config.json",)
    missing = [name for name in required if not (output_dir / name).is_file()]
    if missing:
        raise PipelineError(f"{output_dir}: {', '.join(missing)} missing; the stage's weights are not all "
                            "there, re-run the stage")
    return chosen, left


def _validate_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise PipelineError(f"--repo-id: '{repo_id}' is not a Hub repo id ({err}); use namespace/name, "
                            "e.g. me/smollm2-135m-rlhf") from None


def plan_push(output_dir: str | Path, repo_id: str, *, private: bool = True, revision: str | None = None,
              commit_message: str | None = None) -> PushPlan:
    """Decide what a push commits: files, sizes, hashes, the card rendered for this repo and revision.

    The card is re-rendered (with the repo id in its snippet) unless the local README.md was edited
    and its marker line removed, in which case it is uploaded as it is.
    """
    output_dir = Path(output_dir)
    manifest = require_model_stage(output_dir)
    _validate_repo_id(repo_id)
    if revision is not None and not revision.strip():
        raise PipelineError("--revision: give a branch name, or leave it out for main")
    chosen, left = _select_files(output_dir, manifest)
    files = [PlannedFile(path.name, path.stat().st_size, file_sha256(path), source=path) for path in chosen]
    local_card = output_dir / CARD
    if local_card.is_file() and not is_generated_card(local_card.read_text(encoding="utf-8")):
        files.append(PlannedFile(CARD, local_card.stat().st_size, file_sha256(local_card), source=local_card))
    else:
        content = render_model_card(output_dir, manifest, repo_id=repo_id, revision=revision).encode("utf-8")
        files.append(PlannedFile(CARD, len(content), hashlib.sha256(content).hexdigest(), content=content))
    files.sort(key=lambda f: f.path_in_repo)
    default_message = f"rlhf-pipeline {manifest.stage} (recipe {manifest.fingerprint})"
    return PushPlan(output_dir, repo_id, private, revision, commit_message or default_message, files, left,
                    custom_message=bool(commit_message))


def write_plan(plan: PushPlan, plan_dir: str | Path) -> Path:
    """Write the exact upload folder (`<plan_dir>/upload/`) and `commit_plan.json`, replacing an older plan."""
    plan_dir = Path(plan_dir)
    if plan_dir.exists() and any(plan_dir.iterdir()) and not (plan_dir / PLAN_FILE).is_file():
        raise PipelineError(f"--plan-dir: {plan_dir} exists and is not a push plan; choose an empty or new folder")
    with new_folder(plan_dir) as scratch:
        upload = scratch / PLAN_UPLOAD
        upload.mkdir()
        for planned in plan.files:
            if planned.content is not None:
                (upload / planned.path_in_repo).write_bytes(planned.content)
            else:
                shutil.copy2(planned.source, upload / planned.path_in_repo)
        write_json(scratch / PLAN_FILE, plan.as_dict())
    return plan_dir


def upload(plan: PushPlan) -> Any:
    """Create the repo (private unless asked otherwise), the branch if any, and commit the planned files.

    Any failure of the Hub API becomes a PipelineError with the command that retries; nothing local is
    changed either way (the card goes up from memory, the other files straight from the output folder).
    """
    retry = plan.retry_command()
    if hub_offline():
        raise PipelineError(f"push: HF_HUB_OFFLINE=1 forbids uploads; unset it and run: {retry}")
    from huggingface_hub import CommitOperationAdd, HfApi

    operations = [CommitOperationAdd(path_in_repo=f.path_in_repo,
                                     path_or_fileobj=f.content if f.content is not None else str(f.source))
                  for f in plan.files]
    api = HfApi()  # the token comes from HF_TOKEN or the login cache, found by huggingface_hub itself
    try:
        api.create_repo(plan.repo_id, private=plan.private, exist_ok=True)
        if plan.revision and plan.revision != "main":
            api.create_branch(plan.repo_id, branch=plan.revision, exist_ok=True)
        return api.create_commit(plan.repo_id, operations, commit_message=plan.commit_message,
                                 revision=plan.revision)
    except Exception as err:
        detail = redact(f"{type(err).__name__}: {err}".strip().splitlines()[0])[:500]
        raise PipelineError(f"push to {plan.repo_id} failed ({detail}); the local output is unchanged. Check the "
                            "login (`hf auth login` or HF_TOKEN), the repo id and your write access, then retry: "
                            f"{retry}") from None


def push(output_dir: str | Path, repo_id: str, *, private: bool = True, revision: str | None = None,
         commit_message: str | None = None, dry_run: bool = False,
         plan_dir: str | Path | None = None) -> PushPlan | None:
    """Push a finished stage to the Hub (main process only), or with `dry_run` write and print the plan."""
    from rlhf_pipeline.distributed import is_main_process, say

    if not is_main_process():
        return None
    plan = plan_push(output_dir, repo_id, private=private, revision=revision, commit_message=commit_message)
    if dry_run:
        where = write_plan(plan, plan_dir or Path(output_dir) / DEFAULT_PLAN_DIR)
        say(plan.describe())
        say(f"dry run: nothing uploaded; the exact upload folder is {where / PLAN_UPLOAD}, the commit "
            f"{where / PLAN_FILE}; push it with: {plan.retry_command()}")
        return plan
    say(f"pushing {len(plan.files)} files from {plan.output_dir} to {plan.repo_id} "
        f"({'private' if plan.private else 'public'})")
    info = upload(plan)
    url = getattr(info, "commit_url", None) or f"https://huggingface.co/{plan.repo_id}"
    say(f"pushed to https://huggingface.co/{plan.repo_id} (revision {plan.revision or 'main'}): {url}")
    return plan


def push_if_configured(recipe: Recipe) -> PushPlan | None:
    """The recipe's `hub:` section: push the finished stage when `push: true`."""
    hub = recipe.hub
    if not hub.push or not hub.repo_id:
        return None
    return push(recipe.output_dir, hub.repo_id, private=hub.private, revision=hub.revision,
                commit_message=hub.commit_message)


def _push_command(args: argparse.Namespace) -> int:
    if args.plan_dir and not args.dry_run:
        raise PipelineError("--plan-dir: only with --dry-run (a real push uploads straight from the output folder)")
    push(args.output_dir, args.repo_id, private=args.private, revision=args.revision,
         commit_message=args.commit_message, dry_run=args.dry_run, plan_dir=args.plan_dir)
    return 0


def add_commands(subparsers: Any) -> None:
    """`push`."""
    sub = subparsers.add_parser(
        "push", help="push a finished stage's adapter, tokenizer, recipe, metrics and model card to the Hub",
        description="Upload a finished sft/rm/ppo output to a Hub model repo in one commit: adapter, tokenizer, "
                    "recipe.yaml, metrics.json and a model card (lineage, recipe, metrics, data cards, loading "
                    "code). Private by default. The token comes from HF_TOKEN or `hf auth login`.",
        epilog="example: rlhf-pipeline push outputs/smollm2-135m/ppo --repo-id me/smollm2-135m-rlhf --dry-run")
    sub.add_argument("output_dir", help="a finished stage's output folder")
    sub.add_argument("--repo-id", required=True, help="the Hub model repo, e.g. me/smollm2-135m-rlhf")
    visibility = sub.add_mutually_exclusive_group()
    visibility.add_argument("--private", dest="private", action="store_true", default=True,
                            help="create the repo private (the default)")
    visibility.add_argument("--public", dest="private", action="store_false", help="create the repo public")
    sub.add_argument("--revision", help="branch to commit to (created if missing); default main")
    sub.add_argument("--commit-message", help="default: 'rlhf-pipeline <stage> (recipe <fingerprint>)'")
    sub.add_argument("--dry-run", action="store_true",
                     help="write the exact upload folder and commit_plan.json, print the plan, upload nothing")
    sub.add_argument("--plan-dir", help=f"where --dry-run writes the plan (default OUTPUT_DIR/{DEFAULT_PLAN_DIR})")
    sub.set_defaults(handler=_push_command)
