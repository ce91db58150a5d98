"""The measuring children of gpu_check.py: each runs in its own process and writes one JSON file (`--out`).

    python benchmarks/gpu_probes.py ppo-timed --out F -- ppo RECIPE KEY=VALUE...   # the ppo command, timed by part
    python benchmarks/gpu_probes.py generate --engine hf --policy SFT_DIR --out F  # sampling tokens/s, batch 64
    python benchmarks/gpu_probes.py qlora-checks --sft SFT_DIR --rm RM_DIR --out F # the 4-bit checks

`ppo-timed` is `rlhf-pipeline ppo ...` itself (the CLI's `main`, in this process) with common.PPOStepTimer
around the trainer's own functions. `generate` samples through `generation.sample_answers`, the path the
label and eval stages take; ENGINES lists the sampling engines, one entry each (gpu_check.py gives every entry
its own path, skipped when the engine's package is not installed). `qlora-checks` repeats, on this machine's
device, what tests/test_adapters.py checks on the CPU: a later stage's 4-bit load keeps ≥ 0.8 of the SFT
adapter's effect (the rm stage's backbone, PPO's reference), and LoRA gradients on the 4-bit base are those of
a dequantised full-precision copy.

`fail` and `hang` stand in for a path when gpu_check.py is asked to inject a failure (`--inject`): its tests.
Nothing heavy is imported at module level: gpu_check.py reads ENGINES from here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

EVAL_RECIPE = common.REPO / "recipes" / "smollm2-135m" / "eval.yaml"
SFT_ROWS = common.REPO / "data" / "demo" / "sft_demonstrations.jsonl"
KEPT_AT_LEAST = 0.8  # share of the full-precision SFT effect a 4-bit load must keep (tests/test_adapters.py)
COSINE_AT_LEAST = 0.999  # 4-bit LoRA gradients vs the dequantised copy's (tests/test_adapters.py)


def write(out: Path, result: dict[str, Any]) -> None:
    """The probe's result, with this process's peak resident memory so far."""
    out.parent.mkdir(parents=True, exist_ok=True)
    result = result | {"peak_rss_gib": round(common.status("VmHWM") / 2**30, 3)}
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def peak_gpu_gib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None


# ---------------------------------------------------------------------------------------------------- ppo-timed


def ppo_timed(out: Path, argv: Sequence[str]) -> int:
    """The ppo command in this process, its steps timed part by part; rank 0 writes them."""
    from rlhf_pipeline.cli import main
    from rlhf_pipeline.distributed import is_main_process

    timer = common.PPOStepTimer(common.cuda_wall_clock)
    timer.install()
    status = main(list(argv))
    if status == 0 and is_main_process():
        write(out, {"steps": timer.steps, "peak_gpu_gib": peak_gpu_gib()})
    return status


# ----------------------------------------------------------------------------------------------------- generate


@dataclass(frozen=True)
class Engine:
    """A sampling engine: the package it needs, its path's time budget on one GPU (gpu_check.py; all budgets
    together stay within 8 minutes, so a new engine's seconds come from the others'), and how it samples."""

    package: str
    budget: int
    # (policy folder, chat prompts, batch size, new tokens) -> (generation.Sample lists per prompt, seconds sampling)
    sample: Callable[[Path, list[Any], int, int], tuple[list[Any], float]]


def _sampler(generation: dict[str, str]) -> Callable[[Path, list[Any], int, int], tuple[list[Any], float]]:
    """Sampling through `generation.sampling_engine` with a recipe's `generation:` section, the policy's adapter
    on its base loaded the way label and eval load it; a short warm-up first (kernels, allocator, vLLM's start)."""

    def sample(policy: Path, prompts: list[Any], batch: int, new_tokens: int) -> tuple[list[Any], float]:
        from rlhf_pipeline.adapters import load_frozen_roles
        from rlhf_pipeline.engines.spec import GenerationSpec
        from rlhf_pipeline.generation import sample_answers, sampling_engine
        from rlhf_pipeline.models import load_tokenizer
        from rlhf_pipeline.recipe import ModelSpec
        from rlhf_pipeline.sources import resolve_source

        spec = ModelSpec(name_or_path=str(policy))
        source = resolve_source(spec)
        tokenizer = load_tokenizer(source, spec)
        shared = load_frozen_roles({"policy": source}, spec, tokenizer)["policy"]
        with sampling_engine(GenerationSpec(**generation), shared, tokenizer, batch, source.path) as engine:
            engine.use(shared, "policy")
            sample_answers(engine, tokenizer, prompts, max_new_tokens=4)
            started = common.cuda_wall_clock()
            samples = sample_answers(engine, tokenizer, prompts, max_new_tokens=new_tokens, temperature=0.7)
            return samples, common.cuda_wall_clock() - started

    return sample


# One entry per engine: each is a `generate-<name>` path of gpu_check.py, skipped while its package is missing.
ENGINES: dict[str, Engine] = {"hf": Engine("transformers", 20, _sampler({"engine": "hf"})),
                              "vllm": Engine("vllm", 40, _sampler({"engine": "vllm"}))}


def generate(engine: str, policy: Path, out: Path, prompts: int, batch: int, new_tokens: int) -> int:
    """Tokens per second of sampling answers to the demo eval prompts (`prompts` of them, `batch` at a time)."""
    from rlhf_pipeline.data.loading import load_datasets
    from rlhf_pipeline.models import load_tokenizer
    from rlhf_pipeline.sources import resolve_source
    from rlhf_pipeline.stages import load_recipe

    recipe = load_recipe(EVAL_RECIPE, [f"model.name_or_path={policy}", f"data.max_samples={prompts}"])
    tokenizer = load_tokenizer(resolve_source(recipe.model), recipe.model)
    datasets, _ = load_datasets(recipe, tokenizer, prompts_only=True)
    chats = [row["prompt"] for split in datasets.values() for row in split]
    samples, seconds = ENGINES[engine].sample(policy, chats, batch, new_tokens)
    tokens = sum(len(sample.answer_ids) for per_prompt in samples for sample in per_prompt)
    write(out, {"engine": engine, "prompts": len(chats), "batch_size": batch, "max_new_tokens": new_tokens,
                "answer_tokens": tokens, "seconds": round(seconds, 3), "tokens_per_second": round(tokens / seconds, 1),
                "peak_gpu_gib": peak_gpu_gib()})
    return 0


# ------------------------------------------------------------------------------------------------- qlora-checks


def _batch(tokenizer: Any, device: Any) -> tuple[Any, Any]:
    """Eight templated demo conversations (prompt and answer), right-padded: what the checks run the models on."""
    from rlhf_pipeline.chat import pad_batch

    rows = [json.loads(line)["messages"] for line in SFT_ROWS.read_text(encoding="utf-8").splitlines()[:8]]
    ids = [tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False) for messages in rows]
    input_ids, mask = pad_batch(ids, tokenizer.pad_token_id, "right")
    return input_ids.to(device), mask.to(device)


