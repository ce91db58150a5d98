"""Peak memory of the PPO stage vs the SFT stage on the same base (SmolLM2-135M), with the estimator's view.

    python benchmarks/ppo_memory.py                     # 3 interleaved rounds, ~10 min on 2 cores
    python benchmarks/ppo_memory.py --work /tmp/stages  # keep the small SFT/RM stages between runs

Both are the shipped demo recipes (recipes/smollm2-135m/{sft,ppo}.yaml) run by the stages themselves:
SFT for 4 optimizer steps on its demo rows (micro-batch 8); PPO for 2 PPO steps (16 prompts, 32-token answers,
one PPO epoch of two mini-batches of 8), starting from small finished SFT and RM stages built first in a work folder.
Memory: peak RSS during `train()` minus the process baseline before any weights load (benchmarks/common.py),
median of the rounds. PPO holds one copy of the base, as SFT does, with four adapters and two heads on it
(ppo/roles.py), plus the rollout and two LoRAs' optimizer states. Target: PPO/SFT ≤ 1.2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

RECIPES = common.REPO / "recipes" / "smollm2-135m"


def overrides(mode: str, work: Path, out: Path) -> list[str]:
    if mode == "sft":
        return [f"training.output_dir={out}", "training.max_steps=4", "training.save_strategy='no'",
                "data.eval_split=0.0"]
    return [f"model.name_or_path={work / 'sft'}", f"training.reward_model_path={work / 'rm'}",
            f"training.output_dir={out}", "training.total_episodes=32", "training.save_steps=1000",
            "training.num_sample_generations=0"]


def longest_lengths(work: Path) -> dict[str, int]:
    """The longest templated SFT row and PPO prompt of the demo data (what the batches are padded to at most)."""
    from rlhf_pipeline.chat import encode_prompt
    from rlhf_pipeline.models import load_tokenizer
    from rlhf_pipeline.sources import resolve_source
    from rlhf_pipeline.stages import load_recipe

    recipe = load_recipe(RECIPES / "sft.yaml")
    tokenizer = load_tokenizer(resolve_source(recipe.model, progress=lambda _: None), recipe.model)
    data = common.REPO / "data" / "demo"
    sft_rows = [json.loads(line)["messages"] for line in (data / "sft_demonstrations.jsonl").read_text().splitlines()
                if line.strip()]
    prompts = [json.loads(line)["prompt"] for line in (data / "ppo_prompts.jsonl").read_text().splitlines()
               if line.strip()]
    return {"sft": max(len(tokenizer.apply_chat_template(m, tokenize=True, return_dict=False)) for m in sft_rows),
            "ppo": max(len(encode_prompt(tokenizer, [{"role": "user", "content": p}])) for p in prompts)}


def child(mode: str, work: Path) -> dict[str, Any]:
    import transformers

    from rlhf_pipeline.ppo import trainer as ppo_trainer
    from rlhf_pipeline.stages import get_stage, load_recipe

    base = common.baseline()
    window = common.TrainWindow()
    window.wrap(transformers.Trainer)
    window.wrap(ppo_trainer.PPOTrainer)
    with tempfile.TemporaryDirectory(prefix=f"ppo-memory-{mode}-") as tmp:
        recipe = load_recipe(RECIPES / f"{mode}.yaml", overrides(mode, work, Path(tmp) / "out"))
        get_stage(mode).run(recipe)
    return {"peak_mib": (window.peak - base) / common.MB, "train_seconds": window.seconds,
            "train_cpu_seconds": window.cpu_seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, help="folder for the small SFT and RM stages (default: a temp dir)")
    parser.add_argument("--child", choices=("sft", "ppo"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        common.emit(child(args.child, args.work))
        return 0
    info = common.machine()
    with tempfile.TemporaryDirectory(prefix="ppo-memory-") as tmp:
        work = args.work or Path(tmp)
        common.prepare_stages(work)
        print(f"ppo_memory: {args.repeats} × (sft, ppo), {common.threads()} torch thread(s)")
        results = common.interleaved(("sft", "ppo"), args.repeats, lambda mode: common.run_child(
            Path(__file__), ["--child", mode, "--work", str(work)]))
        from rlhf_pipeline.estimate import estimate_recipe

        predicted = {mode: estimate_recipe(RECIPES / f"{mode}.yaml", overrides(mode, work, work / "unused"),
                                           device="cpu") for mode in ("sft", "ppo")}
        longest = longest_lengths(work)
        actual = {"sft": estimate_recipe(RECIPES / "sft.yaml", [*overrides("sft", work, work / "unused"),
                                                                f"data.max_length={longest['sft']}"], device="cpu"),
                  "ppo": estimate_recipe(RECIPES / "ppo.yaml", [*overrides("ppo", work, work / "unused"),
                                                                f"training.max_prompt_length={longest['ppo']}"],
                                         device="cpu")}
    sft, ppo = common.median(results["sft"], "peak_mib"), common.median(results["ppo"], "peak_mib")
    p_sft, p_ppo = (predicted[m].model_peak / common.MB for m in ("sft", "ppo"))
    a_sft, a_ppo = (actual[m].model_peak / common.MB for m in ("sft", "ppo"))
    lines = [
        f"peak memory over baseline (median): SFT {sft:.0f} MiB, PPO {ppo:.0f} MiB -> PPO/SFT {ppo / sft:.2f} "
        "(target <= 1.2)",
        f"estimator at the recipes' worst-case lengths (no heap slack): SFT {p_sft:.0f} MiB, PPO {p_ppo:.0f} MiB "
        f"-> {p_ppo / p_sft:.2f}; PPO peak phase: {predicted['ppo'].phase}",
        f"estimator at the data's longest rows (SFT {longest['sft']} tokens, PPO prompts {longest['ppo']}): SFT "
        f"{a_sft:.0f} MiB, PPO {a_ppo:.0f} MiB -> {a_ppo / a_sft:.2f}; measured/predicted SFT {sft / a_sft:.2f}, "
        f"PPO {ppo / a_ppo:.2f} (with glibc's default the heap also keeps freed blocks: benchmarks/allocator.py)",
        "per run (peak MiB, train s): " + json.dumps({m: [(round(r["peak_mib"]), round(r["train_seconds"], 1))
                                                           for r in rs] for m, rs in results.items()}),
    ]
    common.report("ppo_memory.py: PPO stage vs SFT stage peak memory (SmolLM2-135M)", info, lines, os.getloadavg())
    return 0


if __name__ == "__main__":
    sys.exit(main())
