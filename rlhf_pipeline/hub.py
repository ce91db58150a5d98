"""Stage outputs on the Hugging Face Hub: a model card with lineage and data cards, a push plan you can
review, the push itself, and merging an adapter chain into plain weights.

    rlhf-pipeline push outputs/smollm2-135m/ppo --repo-id me/smollm2-135m-rlhf --dry-run
    rlhf-pipeline push outputs/smollm2-135m/ppo --repo-id me/smollm2-135m-rlhf          # private
    rlhf-pipeline merge outputs/smollm2-135m/ppo --output merged/smollm2-135m-rlhf

A push uploads what someone needs to load and judge the model (adapter, tokenizer, resolved recipe,
metrics, card) in one commit. `stage.json` stays local: it is this machine's completion marker, full of
absolute paths, and a downloaded copy would pose as a finished local stage of this machine;
the card's lineage section carries its portable part (Hub id of the base, adapter hashes). Checkpoints
and merged weights stay local too. The token is never read here: huggingface_hub finds it (HF_TOKEN or
the login cache) by itself, and nothing we print or write contains it.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.outputs import MARKER, StageManifest, read_manifest, write_json, write_text_atomic

if TYPE_CHECKING:
    from rlhf_pipeline.recipe import ModelSpec, Recipe

CARD = "README.md"
CARD_MARKER = "<!-- rlhf-pipeline model card: re-rendered on every push; delete this line to keep your edits -->"
PLAN_FILE = "commit_plan.json"
PLAN_UPLOAD = "upload"
DEFAULT_PLAN_DIR = ".push-plan"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

_STAGE_TAGS = {"sft": "sft", "rm": "reward-model", "ppo": "ppo"}
_STAGE_WHAT = {"sft": "supervised fine-tuning (SFT) policy",
               "rm": "reward model (a scalar score head on the SFT model)",
               "ppo": "PPO policy, trained against the reward model and KL-anchored to the SFT policy"}
_LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "rlhf-pipeline")
_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
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
# Hub license identifiers a card's license may map onto; anything else becomes "other".
_HUB_LICENSES = frozenset({
    "apache-2.0", "mit", "bsd-2-clause", "bsd-3-clause", "cc0-1.0", "cc-by-2.0", "cc-by-3.0", "cc-by-4.0",
    "cc-by-sa-3.0", "cc-by-sa-4.0", "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0",
    "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0", "cc-by-nc-nd-4.0", "cdla-permissive-2.0",
    "cdla-sharing-1.0", "gpl-2.0", "gpl-3.0", "lgpl-2.1", "lgpl-3.0", "agpl-3.0", "mpl-2.0", "epl-2.0",
    "odc-by", "odbl", "pddl", "openrail", "openrail++", "unlicense", "wtfpl", "llama2", "llama3", "llama3.1",
    "llama3.2", "llama3.3", "gemma", "other"})
_PEFT_TEMPLATE_TITLE = "# Model Card for Model ID"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_TOKEN_LIKE = re.compile(r"\bhf_[A-Za-z0-9]{8,}")


# ---------------------------------------------------------------------------------------------- helpers


def redact(text: str) -> str:
    """Blank anything shaped like a Hugging Face token, so no message or card can carry one."""
    return _TOKEN_LIKE.sub("hf_***", text)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _short_sha(path: Path) -> str:
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


def is_hub_id(name: str) -> bool:
    """A Hub repo id (not a folder on this machine): what a card's `base_model` may name."""
    return bool(_HUB_ID.match(name)) and not Path(name).expanduser().exists()


def _require_model_stage(output_dir: Path) -> StageManifest:
    manifest = read_manifest(output_dir)
    if manifest is None:
        raise PipelineError(f"{output_dir}: no finished stage here (no {MARKER}); run the stage, or let it "
                            "finish, before pushing or merging it")
    if manifest.stage not in _STAGE_TAGS:
        raise PipelineError(f"{output_dir}: holds a finished '{manifest.stage}' stage, which has no model; "
                            f"push or merge an output of {', '.join(_STAGE_TAGS)}")
    return manifest


