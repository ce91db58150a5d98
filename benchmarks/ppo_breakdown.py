"""Where a PPO step's time goes on SmolLM2-135M: generation, scoring (policy, reference, value, reward), update.

    python benchmarks/ppo_breakdown.py                       # 3 runs × 3 PPO steps, ~10 min on 2 cores
    python benchmarks/ppo_breakdown.py --work /tmp/stages    # reuse the small SFT/RM stages

The PPO stage runs the demo recipe (recipes/smollm2-135m/ppo.yaml: 16 prompts per step, 32-token answers,
one PPO epoch of two mini-batches of 8, LoRA r=16 on policy and critic) from small finished SFT and RM stages. Timing
wraps ppo/trainer.py's own code in the child process — `rollout` (and within it `_generate`,
`response_logits` for the policy role, then the reference role, `response_values`, `_score`) and
`ppo_update` — and calls the originals unchanged. Times are the child's CPU time (one torch thread, so on an
idle core they equal wall time; on a shared machine they do not count the neighbours). The first step is
reported apart (warm-up); the rest are medians over steps and runs. Generation tokens/s counts the answer
tokens actually sampled (up to the stop token) per CPU second of `_generate`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

RECIPE = common.REPO / "recipes" / "smollm2-135m" / "ppo.yaml"
PARTS = ("generation", "policy logprobs", "reference logprobs", "value", "reward", "rollout other", "optimisation")


def child(work: Path, steps: int) -> dict[str, Any]:
    import torch

    from rlhf_pipeline.ppo import trainer as trainer_module
    from rlhf_pipeline.ppo.trainer import PPOTrainer
    from rlhf_pipeline.stages import get_stage, load_recipe

    common.baseline()
    per_step: list[dict[str, float]] = []
    current: dict[str, float] = defaultdict(float)
    tokens: list[int] = []

    @contextlib.contextmanager
    def timed(part: str) -> Iterator[None]:
        started = time.process_time()
        yield
        current[part] += time.process_time() - started

    def wrap(owner: Any, name: str, part_of: Any) -> None:
        """Time calls of owner.name (a method, or a module function that the trainer looks up when called)."""
        original = getattr(owner, name)

        def timed_call(*args: Any, **kwargs: Any) -> Any:
            with timed(part_of()):
                return original(*args, **kwargs)

        setattr(owner, name, timed_call)

    def logits_part() -> str:
        """In a rollout the policy's logits come first, then the reference's, chunk by chunk."""
        nonlocal logits_calls
        if not in_rollout:
            return "optimisation forwards"
        logits_calls += 1
        return "policy logprobs" if logits_calls % 2 else "reference logprobs"

    in_rollout, logits_calls = False, 0
    wrap(PPOTrainer, "_generate", lambda: "generation")
    wrap(trainer_module, "response_logits", logits_part)
    wrap(trainer_module, "response_values", lambda: "value" if in_rollout else "optimisation forwards")
    wrap(PPOTrainer, "_score", lambda: "reward")
    original_rollout, original_update = PPOTrainer.rollout, PPOTrainer.ppo_update

    def rollout(self: Any, prompts: Any) -> Any:
        nonlocal in_rollout
        in_rollout = True
        started = time.process_time()
        try:
            result = original_rollout(self, prompts)
        finally:
            in_rollout = False
        current["rollout"] = time.process_time() - started
        tokens.append(int(result.response_mask.sum()))
        return result

    def ppo_update(self: Any, rollout_: Any) -> Any:
        started = time.process_time()
        result = original_update(self, rollout_)
        current["optimisation"] = time.process_time() - started
        per_step.append(dict(current))
        current.clear()
        return result

    PPOTrainer.rollout, PPOTrainer.ppo_update = rollout, ppo_update
    with tempfile.TemporaryDirectory(prefix="ppo-breakdown-") as tmp:
        recipe = load_recipe(RECIPE, [f"model.name_or_path={work / 'sft'}", f"training.reward_model_path={work / 'rm'}",
                                      f"training.output_dir={Path(tmp) / 'out'}",
                                      f"training.total_episodes={16 * steps}", "training.save_steps=1000",
                                      "training.num_sample_generations=0"])
        get_stage("ppo").run(recipe)
    for step, count in zip(per_step, tokens, strict=True):
        step["rollout other"] = step["rollout"] - sum(step.get(p, 0.0) for p in PARTS[:5])
        step["answer tokens"] = count
    return {"steps": per_step, "threads": torch.get_num_threads()}


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
