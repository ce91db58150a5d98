"""Measure the peak memory of one stage run on this CPU, next to what `rlhf-pipeline estimate --cpu` predicts.

    python benchmarks/memory_probe.py recipes/smollm2-135m/sft.yaml          # one SFT optimizer step
    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/memory_probe.py recipes/smollm2-135m/sft.yaml --json

measured = peak RSS during training − the baseline taken before any weights load (benchmarks/common.py):
weights + trainable parameters + gradients + optimizer states + activations + tokenizer and data, plus the
freed heap glibc keeps resident. With MALLOC_MMAP_THRESHOLD_=65536 glibc returns freed blocks at once, so
RSS follows the live tensors; that is how tests/estimate/test_measured.py compares against the estimate.

For SFT the recipe's data are replaced by rows that fill `data.max_length`, so every micro-batch is
`per_device_train_batch_size × max_length` tokens, the shape the estimator assumes, and the run stops
after `--steps` optimizer steps (default 1). Other stages run on their own data and lengths.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

WORDS = ["the", "quiet", "morning", "light", "falls", "on", "a", "small", "garden", "where", "bees", "visit",
         "red", "flowers", "and", "a", "cat", "sleeps", "on", "the", "warm", "stones", "by", "the", "door"]


def _full_length_rows(tokenizer: Any, max_length: int, count: int) -> list[dict[str, Any]]:
    """Chat rows whose templated length is as close to max_length as the words allow (never above)."""
    def row(n_words: int, shift: int) -> dict[str, Any]:
        words = [WORDS[(i + shift) % len(WORDS)] for i in range(n_words)]
        half = max(1, n_words // 4)
        return {"messages": [{"role": "user", "content": " ".join(words[:half])},
                             {"role": "assistant", "content": " ".join(words[half:])}]}

    def length(r: dict[str, Any]) -> int:
        return len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=False))

    rows = []
    for shift in range(count):
        low, high = 1, max_length
        while low < high:  # the largest word count that still fits
            mid = (low + high + 1) // 2
            low, high = (mid, high) if length(row(mid, shift)) <= max_length else (low, mid - 1)
        rows.append(row(low, shift))
    return rows


def _sft_probe_recipe(recipe_path: str, overrides: list[str], work: Path, steps: int) -> Any:
    """The recipe with full-length synthetic rows, `steps` optimizer steps, no eval and no checkpoints."""
    import yaml

    from rlhf_pipeline.models import load_tokenizer
    from rlhf_pipeline.sources import resolve_source
    from rlhf_pipeline.stages import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    tokenizer = load_tokenizer(resolve_source(recipe.model, progress=lambda _: None), recipe.model)
    batch = recipe.config.get("per_device_train_batch_size", 8) * recipe.config.get("gradient_accumulation_steps", 1)
    rows = _full_length_rows(tokenizer, recipe.data.max_length, batch * steps)
    (work / "data").mkdir()
    (work / "data_cards").mkdir()
    (work / "data" / "probe.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    card = {"name": "probe", "description": "full-length rows for the memory probe",
            "source": {"path": "../data/probe.jsonl"}, "format": "messages", "license": "Apache-2.0",
            "stages": ["sft"]}
    (work / "data_cards" / "probe.yaml").write_text(yaml.safe_dump(card))
    extra = [f"data.train=[{work / 'data_cards' / 'probe.yaml'}]", "data.eval=[]", "data.eval_split=0.0",
             "data.max_samples=null", f"training.max_steps={steps}", "training.save_strategy='no'",
             "training.eval_strategy='no'", f"training.output_dir={work / 'out'}", "training.report_to=none",
             "training.logging_steps=1", "training.dataloader_num_workers=0"]
    return load_recipe(recipe_path, [*overrides, *extra])


def probe(recipe_path: str, overrides: list[str], steps: int = 1) -> dict[str, Any]:
    """Run the stage with the peak-memory hooks; returns the measurement in MiB."""
    import transformers

    from rlhf_pipeline.ppo import trainer as ppo_trainer
    from rlhf_pipeline.stages import get_stage, load_recipe

    base = common.baseline()
    window = common.TrainWindow()
    window.wrap(transformers.Trainer)
    window.wrap(ppo_trainer.PPOTrainer)
    shapes: list[list[int]] = []
    with tempfile.TemporaryDirectory(prefix="memory-probe-") as tmp:
        recipe = load_recipe(recipe_path, overrides)
        if recipe.stage == "sft":
            from trl import SFTTrainer

            original = SFTTrainer.compute_loss

            def compute_loss(self: Any, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
                shapes.append(list(inputs["input_ids"].shape))
                return original(self, model, inputs, *args, **kwargs)

            SFTTrainer.compute_loss = compute_loss
            recipe = _sft_probe_recipe(recipe_path, overrides, Path(tmp), steps)
        else:
            recipe = load_recipe(recipe_path, [*overrides, f"training.output_dir={Path(tmp) / 'out'}"])
        get_stage(recipe.stage).run(recipe)
    import torch

    return {
        "recipe": recipe_path, "overrides": overrides, "stage": recipe.stage,
        "baseline_mib": base / common.MB,
        "rss_before_train_mib": window.start_rss / common.MB,
        "peak_rss_mib": window.peak / common.MB,
        "measured_mib": (window.peak - base) / common.MB,
        "train_seconds": window.seconds,
        "batch_shapes": shapes[:4],
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args(argv)
    result = probe(args.recipe, args.overrides, args.steps)
    from rlhf_pipeline.estimate import estimate_recipe

    predicted = estimate_recipe(args.recipe, args.overrides, device="cpu")
    result["predicted_mib"] = predicted.model_peak / common.MB
    with_slack = sum(r.bytes for r in predicted.rows if not r.host and "libraries" not in r.name)  # baseline
    result["predicted_with_runtime_mib"] = with_slack / common.MB
    result["predicted"] = predicted.as_dict()
    result["ratio_measured_over_predicted"] = result["measured_mib"] / result["predicted_mib"]
    if args.json:
        common.emit(result)
    else:
        print(f"measured {result['measured_mib']:.0f} MiB (peak RSS {result['peak_rss_mib']:.0f} − baseline "
              f"{result['baseline_mib']:.0f}), predicted {result['predicted_mib']:.0f} MiB without and "
              f"{result['predicted_with_runtime_mib']:.0f} MiB with the heap-slack allowance; ratio "
              f"{result['ratio_measured_over_predicted']:.2f}; batch shapes {result['batch_shapes']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