def _read_recipe(output_dir: Path) -> tuple[dict[str, Any], str]:
    path = output_dir / "recipe.yaml"
    if not path.is_file():
        raise PipelineError(f"{path}: missing; a finished stage keeps its resolved recipe there")
    text = path.read_text(encoding="utf-8")
    return yaml.safe_load(text) or {}, text


def _recipe_output_dir(recipe: dict[str, Any], fallback: Path) -> str:
    """The stage's real output folder (a card may be rendered in a scratch folder before the rename)."""
    for section in recipe.values():
        if isinstance(section, dict) and isinstance(section.get("output_dir"), str):
            return section["output_dir"]
    return str(fallback)


# ------------------------------------------------------------------------------------------- model card


@dataclass
class _DataSummary:
    ref: str
    card: Any | None  # rlhf_pipeline.data.cards.DataCard, or None when the card is not found from here
    problem: str = ""


def _data_summaries(recipe: dict[str, Any], recipe_path: Path) -> list[_DataSummary]:
    """The recipe's data cards, looked up the way the stage looked them up."""
    from rlhf_pipeline.data.cards import find_card, load_card

    data = recipe.get("data") or {}
    refs = [*(data.get("train") or []), *(data.get("eval") or [])]
    summaries = []
    for ref in dict.fromkeys(refs):
        try:
            summaries.append(_DataSummary(ref, load_card(find_card(ref, recipe_path))))
        except PipelineError as err:
            summaries.append(_DataSummary(ref, None, str(err)))
    return summaries


def _card_license(origin: str, summaries: list[_DataSummary]) -> str:
    """One Hub license id when the data cards (and the base, when we know its license) agree, else other."""
    from rlhf_pipeline.embedded import EMBEDDED_MODELS

    licenses = {s.card.license.strip().lower() for s in summaries if s.card is not None}
    licenses |= {spec.license.lower() for spec in EMBEDDED_MODELS.values() if spec.origin == origin}
    if len(licenses) == 1:
        (only,) = licenses
        return only if only in _HUB_LICENSES else "other"
    return "other"


def _front_matter(manifest: StageManifest, origin: str, summaries: list[_DataSummary]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if is_hub_id(origin):
        meta["base_model"] = origin
        meta["base_model_relation"] = "adapter" if manifest.adapter else "finetune"
    meta["library_name"] = "peft" if manifest.adapter else "transformers"
    meta["pipeline_tag"] = "text-classification" if manifest.task == "reward" else "text-generation"
    meta["license"] = _card_license(origin, summaries)
    meta["tags"] = ["rlhf", "trl", *(["peft", "lora"] if manifest.adapter else []), _STAGE_TAGS[manifest.stage]]
    datasets = [s.card.source.hub_id for s in summaries if s.card is not None and s.card.source.hub_id]
    if datasets:
        meta["datasets"] = list(dict.fromkeys(datasets))
    return meta


def _lineage(manifest: StageManifest, here: str, repo: str, adapter_file: Path) -> list[tuple[str, str, str]]:
    """(role, where, short sha256 of the adapter) from the base to this stage."""
    base = manifest.base_model
    origin = base.get("origin", base.get("path", "?"))
    revision = base.get("origin_revision")
    where = f"{origin}" + (f" (revision {revision})" if revision and revision != "main" else "")
    if not is_hub_id(origin):
        where = f"{shown_path(origin)} (a local folder, not on the Hub)"
    rows = [("base model", where, "—")]
    for stage_dir in manifest.lineage:
        earlier = read_manifest(Path(stage_dir))
        stage = earlier.stage if earlier else "earlier"
        rows.append((f"{stage} adapter (this one started as a copy of it; not needed to load this model)",
                     shown_path(stage_dir), _short_sha(Path(stage_dir) / ADAPTER_WEIGHTS)))
    reward_model = manifest.extra.get("reward_model")
    if reward_model:
        rows.append(("reward model (scored the PPO rollouts; not part of these weights)", shown_path(reward_model),
                     _short_sha(Path(reward_model) / ADAPTER_WEIGHTS)))
    this = "adapter" if manifest.adapter else "weights"
    shown_here = shown_path(here)
    rows.append((f"{manifest.stage} {this} (this model)",
                 shown_here if repo in (shown_here, shown_path(here, home=False)) else f"{repo} (from {shown_here})",
                 _short_sha(adapter_file) if manifest.adapter else "—"))
    return rows


def _scalar_metrics(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Scalar metrics with dotted names (nested dicts flattened, lists and log_history left out)."""
    rows: list[tuple[str, Any]] = []
    for key, value in metrics.items():
        if key == "log_history":
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(_scalar_metrics(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)) or value is None:
            rows.append((name, value))
    return rows


def _format_value(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str) and os.path.isabs(value):
        return f"`{shown_path(value)}`"
    return str(value).replace("|", "\\|")


def _end_of_turn_token(folder: Path) -> str:
    """The token that closes an assistant turn in this tokenizer's chat template (for the RM snippet)."""
    from transformers import AutoTokenizer

    from rlhf_pipeline.chat import end_of_turn_id

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer))


