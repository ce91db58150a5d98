"""Where a PPO step's time goes on SmolLM2-135M: generation, scoring (policy, reference, value, reward), update.

    python benchmarks/ppo_breakdown.py                       # 3 runs × 3 PPO steps, ~10 min on 2 cores
    python benchmarks/ppo_breakdown.py --work /tmp/stages    # reuse the small SFT/RM stages

The PPO stage runs the demo recipe (recipes/smollm2-135m/ppo.yaml: 16 prompts per step, 32-token answers,
one PPO epoch of two mini-batches of 8, LoRA r=16 on policy and critic) from small finished SFT and RM stages. Timing
wraps ppo/trainer.py's own code in the child process — `rollout` (and within it `_generate`,
`response_logits` for the policy role, then the reference role, `response_values`, `score_responses`) and
`ppo_update` — and calls the originals unchanged (common.PPOStepTimer, which gpu_check.py shares). Times are
the child's CPU time (one torch thread, so on an idle core they equal wall time; on a shared machine they do
not count the neighbours). The first step is
reported apart (warm-up); the rest are medians over steps and runs. Generation tokens/s counts the answer
tokens actually sampled (up to the stop token) per CPU second of `_generate`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

RECIPE = common.REPO / "recipes" / "smollm2-135m" / "ppo.yaml"
PARTS = common.PPO_PARTS


def child(work: Path, steps: int) -> dict[str, Any]:
    import torch

    from rlhf_pipeline.stages import get_stage, load_recipe

    common.baseline()
    timer = common.PPOStepTimer()
    timer.install()
    with tempfile.TemporaryDirectory(prefix="ppo-breakdown-") as tmp:
        recipe = load_recipe(RECIPE, [f"model.name_or_path={work / 'sft'}", f"training.reward_model_path={work / 'rm'}",
                                      f"training.output_dir={Path(tmp) / 'out'}",
                                      f"training.total_episodes={16 * steps}", "training.save_steps=1000",
                                      "training.num_sample_generations=0"])
        get_stage("ppo").run(recipe)
    return {"steps": timer.steps, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes")
    parser.add_argument("--steps", type=int, default=3, help="PPO steps per process (the first is warm-up)")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        common.emit(child(args.work, args.steps))
        return 0
    info = common.machine()
    with tempfile.TemporaryDirectory(prefix="ppo-breakdown-") as tmp:
        work = args.work or Path(tmp)
        common.prepare_stages(work)
        runs = []
        for index in range(args.repeats):
            runs.append(common.run_child(Path(__file__), ["--child", "--work", str(work), "--steps", str(args.steps)]))
            print(f"  run {index + 1}/{args.repeats}: " + ", ".join(
                f"{s['rollout'] + s['optimisation']:.1f}s" for s in runs[-1]["steps"]), flush=True)
    steady = [step for run in runs for step in run["steps"][1:]] or [step for run in runs for step in run["steps"]]
    first = [run["steps"][0] for run in runs]
    total = statistics.median(s["rollout"] + s["optimisation"] for s in steady)
    lines = [f"PPO step (median of {len(steady)} steps after the first): {total:.1f} s; first step "
             f"{statistics.median(s['rollout'] + s['optimisation'] for s in first):.1f} s"]
    for part in PARTS:
        seconds = statistics.median(s.get(part, 0.0) for s in steady)
        lines.append(f"  {part:<20} {seconds:7.2f} s  {seconds / total:6.1%}")
    forwards = statistics.median(s.get("optimisation forwards", 0.0) for s in steady)
    lines.append(f"  (optimisation includes its policy and value forwards: {forwards:.2f} s)")
    rate = statistics.median(s["answer tokens"] / s["generation"] for s in steady)
    lines.append(f"generation: {rate:.1f} answer tokens/s ({statistics.median(s['answer tokens'] for s in steady):.0f} "
                 "tokens per step, 16 answers, up to 32 tokens each, KV cache)")
    common.report("ppo_breakdown.py: time per PPO step (SmolLM2-135M, demo PPO recipe)", info, lines, os.getloadavg())
    return 0


if __name__ == "__main__":
    sys.exit(main())
