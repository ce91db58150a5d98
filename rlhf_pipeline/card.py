"""The model card (README.md) every finished sft/rm/ppo stage writes and every push uploads.

The Hub metadata is huggingface_hub's `ModelCardData`, and the body is the package's
`templates/model_card.md` filled by `ModelCard.from_template`, so the front matter is the library's YAML,
not ours. The card says what someone needs to load and judge the model away from this machine: the
lineage with adapter hashes, reward statistics, loading code (tests run it), metrics, data cards, the
license note, the resolved recipe and library versions. A push re-renders the card unless the user
deleted its marker line; anything shaped like a token is blanked.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.outputs import (
    ADAPTER_WEIGHTS,
    StageManifest,
    read_manifest,
    read_recipe,
    short_sha,
    shown_path,
    write_text_atomic,
)
from rlhf_pipeline.sources import is_hub_id
from rlhf_pipeline.stages import get_stage, require_model_stage

if TYPE_CHECKING:
    from huggingface_hub import ModelCardData

CARD = "README.md"
CARD_MARKER = "<!-- rlhf-pipeline model card: re-rendered on every push; delete this line to keep your edits -->"
TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"

_LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "rlhf-pipeline")
# Hub license identifiers a card's license may map onto; anything else becomes "other".
_HUB_LICENSES = frozenset({
    "apache-2.0", "mit", "bsd-2-clause", "bsd-3-clause", "cc0-1.0", "cc-by-2.0", "cc-by-3.0", "cc-by-4.0",
    "cc-by-sa-3.0", "cc-by-sa-4.0", "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0",
    "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0", "cc-by-nc-nd-4.0", "cdla-permissive-2.0",
    "cdla-sharing-1.0", "gpl-2.0", "gpl-3.0", "lgpl-2.1", "lgpl-3.0", "agpl-3.0", "mpl-2.0", "epl-2.0",
    "odc-by", "odbl", "pddl", "openrail", "openrail++", "unlicense", "wtfpl", "llama2", "llama3", "llama3.1",
    "llama3.2", "llama3.3", "gemma", "other"})
_PEFT_TEMPLATE_TITLE = "# Model Card for Model ID"
_TOKEN_LIKE = re.compile(r"\bhf_[A-Za-z0-9]{8,}")


def redact(text: str) -> str:
    """Blank anything shaped like a Hugging Face token, so no message or card can carry one."""
    return _TOKEN_LIKE.sub("hf_***", text)


def is_generated_card(text: str) -> bool:
    """Our card, or the blank template PEFT's save_pretrained leaves (in outputs older than our cards):
    either is re-rendered on push; a card without both is the user's and is uploaded as it is."""
    return CARD_MARKER in text or _PEFT_TEMPLATE_TITLE in text


def _recipe_output_dir(recipe: dict[str, Any], fallback: Path) -> str:
    """The stage's real output folder (a card may be rendered in a scratch folder before the rename)."""
    for section in recipe.values():
        if isinstance(section, dict) and isinstance(section.get("output_dir"), str):
            return section["output_dir"]
    return str(fallback)


@dataclass
class _DataSummary:
    ref: str
    card: Any | None  # rlhf_pipeline.data.cards.DataCard, or None when the card is not found from here
    problem: str = ""


def _data_summaries(recipe: dict[str, Any], recipe_path: Path) -> list[_DataSummary]:
    """The recipe's data cards, looked up the way the stage looked them up."""
    from rlhf_pipeline.data.cards import find_card, load_card

    data = recipe.get("data") or {}
    refs = [entry["card"] if isinstance(entry, dict) else entry  # a mixture entry names its card
            for entry in [*(data.get("train") or []), *(data.get("eval") or [])]]
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


def _card_data(manifest: StageManifest, origin: str, summaries: list[_DataSummary]) -> ModelCardData:
    """The Hub metadata: base model and relation (for a Hub base only), library, task, license, tags, datasets."""
    from huggingface_hub import ModelCardData

    hub_base = is_hub_id(origin)
    datasets = [s.card.source.hub_id for s in summaries if s.card is not None and s.card.source.hub_id]
    return ModelCardData(
        base_model=origin if hub_base else None,
        library_name="peft" if manifest.adapter else "transformers",
        pipeline_tag="text-classification" if manifest.task == "reward" else "text-generation",
        license=_card_license(origin, summaries),
        tags=["rlhf", "trl", *(["peft", "lora"] if manifest.adapter else []), get_stage(manifest.stage).model.tag],
        datasets=list(dict.fromkeys(datasets)) or None,
        base_model_relation=("adapter" if manifest.adapter else "finetune") if hub_base else None)


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
                     shown_path(stage_dir), short_sha(Path(stage_dir) / ADAPTER_WEIGHTS)))
    reward_model = manifest.extra.get("reward_model")
    if reward_model:
        rows.append(("reward model (scored the PPO rollouts; not part of these weights)", shown_path(reward_model),
                     short_sha(Path(reward_model) / ADAPTER_WEIGHTS)))
    this = "adapter" if manifest.adapter else "weights"
    shown_here = shown_path(here)
    rows.append((f"{manifest.stage} {this} (this model)",
                 shown_here if repo in (shown_here, shown_path(here, home=False)) else f"{repo} (from {shown_here})",
                 short_sha(adapter_file) if manifest.adapter else "—"))
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
    if manifest.extra.get("objective") == "process":
        lines += _process_snippet(_end_of_turn_token(folder))
    elif reward:
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