def _loading_snippet(manifest: StageManifest, repo: str, revision: str | None, folder: Path) -> str:
    """Python that loads the model on its plain base: this stage's adapter alone carries its whole lineage."""
    base = manifest.base_model
    origin = base.get("origin", base.get("path"))
    base_revision = base.get("origin_revision")
    reward = manifest.task == "reward"
    model_class = "AutoModelForSequenceClassification" if reward else "AutoModelForCausalLM"
    repo_kw = f", revision={revision!r}" if revision else ""
    labels_kw = ", num_labels=1" if reward else ""
    base_kw = (f", revision={base_revision!r}" if base_revision and base_revision != "main" else "") + labels_kw
    lines = ["import torch"] if reward else []
    if not manifest.adapter:  # a full fine-tune: the weights are the model
        lines += [f"from transformers import {model_class}, AutoTokenizer", "", f"MODEL = {repo!r}",
                  f"tokenizer = AutoTokenizer.from_pretrained(MODEL{repo_kw})",
                  f"model = {model_class}.from_pretrained(MODEL{repo_kw}{labels_kw}).eval()"]
    else:
        lines += ["from peft import PeftModel", f"from transformers import {model_class}, AutoTokenizer", "",
                  f"BASE = {origin!r}", f"ADAPTER = {repo!r}", "",
                  f"tokenizer = AutoTokenizer.from_pretrained(ADAPTER{repo_kw})",
                  f"model = {model_class}.from_pretrained(BASE{base_kw})",
                  "if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:",
                  "    model.resize_token_embeddings(len(tokenizer))",
                  "model.config.pad_token_id = tokenizer.pad_token_id",
                  f"model = PeftModel.from_pretrained(model, ADAPTER{repo_kw}).eval()"]
    lines.append("")
    if reward:
        lines += ["# Scored the way the pipeline scores: prompt up to the assistant turn, answer, end-of-turn.",
                  f"END_OF_TURN = {_end_of_turn_token(folder)!r}",
                  'prompt = [{"role": "user", "content": "Describe a rainy Monday."}]',
                  'answer = "Cosy blankets, warm tea and the sound of rain on the window: lovely!"',
                  "ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)",
                  'ids = list(ids["input_ids"]) + tokenizer(answer, add_special_tokens=False)["input_ids"]',
                  "ids.append(tokenizer.convert_tokens_to_ids(END_OF_TURN))",
                  "with torch.no_grad():",
                  "    reward = model(input_ids=torch.tensor([ids])).logits[0, 0].item()",
                  'print(f"reward: {reward:.3f}")']
    else:
        lines += ['messages = [{"role": "user", "content": "Describe a rainy Monday."}]',
                  "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",",
                  "                                       return_dict=True)",
                  "output = model.generate(**inputs, max_new_tokens=64, do_sample=False)",
                  'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))']
    return "\n".join(lines)


def _data_section(summaries: list[_DataSummary]) -> list[str]:
    if not summaries:
        return ["No data cards are named in the recipe."]
    out: list[str] = []
    for summary in summaries:
        card = summary.card
        if card is None:
            out += [f"### {summary.ref}", "", f"The card was not found from here ({summary.problem}).", ""]
            continue
        source = card.source
        if source.hub_id:
            where = (f"[{source.hub_id}](https://huggingface.co/datasets/{source.hub_id})"
                     + (f", subset {source.subset}" if source.subset else "")
                     + f", revision {source.revision}, split {source.split}")
        else:
            where = f"local file `{source.path}` (relative to its card)"
        size = ", ".join(f"{k}: {v}" for k, v in card.size.items()) if card.size else "not stated"
        out += [f"### {card.name}", "", card.description.strip(), "",
                f"- source: {where}", f"- format: {card.format}", f"- license: {card.license}",
                f"- size: {size}", f"- stages: {', '.join(card.stages)}",
                f"- known issues: {(card.known_issues or 'none recorded').strip()}", ""]
    return out


