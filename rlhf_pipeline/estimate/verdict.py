"""The verdict's search: which change (or combination of changes) is the cheapest that makes the run fit."""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Any

from rlhf_pipeline.estimate.memory import Estimate, Setup, estimate


@dataclass(frozen=True)
class Change:
    """A candidate change to the run and what it costs (speed, hardware or what is trained), for ranking."""

    text: str
    cost: float
    updates: dict[str, Any]


def _candidate_families(setup: Setup) -> list[list[Change]]:
    """Independent knobs; the search tries every combination of at most one change per knob."""
    families: list[list[Change]] = []
    if setup.kind == "train" and not setup.checkpointing:
        families.append([Change("turn on activation checkpointing (training.activation_checkpointing: true)",
                                1.0, {"checkpointing": True})])
    halvings = []
    for k in range(1, int(math.log2(setup.micro_batch)) + 1 if setup.micro_batch > 1 else 1):
        micro = max(1, setup.micro_batch // 2**k)
        accum = setup.grad_accum * setup.micro_batch // micro
        halvings.append(Change(f"micro-batch {micro} with gradient_accumulation_steps {accum} (same global batch)",
                               0.5 * k, {"micro_batch": micro, "grad_accum": accum}))
    if halvings:
        families.append(halvings)
    if setup.kind == "ppo" and setup.forward_chunk > 1:
        families.append([Change(f"local_rollout_forward_batch_size {setup.forward_chunk // 2**k}", 0.25 * k,
                                {"forward_chunk": setup.forward_chunk // 2**k})
                         for k in range(1, int(math.log2(setup.forward_chunk)) + 1)])
    if setup.device == "gpu":
        zero = []
        if setup.num_devices > 1 and setup.zero < 2:
            zero.append(Change("DeepSpeed ZeRO-2 (accelerate_configs/deepspeed_zero2.yaml)", 0.5, {"zero": 2}))
        if setup.zero < 3:
            zero.append(Change("DeepSpeed ZeRO-3 (accelerate_configs/deepspeed_zero3.yaml)", 1.5, {"zero": 3}))
        families.append(zero)
        families.append([Change("offload optimizer states to CPU RAM (ZeRO offload)", 3.0,
                                {"offload_optimizer": True, "zero": max(setup.zero, 2)}),
                         Change("offload optimizer states and parameters to CPU RAM (ZeRO-3 offload)", 5.0,
                                {"offload_optimizer": True, "offload_params": True, "zero": 3})])
        families.append([Change(f"{setup.num_devices * k} GPUs", 4.0 * math.log2(k),
                                {"num_devices": setup.num_devices * k}) for k in (2, 4, 8, 16)])
    if setup.lora_r is None:
        families.append([Change("LoRA instead of full fine-tuning (model.lora: {r: 16, target_modules: all-linear})",
                                3.0, {"lora_r": 16, "lora_targets": "all-linear"})])
    if setup.quantization is None:
        families.append([Change("4-bit NF4 base, QLoRA (model.quantization.load_in_4bit: true)", 2.0,
                                {"quantization": "4bit", "double_quant": True}),
                         Change("8-bit base (model.quantization.load_in_8bit: true)", 2.5, {"quantization": "8bit"})])
    return [family for family in families if family]


def _valid(setup: Setup) -> bool:
    if setup.quantization and setup.lora_r is None:
        return False
    if setup.zero and setup.device != "gpu":
        return False
    return not (setup.offload_params and setup.zero < 3)


def cheapest_fix(setup: Setup) -> tuple[list[Change], Estimate] | None:
    """The lowest-cost combination of changes whose estimate fits (ties: the lower peak), or None."""
    best: tuple[float, float, list[Change], Estimate] | None = None
    families = _candidate_families(setup)
    for choice in itertools.product(*[[None, *family] for family in families]):
        changes = [c for c in choice if c is not None]
        if not changes:
            continue
        cost = sum(c.cost for c in changes)
        if best is not None and cost > best[0]:
            continue
        updates: dict[str, Any] = {}
        for change in changes:
            for key, value in change.updates.items():
                updates[key] = max(updates.get(key, value), value) if key == "zero" else value
        candidate = dataclasses.replace(setup, **updates)
        if not _valid(candidate):
            continue
        result = estimate(candidate)
        if result.fits and (best is None or (cost, result.peak) < (best[0], best[1])):
            best = (cost, result.peak, changes, result)
    return (best[2], best[3]) if best else None