def _process_snippet(end_of_turn: str) -> list[str]:
    """A process reward model's use: σ(score) at the token that ends each step (a line break; the last step's is
    the end-of-turn token), read from the head's output at every token."""
    return ["# A process reward model: P(step right) = σ(score) at the token that ends each step.",
            f"END_OF_TURN = {end_of_turn!r}",
            'problem = "Tom has 23 apples. He buys 18 more. Then he gives away 17. How many apples does Tom have now?"',
            'answer = "23 + 18 = 41\\n41 - 17 = 24\\nThe answer is 24."',
            'chat = [{"role": "user", "content": problem}]',
            "prompt_ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)",
            'prompt_ids = prompt_ids["input_ids"]',
            "ids, start = list(prompt_ids), len(prompt_ids)",
            'ids += tokenizer(answer, add_special_tokens=False)["input_ids"]',
            "ids.append(tokenizer.convert_tokens_to_ids(END_OF_TURN))",
            "caught = {}",
            "model.score.register_forward_hook(lambda module, args, output: caught.update(scores=output))",
            "with torch.no_grad():",
            "    model(input_ids=torch.tensor([ids]))",
            'ends = [i for i in range(start, len(ids) - 1) if "\\n" in tokenizer.decode([ids[i]])] + [len(ids) - 1]',
            'probabilities = [torch.sigmoid(caught["scores"][0, i, 0]).item() for i in ends]',
            'print("P(step right):", [round(p, 3) for p in probabilities])']


def _used(sources: list[dict[str, Any]], name: str) -> str:
    """What the stage took from one card of a mixture (the data report's `sources`), or nothing."""
    parts = []
    for source in sources:
        if source.get("card") != name:
            continue
        options = ", ".join(f"{key} {source[key]}" for key in ("weight", "max_rows", "fraction") if key in source)
        splits = ", ".join(f"{split} {source[f'{split}_rows']}" for split in ("train", "eval")
                           if source.get(f"{split}_rows"))
        parts.append(f"{source.get('rows_taken', 0)} of its {source.get('rows_kept', 0)} usable rows"
                     + (f" ({options})" if options else "") + (f": {splits}" if splits else ""))
    return "; ".join(parts)


def _data_entry(summary: _DataSummary, sources: list[dict[str, Any]]) -> dict[str, str]:
    """One data card as the template's Data section lists it (or why it could not be read), with what the stage
    used of it when it was one of a mixture."""
    card = summary.card
    if card is None:
        return {"title": summary.ref, "problem": summary.problem}
    source = card.source
    if source.hub_id:
        where = (f"[{source.hub_id}](https://huggingface.co/datasets/{source.hub_id})"
                 + (f", subset {source.subset}" if source.subset else "")
                 + f", revision {source.revision}, split {source.split}")
    else:
        where = f"local file `{source.path}` (relative to its card)"
    return {"title": card.name, "description": card.description.strip(), "source": where, "format": card.format,
            "license": card.license,
            "size": ", ".join(f"{k}: {v}" for k, v in card.size.items()) if card.size else "not stated",
            "stages": ", ".join(card.stages), "known_issues": (card.known_issues or "none recorded").strip(),
            "used": _used(sources, card.name)}


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
    from huggingface_hub import ModelCard

    folder = Path(output_dir)
    manifest = manifest or require_model_stage(folder)
    if recipe is None:
        recipe, recipe_text = read_recipe(folder)
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
    stats = manifest.extra.get("reward_stats")
    card = ModelCard.from_template(
        _card_data(manifest, origin, summaries), template_path=str(TEMPLATE), marker=CARD_MARKER,
        title=repo_id or f"{manifest.stage} {'adapter' if manifest.adapter else 'model'} ({shown_path(here)})",
        kind="LoRA adapter" if manifest.adapter else "fine-tuned model",
        base_link=f"[{origin}](https://huggingface.co/{origin})" if is_hub_id(origin) else f"`{shown_path(origin)}`",
        stage=manifest.stage, stage_what=get_stage(manifest.stage).model.what, fingerprint=manifest.fingerprint,
        lineage=_lineage(manifest, here, repo, folder / ADAPTER_WEIGHTS),
        continued=bool(manifest.lineage and manifest.adapter),
        reward_stats={"mean": f"{stats.get('mean', 0):.4g}", "std": f"{stats.get('std', 1):.4g}"} if stats else None,
        snippet=_loading_snippet(manifest, repo, revision, folder),
        metrics=[(name, _format_value(value)) for name, value in _scalar_metrics(metrics)],
        data_cards=[_data_entry(summary, (metrics.get("data") or {}).get("sources") or []) for summary in summaries],
        data_licenses=", ".join(sorted({f"{s.card.license} ({s.card.name})" for s in summaries
                                        if s.card is not None})) or "none",
        recipe_text=recipe_text.rstrip(), libraries=_library_versions())
    return redact(str(card))


def write_model_card(output_dir: str | Path, manifest: StageManifest | None = None, *, repo_id: str | None = None,
                     revision: str | None = None, recipe_path: str | Path | None = None,
                     recipe: dict[str, Any] | None = None) -> Path:
    """Write README.md into a stage output folder (or the scratch folder `finish` is about to move in)."""
    path = Path(output_dir) / CARD
    write_text_atomic(path, render_model_card(output_dir, manifest, repo_id=repo_id, revision=revision,
                                              recipe_path=recipe_path, recipe=recipe))
    return path