def _library_versions() -> list[tuple[str, str]]:
    versions = []
    for name in _LIBRARIES:
        try:
            versions.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            versions.append((name, "not installed"))
    return versions


def render_model_card(output_dir: str | Path, manifest: StageManifest | None = None, *, repo_id: str | None = None,
                      revision: str | None = None, recipe_path: str | Path | None = None,
                      recipe: dict[str, Any] | None = None) -> str:
    """The README.md of a finished stage: Hub front matter, lineage, recipe, metrics, data, versions, usage.

    `repo_id` is what the snippet loads (default: the recipe's hub.repo_id, else the local folder);
    `recipe_path` is where the stage's recipe lived, so its data cards are found the same way (default:
    looked up from the output folder and the working directory). `recipe` (the resolved recipe) and the
    manifest's metrics stand in for recipe.yaml and metrics.json before those are written.
    """
    folder = Path(output_dir)
    manifest = manifest or _require_model_stage(folder)
    if recipe is None:
        recipe, recipe_text = _read_recipe(folder)
    else:
        recipe_text = yaml.safe_dump(recipe, sort_keys=False)
    metrics_path = folder / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else manifest.metrics
    here = _recipe_output_dir(recipe, folder)
    hub = recipe.get("hub") or {}
    if repo_id is None and hub.get("repo_id"):  # the card of a stage that its recipe pushes
        repo_id, revision = hub["repo_id"], hub.get("revision")
    repo = repo_id or shown_path(here, home=False)
    origin = manifest.base_model.get("origin", manifest.base_model.get("path", ""))
    summaries = _data_summaries(recipe, Path(recipe_path) if recipe_path else Path(here) / "recipe.yaml")
    meta = _front_matter(manifest, origin, summaries)
    front = yaml.safe_dump(meta, sort_keys=False).strip()
    kind = "LoRA adapter" if manifest.adapter else "fine-tuned model"
    base_link = f"[{origin}](https://huggingface.co/{origin})" if is_hub_id(origin) else f"`{shown_path(origin)}`"
    title = repo_id or f"{manifest.stage} {'adapter' if manifest.adapter else 'model'} ({shown_path(here)})"
    lines = ["---", front, "---", CARD_MARKER, "", f"# {title}", "",
             f"A {kind} for {base_link}: the {_STAGE_WHAT[manifest.stage]}. Trained with rlhf_pipeline "
             f"(stage `{manifest.stage}`, recipe fingerprint `{manifest.fingerprint}`).", "",
             "## Lineage", "", "| step | where | adapter sha256 |", "|---|---|---|"]
    lines += [f"| {role} | {where} | `{sha}` |" for role, where, sha in
              _lineage(manifest, here, repo, folder / ADAPTER_WEIGHTS)]
    if manifest.lineage and manifest.adapter:
        lines += ["", "Each stage trains a copy of the previous stage's adapter, so this adapter alone, on the base "
                  "model, is the whole model (see *Use* below)."]
    stats = manifest.extra.get("reward_stats")
    if stats:
        lines += ["", f"Reward statistics over the training answers (PPO normalises scores with them): "
                  f"mean {stats.get('mean', 0):.4g}, std {stats.get('std', 1):.4g}."]
    lines += ["", "## Use", "", "```python", _loading_snippet(manifest, repo, revision, folder), "```", ""]
    lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {_format_value(value)} |" for name, value in _scalar_metrics(metrics)]
    lines += ["", "## Data", "", *_data_section(summaries)]
    licenses = sorted({f"{s.card.license} ({s.card.name})" for s in summaries if s.card is not None})
    lines += [f"License in the metadata: `{meta['license']}`, from the data "
              f"cards ({', '.join(licenses) or 'none'}) and the base model's license when known; check the base "
              "model's own license too.", ""]
    lines += ["## Recipe", "", "The resolved recipe the stage ran (`recipe.yaml`):", "", "```yaml",
              recipe_text.rstrip(), "```", ""]
    lines += ["## Library versions", "", "| library | version |", "|---|---|"]
    lines += [f"| {name} | {version} |" for name, version in _library_versions()]
    return redact("\n".join(lines) + "\n")


