"""SFT throughput with packing (TRL's best-fit-decreasing packing, padding-free) vs padded batches, skewed lengths.

    python benchmarks/packing.py                  # 3 interleaved rounds, ~10 min on 2 cores
    python benchmarks/packing.py --rows 48 --repeats 5

The data are chat rows whose answers are mostly short with a long tail (85% of 4-24 words, 15% of 110-170
words; seeded), the shape of real SFT sets where a few long answers set the padded width of every batch they
land in. Both sides run our SFT stage on SmolLM2-135M (recipes/smollm2-135m/sft.yaml, LoRA r=16, fp32,
max_length 256) over the same rows for one epoch: "padded" with micro-batch 8 (each batch padded to its
longest row), "packed" with `training.packing: true` and micro-batch 4 packs of up to 256 tokens (padding-free:
one flattened row per step, attention kept inside each document). Throughput = real tokens (no padding) per
second of the training phase; CPU seconds are reported too (one torch thread: equal to wall time on an idle
core). Target: packed/padded ≥ 1.5.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

RECIPE = common.REPO / "recipes" / "smollm2-135m" / "sft.yaml"
WORDS = [
    "morning", "light", "garden", "bees", "flowers", "cat", "stones", "door", "kettle", "kitchen", "rain",
    "window", "street", "market", "bread", "tea", "friend", "letter", "river", "bridge", "train", "station",
    "evening", "lamp", "book", "story", "music", "song", "walk", "park"
]


def write_data(folder: Path, rows: int, seed: int = 0) -> Path:
    """A data card over skewed-length chat rows; the same rows for every run."""
    rng = random.Random(seed)
    lines = []
    for index in range(rows):
        words = rng.randint(110, 170) if rng.random() < 0.15 else rng.randint(4, 24)
        answer = " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."
        prompt = f"Tell me about the {WORDS[index % len(WORDS)]}."
        lines.append(json.dumps({"messages": [{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": answer}]}))
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "data_cards").mkdir(parents=True, exist_ok=True)
    (folder / "data" / "skewed.jsonl").write_text("\n".join(lines) + "\n")
    card = {"name": "skewed", "description": "skewed-length rows for the packing benchmark",
            "source": {"path": "../data/skewed.jsonl"}, "format": "messages", "license": "Apache-2.0",
            "stages": ["sft"]}
    card_path = folder / "data_cards" / "skewed.yaml"
    card_path.write_text(yaml.safe_dump(card))
    return card_path


def child(mode: str, card: Path) -> dict[str, Any]:
    import transformers
    from trl import SFTTrainer

    from rlhf_pipeline.stages import load_recipe, sft

    common.baseline()
    window = common.TrainWindow()
    window.wrap(transformers.Trainer)
    counts = {"tokens": 0, "slots": 0, "trained": 0, "steps": 0}
    original = SFTTrainer.compute_loss

    def compute_loss(self: Any, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if self.model.training:
            mask = inputs.get("attention_mask")
            counts["tokens"] += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
            counts["slots"] += inputs["input_ids"].numel()
            counts["trained"] += int((inputs["labels"] != -100).sum())
            counts["steps"] += 1
        return original(self, model, inputs, *args, **kwargs)

    SFTTrainer.compute_loss = compute_loss
    batch = ["training.per_device_train_batch_size=8"] if mode == "padded" else [
        "training.packing=true", "training.per_device_train_batch_size=4"]
    with tempfile.TemporaryDirectory(prefix=f"packing-{mode}-") as tmp:
        recipe = load_recipe(RECIPE, [f"data.train=[{card}]", "data.eval_split=0.0", "data.max_length=256",
                                      f"training.output_dir={Path(tmp) / 'out'}", "training.save_strategy='no'",
                                      "training.num_train_epochs=1", "training.logging_steps=100", *batch])
        sft.run(recipe)
    return {"tokens_per_s": counts["tokens"] / window.seconds,
            "tokens_per_cpu_s": counts["tokens"] / window.cpu_seconds,
            "train_seconds": window.seconds, "tokens": float(counts["tokens"]), "slots": float(counts["slots"]),
            "trained_tokens": float(counts["trained"]), "steps": float(counts["steps"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=("padded", "packed"), help=argparse.SUPPRESS)
    parser.add_argument("--card", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        common.emit(child(args.child, args.card))
        return 0
    info = common.machine()
    with tempfile.TemporaryDirectory(prefix="packing-") as tmp:
        card = write_data(Path(tmp), args.rows)
        print(f"packing: {args.repeats} × (padded, packed), {args.rows} rows, {common.threads()} torch thread(s)",
              flush=True)
        results = common.interleaved(("padded", "packed"), args.repeats, lambda mode: common.run_child(
            Path(__file__), ["--child", mode, "--card", str(card)]))
    first = {m: results[m][0] for m in results}
    wall = {m: common.median(results[m], "tokens_per_s") for m in results}
    cpu = {m: common.median(results[m], "tokens_per_cpu_s") for m in results}
    lines = [
        "per run: " + ", ".join(f"{m}: {r['tokens']:.0f} real tokens in {r['slots']:.0f} slots "
                                f"({r['tokens'] / r['slots']:.0%} useful), {r['trained_tokens']:.0f} trained, "
                                f"{r['steps']:.0f} steps" for m, r in first.items()),
        f"tokens/s (median, wall): padded {wall['padded']:.0f}, packed {wall['packed']:.0f} -> packed/padded "
        f"{wall['packed'] / wall['padded']:.2f} (target >= 1.5)",
        f"tokens per CPU second (median): padded {cpu['padded']:.0f}, packed {cpu['packed']:.0f} -> "
        f"{cpu['packed'] / cpu['padded']:.2f}",
    ]
    common.report("packing.py: SFT tokens/s, packed vs padded (SmolLM2-135M, skewed lengths)", info, lines,
                  os.getloadavg())
    return 0


if __name__ == "__main__":
    sys.exit(main())
