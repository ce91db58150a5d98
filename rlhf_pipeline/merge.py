"""Merging a finished stage's adapter into its base: one model in plain safetensors weights, no PEFT.

    rlhf-pipeline merge outputs/smollm2-135m/ppo --output merged/smollm2-135m-rlhf
    rlhf-pipeline merge outputs/llama-3.1-8b-qlora/sft --output merged/llama-3.1-8b-sft --full-precision

The stage's adapter carries its whole lineage (each stage trains a copy of the one it started from), so
base + that one adapter is the model. `merge` is the only command that folds adapters into weights, and
only into a full-precision base (`models.merged_model`): merging into 4/8-bit weights re-rounds them, so a
QLoRA stage is merged after reloading its base unquantized. Merged weights stay local; `push` uploads the
adapter.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.outputs import (
    ADAPTER_WEIGHTS,
    new_folder,
    read_recipe,
    short_sha,
    shown_path,
    write_json,
)
from rlhf_pipeline.stages import require_model_stage

if TYPE_CHECKING:
    from rlhf_pipeline.recipe import ModelSpec


def _merge_spec(output_dir: Path, recipe: dict[str, Any], full_precision: bool) -> ModelSpec:
    """The stage's own model settings, pointed at its output, without a new LoRA and (if asked) unquantized."""
    import dataclasses

    from rlhf_pipeline.recipe import ModelSpec, QuantizationSpec
    from rlhf_pipeline.schema import build_section

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
    manifest = require_model_stage(output_dir)
    if not manifest.adapter:
        raise PipelineError(f"{output_dir}: holds full weights already (no adapter); load it with from_pretrained")
    recipe, _ = read_recipe(output_dir)
    spec = _merge_spec(output_dir, recipe, full_precision)
    if output.resolve() == output_dir.resolve() or output.resolve().is_relative_to(output_dir.resolve()):
        raise PipelineError(f"--output: {output} is inside the stage output {output_dir}; choose another folder")
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise PipelineError(f"--output: {output} exists and is not empty; choose another folder or pass --overwrite")
    if not is_main_process():
        return output

    from rlhf_pipeline.models import load_base, load_tokenizer, merged_model
    from rlhf_pipeline.sources import resolve_source

    source = resolve_source(spec, progress=say)
    tokenizer = load_tokenizer(source, spec)
    say(f"merge: {source.origin} + the adapter of {output_dir}")
    model = merged_model(load_base(source, spec, tokenizer, task=manifest.task), str(source.adapter))
    with new_folder(output) as scratch:
        model.save_pretrained(scratch, safe_serialization=True)
        tokenizer.save_pretrained(scratch)
        write_json(scratch / "merged_from.json", {
            "stage": manifest.stage, "task": manifest.task, "fingerprint": manifest.fingerprint,
            "base_model": source.origin, "base_revision": source.origin_revision, "full_precision": full_precision,
            "adapter": {"path": shown_path(str(source.adapter)),
                        "sha256": short_sha(Path(str(source.adapter)) / ADAPTER_WEIGHTS)},
            "lineage": [shown_path(stage_dir) for stage_dir in source.lineage[:-1]]})
    loader = "AutoModelForSequenceClassification" if manifest.task == "reward" else "AutoModelForCausalLM"
    say(f"merge: wrote {output} (loads with {loader}.from_pretrained, no PEFT needed)")
    return output


def _merge_command(args: argparse.Namespace) -> int:
    merge(args.output_dir, args.output, full_precision=args.full_precision, overwrite=args.overwrite)
    return 0


def add_commands(subparsers: Any) -> None:
    """`merge`."""
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