def write_model_card(output_dir: str | Path, manifest: StageManifest | None = None, *, repo_id: str | None = None,
                     revision: str | None = None, recipe_path: str | Path | None = None,
                     recipe: dict[str, Any] | None = None) -> Path:
    """Write README.md into a stage output folder (or the scratch folder `finish` is about to move in)."""
    path = Path(output_dir) / CARD
    write_text_atomic(path, render_model_card(output_dir, manifest, repo_id=repo_id, revision=revision,
                                              recipe_path=recipe_path, recipe=recipe))
    return path


# ------------------------------------------------------------------------------------------------- push


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


def _is_generated_card(text: str) -> bool:
    """Our card, or the blank template PEFT's save_pretrained leaves (in outputs older than our cards)."""
    return CARD_MARKER in text or _PEFT_TEMPLATE_TITLE in text


def plan_push(output_dir: str | Path, repo_id: str, *, private: bool = True, revision: str | None = None,
              commit_message: str | None = None) -> PushPlan:
    """Decide what a push commits: files, sizes, hashes, the card rendered for this repo and revision.

    The card is re-rendered (with the repo id in its snippet) unless the local README.md was edited
    and its marker line removed, in which case it is uploaded as it is.
    """
    output_dir = Path(output_dir)
    manifest = _require_model_stage(output_dir)
    _validate_repo_id(repo_id)
    if revision is not None and not revision.strip():
        raise PipelineError("--revision: give a branch name, or leave it out for main")
    chosen, left = _select_files(output_dir, manifest)
    files = [PlannedFile(path.name, path.stat().st_size, file_sha256(path), source=path) for path in chosen]
    local_card = output_dir / CARD
    if local_card.is_file() and not _is_generated_card(local_card.read_text(encoding="utf-8")):
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
    plan_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=plan_dir.parent, prefix=f".{plan_dir.name}.tmp-"))
    try:
        upload = scratch / PLAN_UPLOAD
        upload.mkdir()
        for planned in plan.files:
            if planned.content is not None:
                (upload / planned.path_in_repo).write_bytes(planned.content)
            else:
                shutil.copy2(planned.source, upload / planned.path_in_repo)
        write_json(scratch / PLAN_FILE, plan.as_dict())
        if plan_dir.exists():
            old = plan_dir.with_name(f".{plan_dir.name}.old-{os.getpid()}")
            os.replace(plan_dir, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(scratch, plan_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return plan_dir


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def upload(plan: PushPlan) -> Any:
    """Create the repo (private unless asked otherwise), the branch if any, and commit the planned files.

    Any failure of the Hub API becomes a PipelineError with the command that retries; nothing local is
    changed either way (the card goes up from memory, the other files straight from the output folder).
    """
    retry = plan.retry_command()
    if _hub_offline():
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


# ------------------------------------------------------------------------------------------------ merge


def _merge_spec(output_dir: Path, recipe: dict[str, Any], full_precision: bool) -> ModelSpec:
    """The stage's own model settings, pointed at its output, without a new LoRA and (if asked) unquantized."""
    import dataclasses

    from rlhf_pipeline.recipe import ModelSpec, QuantizationSpec, build_section

    recipe_file = output_dir / "recipe.yaml"
    spec: ModelSpec = build_section(ModelSpec, recipe.get("model") or {}, recipe_file, "model")
    quant = spec.quantization
    if quant.enabled and not full_precision:
        key = "load_in_4bit" if quant.load_in_4bit else "load_in_8bit"
        raise PipelineError(
            f"{recipe_file}: model.quantization.{key}: this stage trained its LoRA on a "
            f"{'4' if quant.load_in_4bit else '8'}-bit base; merging into quantized weights re-rounds them and "
            "the result needs bitsandbytes to load. Reload the base in full precision and merge there: "
            f"rlhf-pipeline merge {shlex.quote(str(output_dir))} --output OUT --full-precision "
            "(outputs differ slightly from the quantized model's, whose LoRA learned the 4/8-bit rounding)")
    return dataclasses.replace(spec, name_or_path=str(output_dir), lora=None, chat_template=None,
                               quantization=QuantizationSpec())


def merge(output_dir: str | Path, output: str | Path, *, full_precision: bool = False,
          overwrite: bool = False) -> Path:
    """Base + the stage's adapter (its whole lineage) folded into plain safetensors weights, written atomically.

    The result loads with `AutoModelForCausalLM.from_pretrained(output)` (AutoModelForSequenceClassification
    for a reward model) without PEFT.
    """
    from rlhf_pipeline.distributed import is_main_process, say

    output_dir, output = Path(output_dir), Path(output)
    manifest = _require_model_stage(output_dir)
    if not manifest.adapter:
        raise PipelineError(f"{output_dir}: holds full weights already (no adapter); load it with from_pretrained")
    recipe, _ = _read_recipe(output_dir)
    spec = _merge_spec(output_dir, recipe, full_precision)
    if output.resolve() == output_dir.resolve() or output.resolve().is_relative_to(output_dir.resolve()):
        raise PipelineError(f"--output: {output} is inside the stage output {output_dir}; choose another folder")
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise PipelineError(f"--output: {output} exists and is not empty; choose another folder or pass --overwrite")
    if not is_main_process():
        return output

    from rlhf_pipeline.models import load_base, load_tokenizer, merged_model, resolve_source

    source = resolve_source(spec, progress=say)
    tokenizer = load_tokenizer(source, spec)
    say(f"merge: {source.origin} + the adapter of {output_dir}")
    model = merged_model(load_base(source, spec, tokenizer, task=manifest.task), str(source.adapter))
    output.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.tmp-"))
    try:
        model.save_pretrained(scratch, safe_serialization=True)
        tokenizer.save_pretrained(scratch)
        write_json(scratch / "merged_from.json", {
            "stage": manifest.stage, "task": manifest.task, "fingerprint": manifest.fingerprint,
            "base_model": source.origin, "base_revision": source.origin_revision, "full_precision": full_precision,
            "adapter": {"path": shown_path(str(source.adapter)),
                        "sha256": _short_sha(Path(str(source.adapter)) / ADAPTER_WEIGHTS)},
            "lineage": [shown_path(stage_dir) for stage_dir in source.lineage[:-1]]})
        if output.exists():
            old = output.with_name(f".{output.name}.old-{os.getpid()}")
            os.replace(output, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(scratch, output)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    loader = "AutoModelForSequenceClassification" if manifest.task == "reward" else "AutoModelForCausalLM"
    say(f"merge: wrote {output} (loads with {loader}.from_pretrained, no PEFT needed)")
    return output


# -------------------------------------------------------------------------------------------------- CLI


def _push_command(args: argparse.Namespace) -> int:
    if args.plan_dir and not args.dry_run:
        raise PipelineError("--plan-dir: only with --dry-run (a real push uploads straight from the output folder)")
    push(args.output_dir, args.repo_id, private=args.private, revision=args.revision,
         commit_message=args.commit_message, dry_run=args.dry_run, plan_dir=args.plan_dir)
    return 0


def _merge_command(args: argparse.Namespace) -> int:
    merge(args.output_dir, args.output, full_precision=args.full_precision, overwrite=args.overwrite)
    return 0


def add_commands(subparsers: Any) -> None:
    """`push` and `merge`."""
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

    sub = subparsers.add_parser(
        "merge", help="merge base + a finished stage's adapter into plain safetensors weights",
        description="Fold a finished stage's adapter (which carries its whole lineage, e.g. SFT then PPO) into the "
                    "base in full precision: one model that loads with from_pretrained without PEFT; written "
                    "atomically with the tokenizer.",
        epilog="example: rlhf-pipeline merge outputs/smollm2-135m/ppo --output merged/smollm2-135m-rlhf")
    sub.add_argument("output_dir", help="a finished sft/rm/ppo output folder")
    sub.add_argument("--output", required=True, help="folder for the merged model")
    sub.add_argument("--full-precision", action="store_true",
                     help="reload a 4/8-bit (QLoRA) base unquantized and merge there")
    sub.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    sub.set_defaults(handler=_merge_command)