def _kept(effect: Any, reference: Any, mask: Any) -> float:
    """The share of `reference` (the full-precision SFT effect) that `effect` carries, as a projection on it, over
    real tokens: re-quantisation also moves outputs at random, which a ratio of sizes would count as kept."""
    keep = mask.bool()
    effect, reference = effect[keep].float(), reference[keep].float()
    return float((effect * reference).sum() / (reference * reference).sum())


def qlora_checks(sft: Path, rm: Path, out: Path) -> int:
    """The 4-bit checks of tests/test_adapters.py on this device; exit 1 naming the first check that fails."""
    import dataclasses

    import torch

    from rlhf_pipeline.adapters import load_frozen_roles
    from rlhf_pipeline.models import REWARD, load_base, load_tokenizer, process_device, trainable_model
    from rlhf_pipeline.ppo.roles import REFERENCE, build_ppo_model
    from rlhf_pipeline.recipe import QuantizationSpec
    from rlhf_pipeline.sources import resolve_source
    from rlhf_pipeline.stages import load_recipe

    full = dataclasses.replace(load_recipe(sft / "recipe.yaml").model, name_or_path=str(sft),
                               quantization=QuantizationSpec())
    nf4 = dataclasses.replace(full, quantization=QuantizationSpec(load_in_4bit=True))
    source = resolve_source(full)
    tokenizer = load_tokenizer(source, full)
    ids, mask = _batch(tokenizer, process_device())
    inputs = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        roles = load_frozen_roles({"base": resolve_source(dataclasses.replace(full, name_or_path=source.path)),
                                   "sft": source}, full, tokenizer)["sft"]  # the full-precision reference
        full_logits, full_hidden = {}, {}
        for role in ("base", "sft"):
            full_logits[role] = roles.use(role)(**inputs).logits
            full_hidden[role] = roles.backbone(**inputs).last_hidden_state  # with the active role's adapter
        del roles
        base = load_base(source, nf4, tokenizer).eval()
        base_logits, base_hidden = base(**inputs).logits, base.model(**inputs).last_hidden_state
        del base
        backbone = trainable_model(load_base(source, nf4, tokenizer, task=REWARD), nf4, REWARD,
                                   continues=source.adapter)  # the rm stage's model as it starts
        rm_hidden = backbone.eval().get_base_model().model(**inputs).last_hidden_state
        del backbone
        ppo = build_ppo_model(source, resolve_source(dataclasses.replace(nf4, name_or_path=str(rm))), nf4, tokenizer)
        reference = ppo.eval()(REFERENCE, ids, mask)
        del ppo
    sft_hidden, sft_logits = full_hidden["sft"] - full_hidden["base"], full_logits["sft"] - full_logits["base"]
    results = {
        "sft_effect_kept_in_rm_backbone": _kept(rm_hidden - base_hidden, sft_hidden, mask),
        "sft_effect_kept_in_ppo_reference": _kept(reference - base_logits, sft_logits, mask),
        "lora_gradient_cosine_vs_dequantised": _gradient_cosine(source.path, nf4, tokenizer, ids, mask),
    }
    write(out, results | {"compute_dtype": str(full_logits["sft"].dtype), "peak_gpu_gib": peak_gpu_gib()})
    limits = {"sft_effect_kept_in_rm_backbone": KEPT_AT_LEAST, "sft_effect_kept_in_ppo_reference": KEPT_AT_LEAST,
              "lora_gradient_cosine_vs_dequantised": COSINE_AT_LEAST}
    for name, value in results.items():
        print(f"{name}: {value:.4f} (at least {limits[name]})", flush=True)
        if not value >= limits[name]:
            print(f"error: {name} = {value:.4f}, below {limits[name]}", file=sys.stderr, flush=True)
            return 1
    return 0


