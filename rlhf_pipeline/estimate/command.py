"""From a recipe and the command line's hardware to an estimate, and from the estimate to what is printed."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.estimate.architecture import Architecture, find_config
from rlhf_pipeline.estimate.memory import GIB, Estimate, Setup, estimate
from rlhf_pipeline.estimate.verdict import Change, cheapest_fix
from rlhf_pipeline.stages import get_stage

if TYPE_CHECKING:
    from rlhf_pipeline.recipe import Recipe

_UNITS = {"": GIB, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
          "G": GIB, "GB": GIB, "GIB": GIB, "T": 2**40, "TB": 2**40, "TIB": 2**40}


# ------------------------------------------------------------------------------------ from a recipe

def parse_memory(text: str) -> float:
    """'80GB', '24 GiB', '512MB' → bytes; GB means GiB, as GPU memory sizes are quoted."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS:
        raise PipelineError(f"--gpu-memory: cannot read '{text}'; write e.g. 24GB, 80GB or 40GiB")
    return float(match.group(1)) * _UNITS[unit]


def _total_ram() -> float:
    try:
        text = Path("/proc/meminfo").read_text()
        return int(re.search(r"MemTotal:\s+(\d+)", text).group(1)) * 1024
    except (OSError, AttributeError):
        return 16 * GIB


def _accelerate_file(path: str) -> dict[str, Any]:
    """num_processes, ZeRO stage and offload from an accelerate config file."""
    import yaml

    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    deepspeed = data.get("deepspeed_config") or {}
    found: dict[str, Any] = {"num_devices": int(data.get("num_processes") or 1)}
    if data.get("distributed_type") == "DEEPSPEED":
        found["zero"] = int(deepspeed.get("zero_stage", 0))
        found["offload_optimizer"] = deepspeed.get("offload_optimizer_device", "none") not in (None, "none")
        found["offload_params"] = deepspeed.get("offload_param_device", "none") not in (None, "none")
    return found


def setup_from_recipe(recipe: Recipe, device: str = "gpu", num_devices: int = 1, device_memory: float | None = None,
                      zero: int = 0, offload: str = "none", base: str | None = None) -> Setup:
    """The estimate's inputs from a validated recipe plus the hardware described on the command line."""
    spec, config = recipe.model, recipe.config
    name = base or spec.name_or_path
    model_config, where = find_config(name, spec.revision)
    arch = Architecture.from_config(model_config, where)
    dtype = spec.dtype if spec.dtype != "auto" else ("bfloat16" if device == "gpu" else "float32")
    explicit = config.get("activation_checkpointing", config.get("gradient_checkpointing"))
    quant = spec.quantization
    quantization = "4bit" if quant.load_in_4bit else ("8bit" if quant.load_in_8bit else None)
    stage = get_stage(recipe.stage)
    kind = stage.memory.kind
    if kind == "ppo":  # only QLoRA preparation turns it on for the policy
        checkpointing = bool(quantization) and device == "gpu"
    else:
        checkpointing = bool(explicit) if explicit is not None else device == "gpu"
    lora = spec.lora
    micro = int(config.get("per_device_train_batch_size", stage.config_default("per_device_train_batch_size") or 8))
    seq = recipe.data.max_length
    extra: dict[str, Any] = {}
    if kind == "ppo":
        response = int(config.get("response_length", 53))
        prompt = int(config.get("max_prompt_length") or recipe.data.max_length)
        accum, minis = int(config.get("gradient_accumulation_steps", 1)), int(config.get("num_mini_batches", 1))
        seq = prompt + response
        extra = {"response_length": response, "rollout_batch": micro * accum * minis,
                 "forward_chunk": int(config.get("local_rollout_forward_batch_size", 16))}
    elif kind == "sample":
        micro = int(config.get("batch_size", 16))  # sequences per generate call (prompts × samples, in rows)
        seq += int(config.get("max_new_tokens", 48))
        lora = None  # sampling from finished stages: no new adapter
    return Setup(
        stage=recipe.stage, arch=arch, device=device, num_devices=num_devices,
        device_memory=device_memory or (_total_ram() if device == "cpu" else 80 * GIB), dtype=dtype,
        mixed_precision=device == "gpu" and (dtype != "float32" or bool(config.get("bf16") or config.get("fp16"))),
        quantization=quantization, double_quant=quant.bnb_4bit_use_double_quant,
        lora_r=lora.r if lora else None, lora_targets=lora.target_modules if lora else "all-linear",
        lora_layers=tuple(lora.layers_to_transform) if lora and lora.layers_to_transform else None,
        lora_dropout=lora.lora_dropout if lora else 0.0,
        modules_to_save=tuple(lora.modules_to_save or ()) if lora else (),
        micro_batch=micro, grad_accum=int(config.get("gradient_accumulation_steps", 1)), seq_len=seq,
        checkpointing=checkpointing, attn=spec.attn_implementation or "sdpa",
        packing=bool(config.get("packing") or config.get("padding_free")), zero=zero,
        offload_optimizer=offload in ("optimizer", "all"), offload_params=offload == "all", **extra,
    )


