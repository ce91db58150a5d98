"""Model FLOPs utilisation: a model's FLOPs per token from its config.json, and a GPU's peak bf16 FLOP/s by name.

MFU = (tokens/s × model FLOPs per token) / (peak FLOP/s × GPUs), PaLM's definition: the FLOPs the model needs,
not what the hardware ran (recomputation under activation checkpointing does not count).

FLOPs per token, for a Llama-style decoder (gated MLP: gate, up and down projections) of L layers, h query
heads of size e, and a causal context of T tokens (a token attends to T/2 earlier ones on average):
- forward: 2 × (the matmul weights a token meets: attention projections, MLP, and the vocabulary head when
  the pass computes logits) + 4·L·h·e·T/2 (attention scores and their weighted sum);
- training with LoRA: the frozen weights need no weight gradients, only activation gradients, so
  2 × forward for the matmuls and 3 × forward for attention (the adapters' own FLOPs, r ≪ d, are left out);
- full fine-tuning: 3 × forward (one forward, two backward matmuls per weight).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' datasheets (sparse figure / 2).
# Matched as substrings of torch.cuda.get_device_name(), most specific first ("A100" before "A10", "L40S" before
# "L4"). A GPU not listed gets no MFU; `--peak-tflops` gives one.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 NVL", 835.0),
    ("H100 PCIE", 756.0),
    ("GH200", 989.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("RTX 6000 ADA", 364.0),
    ("RTX A6000", 155.0),
    ("RTX 4090", 165.0),  # bf16 with fp32 accumulate
    ("RTX 3090", 71.0),
)


def peak_bf16_flops(device_name: str) -> float | None:
    """The GPU's dense bf16 peak in FLOP/s, looked up by its name; None for a GPU not in the table."""
    name = device_name.upper()
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if pattern in name:
            return tflops * 1e12
    return None


def read_config(model_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))


def forward_flops_per_token(config: dict[str, Any], context: int, logits: bool = True) -> tuple[float, float]:
    """(matmul FLOPs, attention FLOPs) of one token's forward pass; `logits=False` for a pass that stops at the
    hidden states (a reward model's or critic's score head is one number per token, left out)."""
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    attention_weights = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o; k, v
    weights = layers * (attention_weights + 3 * hidden * config["intermediate_size"])  # gate, up, down
    if logits:
        weights += hidden * config["vocab_size"]
    return 2.0 * weights, 4.0 * layers * heads * head_dim * context / 2


def training_flops_per_token(config: dict[str, Any], context: int, lora: bool = True, logits: bool = True) -> float:
    """Model FLOPs per trained token (see the module docstring)."""
    matmuls, attention = forward_flops_per_token(config, context, logits)
    return (2.0 if lora else 3.0) * matmuls + 3.0 * attention


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float | None, gpus: int = 1) -> float | None:
    """The fraction of the GPUs' peak the model's FLOPs use; None without a known peak."""
    if not peak_flops or tokens_per_second <= 0:
        return None
    return tokens_per_second * flops_per_token / (peak_flops * gpus)