def dequantised_twin(quantized: Any, base: str, spec: Any) -> Any:
    """A full-precision copy of `quantized` (a LoRA on a 4-bit base, built from `spec`): fp32 weights equal to what
    its 4-bit layers dequantise to, and the same LoRA weights. 4-bit gradients are checked against it (here, and in
    tests/test_adapters.py)."""
    import dataclasses

    import bitsandbytes as bnb
    import torch
    from bitsandbytes.functional import dequantize_4bit
    from transformers import AutoModelForCausalLM

    from rlhf_pipeline.models import trainable_model
    from rlhf_pipeline.recipe import QuantizationSpec

    device = next(quantized.parameters()).device
    dense = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
    dense_modules = dict(dense.named_modules())
    for name, module in quantized.get_base_model().named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = dequantize_4bit(module.weight.data, module.weight.quant_state)
            dense_modules[name.removesuffix(".base_layer")].weight.data.copy_(weight)
    dense = trainable_model(dense, dataclasses.replace(spec, quantization=QuantizationSpec()))
    dense.load_state_dict({k: v for k, v in quantized.state_dict().items() if "lora_" in k}, strict=False)
    return dense


def _gradient_cosine(base: str, nf4: Any, tokenizer: Any, ids: Any, mask: Any) -> float:
    """Cosine of a new LoRA's gradients on the 4-bit base with those on its dequantised twin, after a no-grad eval
    pass (which, on CPUs with AVX512-BF16, is what breaks 4-bit gradients unless guarded).

    The twin is fp32 and both run under autocast to the 4-bit compute dtype, so a bf16 matmul sees the same bf16
    weights in both (bitsandbytes dequantises to the compute dtype); in fp32 (CPU) this is the CPU test.
    """
    import contextlib
    import dataclasses

    import torch

    from rlhf_pipeline.models import compute_dtype, load_base, trainable_model
    from rlhf_pipeline.sources import resolve_source

    spec = dataclasses.replace(nf4, name_or_path=base, lora=dataclasses.replace(nf4.lora, lora_dropout=0.0))
    quantized = trainable_model(load_base(resolve_source(spec), spec, tokenizer), spec)  # dropout off: same network
    dense = dequantised_twin(quantized, base, spec)
    labels = ids.masked_fill(~mask.bool(), -100)
    dtype = compute_dtype(spec)
    grads = []
    for model in (quantized, dense):
        autocast = (torch.autocast(ids.device.type, dtype=dtype) if dtype != torch.float32
                    else contextlib.nullcontext())
        with autocast:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
            model.train()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        grads.append(torch.cat([p.grad.float().flatten() for _, p in sorted(model.named_parameters())
                                if p.grad is not None]))
    return float(torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0))


# -------------------------------------------------------------------------------------------- injected faults


def fail() -> int:
    raise RuntimeError("injected failure (gpu_check.py --inject fail:PATH)")


def hang(pid_file: Path) -> int:
    """Sleep for good, with a child process of our own: the harness must end both at the path's timeout."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    pid_file.write_text(f"{os.getpid()} {child.pid}\n", encoding="utf-8")
    time.sleep(3600)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="probe", required=True)
    timed = commands.add_parser("ppo-timed")
    timed.add_argument("--out", type=Path, required=True)
    timed.add_argument("command", nargs=argparse.REMAINDER, help="-- ppo RECIPE KEY=VALUE...")
    sampling = commands.add_parser("generate")
    sampling.add_argument("--engine", choices=sorted(ENGINES), default="hf")
    sampling.add_argument("--policy", type=Path, required=True, help="a finished policy stage (sft, ppo...)")
    sampling.add_argument("--out", type=Path, required=True)
    sampling.add_argument("--prompts", type=int, default=64)
    sampling.add_argument("--batch", type=int, default=64)
    sampling.add_argument("--new-tokens", type=int, default=128)
    checks = commands.add_parser("qlora-checks")
    checks.add_argument("--sft", type=Path, required=True)
    checks.add_argument("--rm", type=Path, required=True)
    checks.add_argument("--out", type=Path, required=True)
    commands.add_parser("fail")
    hanging = commands.add_parser("hang")
    hanging.add_argument("--pid-file", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.probe == "ppo-timed":
        return ppo_timed(args.out, [part for part in args.command if part != "--"])
    if args.probe == "generate":
        return generate(args.engine, args.policy, args.out, args.prompts, args.batch, args.new_tokens)
    if args.probe == "qlora-checks":
        return qlora_checks(args.sft, args.rm, args.out)
    if args.probe == "fail":
        return fail()
    return hang(args.pid_file)


if __name__ == "__main__":
    sys.exit(main())
