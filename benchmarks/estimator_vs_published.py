"""The estimator's figures for setups with published memory numbers (no weights, no torch; instant).

    python benchmarks/estimator_vs_published.py

Published: LLaMA-Factory's hardware table (7B: LoRA 16 GB, QLoRA 8-bit 10 GB, QLoRA 4-bit 6 GB; 65B QLoRA 4-bit
48 GB) and the QLoRA paper (Dettmers et al. 2023: a 65B model fine-tuned on one 48 GB GPU). Neither states
its batch or sequence length here, so each model is shown at micro-batch 1 × 512 tokens (activation
checkpointing on, as both assume) and at 4 × 2048 for contrast. LoRA r=16 on all linear layers, bf16.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rlhf_pipeline.estimate import GIB, Architecture, Setup, estimate

LLAMA_7B = Architecture.from_config({"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
                                     "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
                                     "vocab_size": 32000, "tie_word_embeddings": False}, "LLaMA 7B")
LLAMA_65B = Architecture.from_config({"model_type": "llama", "hidden_size": 8192, "intermediate_size": 22016,
                                      "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 64,
                                      "vocab_size": 32000, "tie_word_embeddings": False}, "LLaMA 65B")
CASES = [
    ("7B LoRA (bf16)", LLAMA_7B, {}, "16 GB (LLaMA-Factory)"),
    ("7B QLoRA 8-bit", LLAMA_7B, {"quantization": "8bit"}, "10 GB (LLaMA-Factory)"),
    ("7B QLoRA 4-bit", LLAMA_7B, {"quantization": "4bit"}, "6 GB (LLaMA-Factory)"),
    ("65B QLoRA 4-bit", LLAMA_65B, {"quantization": "4bit"}, "48 GB (LLaMA-Factory); fits one 48 GB GPU (QLoRA)"),
]


def main() -> int:
    print(f"{'setup':<18} {'1×512 GiB':>10} {'4×2048 GiB':>11}  weights / trainable states / activations+loss "
          "at 1×512   published")
    for name, arch, changes, published in CASES:
        base = Setup(stage="sft", arch=arch, device="gpu", dtype="bfloat16", lora_r=16, lora_dropout=0.05,
                     checkpointing=True, micro_batch=1, seq_len=512, device_memory=80 * GIB, **changes)
        small, large = estimate(base), estimate(dataclasses.replace(base, micro_batch=4, seq_len=2048))
        rows = {r.name: r.bytes for r in small.rows}
        weights = sum(v for k, v in rows.items() if k.startswith("weights"))
        states = sum(v for k, v in rows.items() if k.startswith(("LoRA", "gradients", "optimizer")))
        work = rows["activations"] + rows.get("LM head / loss (fused log-prob tiles)", 0)
        print(f"{name:<18} {small.peak / GIB:10.1f} {large.peak / GIB:11.1f}  {weights / GIB:.1f} / "
              f"{states / GIB:.2f} / {work / GIB:.2f}{'':<22} {published}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