def load_for_estimate(recipe_path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Validate the recipe; data cards that an earlier stage has not written yet are not needed here."""
    from rlhf_pipeline.stages import load_recipe

    return load_recipe(recipe_path, overrides or [], pending_outputs=[Path("/")])


def estimate_recipe(recipe_path: str | Path, overrides: list[str] | None = None, device: str = "gpu",
                    num_devices: int = 1, device_memory: float | None = None, zero: int = 0,
                    offload: str = "none", base: str | None = None) -> Estimate:
    """The estimate for a recipe file (what the command prints), for scripts and tests."""
    setup = setup_from_recipe(load_for_estimate(recipe_path, overrides), device, num_devices, device_memory,
                              zero, offload, base)
    return estimate(setup)


# ----------------------------------------------------------------------------------------- command

def _gib(value: float) -> str:
    return f"{value / GIB:8.2f}"


def render(result: Estimate, fix: tuple[list[Change], Estimate] | None) -> str:
    setup = result.setup
    params = setup.arch.total_params()
    size = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"
    lines = [f"model: {setup.arch.model_type}, {size} params "
             f"(config: {setup.arch.source})", setup.describe(), "",
             f"{'component':<48} {'GiB':>8}  how"]
    for row in result.rows:
        suffix = "  [host RAM]" if row.host else ""
        lines.append(f"{row.name:<48} {_gib(row.bytes)}  {row.detail}{suffix}")
    budget = setup.device_memory
    lines.append(f"{'peak per device':<48} {_gib(result.peak)}  of {budget / GIB:.0f} GiB"
                 + (f" (peak phase: {result.phase})" if setup.kind == "ppo" else ""))
    if result.host_bytes:
        lines.append(f"{'offloaded to CPU RAM':<48} {_gib(result.host_bytes)}")
    lines.append("")
    if result.fits:
        headroom = 1 - result.peak / budget
        lines.append(f"verdict: fits ({headroom:.0%} headroom)" + ("; tight, expect fragmentation to bite"
                                                                   if headroom < 0.1 else ""))
    elif fix is None:
        lines.append("verdict: does NOT fit, and no combination of the changes tried fits; use a smaller model, "
                     "shorter sequences or more memory")
    else:
        changes, fixed = fix
        lines.append(f"verdict: does NOT fit ({result.peak / GIB:.1f} GiB > {budget / GIB:.0f} GiB)")
        lines.append(f"cheapest change that fits: {' + '.join(c.text for c in changes)} "
                     f"→ {fixed.peak / GIB:.1f} GiB")
    return "\n".join(lines)


def _handler(args: argparse.Namespace) -> int:
    device = "cpu" if args.cpu else "gpu"
    num, zero = args.num_gpus, args.zero
    offload = args.offload
    if args.accelerate_config:
        found = _accelerate_file(args.accelerate_config)
        num = args.num_gpus if args.num_gpus_given else found["num_devices"]
        zero = zero if args.zero else found.get("zero", 0)
        if offload == "none" and found.get("offload_optimizer"):
            offload = "all" if found.get("offload_params") else "optimizer"
    memory = parse_memory(args.gpu_memory) if args.gpu_memory else None
    result = estimate_recipe(args.recipe, args.overrides, device, num if device == "gpu" else 1, memory, zero,
                             offload, args.base)
    fix = None if result.fits else cheapest_fix(result.setup)
    if args.json:
        out = result.as_dict()
        out["suggestion"] = ({"changes": [c.text for c in fix[0]], "peak_bytes": fix[1].peak,
                              "setup": fix[1].setup.describe()} if fix else None)
        print(json.dumps(out, indent=2))
    else:
        print(render(result, fix))
    return 0 if result.fits else 1


class _CountGiven(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.num_gpus_given = True


def add_commands(subparsers: Any) -> None:
    """`rlhf-pipeline estimate RECIPE [--num-gpus N] [--gpu-memory 80GB] [overrides...]`."""
    parser = subparsers.add_parser(
        "estimate", help="predict peak memory per device for a recipe, and whether it fits",
        description="Peak memory per device of a stage (weights, LoRA, gradients, optimizer, activations, "
                    "logits, KV cache; ZeRO and offload), from the model's config.json alone. Exit status 0 "
                    "when it fits, 1 when it does not (the cheapest change that fits is printed).",
        epilog="example: rlhf-pipeline estimate recipes/llama-3.1-8b-qlora/sft.yaml --gpu-memory 24GB",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", help="path to the stage's YAML recipe")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. data.max_length=4096")
    parser.add_argument("--num-gpus", type=int, default=1, action=_CountGiven, help="processes/GPUs (default 1)")
    parser.add_argument("--gpu-memory", help="memory per device, e.g. 24GB, 80GB (GB = GiB); CPU: RAM size")
    parser.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=0, help="DeepSpeed ZeRO stage")
    parser.add_argument("--offload", choices=("none", "optimizer", "all"), default="none",
                        help="ZeRO CPU offload: optimizer states, or optimizer states and parameters")
    parser.add_argument("--accelerate-config", help="read processes, ZeRO stage and offload from this file")
    parser.add_argument("--cpu", action="store_true", help="estimate for this CPU (fp32) instead of GPUs")
    parser.add_argument("--base", help="model whose config.json to use when name_or_path does not exist yet")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(handler=_handler, num_gpus_given=False)
