"""Hugging Face `generate` vs the vLLM engine on the demo's stages, both engines interleaved in one run.

    python benchmarks/vllm_engines.py                          # greedy, label, eval, best-of-n, PPO; ~45 min on 2 cores
    python benchmarks/vllm_engines.py --only label eval        # the sampling-only parts
    python benchmarks/vllm_engines.py --sft outputs/smollm2-135m/sft --rm outputs/smollm2-135m/rm
    python benchmarks/vllm_engines.py --only label --eager     # also vLLM without graph compilation

Every measurement is a fresh child process in the environment that has vLLM (`.venv-vllm`, `make vllm-env`; or
--python), one torch thread (BENCH_THREADS) and vLLM bound to as many cores; the engines alternate (hf, vllm,
hf, vllm, ...), so a neighbour's load hits both alike, and the report gives medians and the vllm/hf ratio with the
load average seen before each run. What is measured, on the demo recipes with only the engine changed:

- greedy: the SFT policy's greedy answers (float32 on both engines, temperature 0, 32 new tokens) to the first 16
  held-out prompts of recipes/smollm2-135m/eval.yaml: how many equal Hugging Face's token for token;
- label: `labelling` sampling of recipes/smollm2-135m/label.yaml (128 prompts x 4 answers, temperature 1.0, 32
  new tokens), answer tokens per second of the sampling call (engine start-up and the policy's sync apart);
- eval: the SFT policy's sampling in recipes/smollm2-135m/eval.yaml (one answer per held-out prompt, temperature
  0.7, 32 tokens), tokens per second likewise;
- best-of-n: the whole best-of-n stage (recipes/smollm2-135m/best-of-n.yaml: n 16, temperature 0.7, 32 tokens,
  reward model and VADER scoring; --bon-prompts N: its first N prompts), wall time end to end, start-up included;
- ppo: the PPO stage (recipes/smollm2-135m/ppo.yaml) for --ppo-steps steps; mean seconds per step after the first,
  split into sampling, sync, scoring (log-probs, values, reward) and optimisation (the trainer's time/* logs).

The vLLM engine runs with the recipe defaults of `generation:` (merged sync on CPU, bfloat16 where the CPU has
AVX512-BF16/AMX, graphs compiled). The SFT and RM stages default to the demo's outputs when they are finished,
else small ones are trained in --work (benchmarks/common.prepare_stages).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

RECIPES = common.REPO / "recipes" / "smollm2-135m"
ENGINES = ("hf", "vllm")
# --eager adds a third side: vLLM without graph compilation (starts in seconds; how fast does it sample?)
OVERRIDES = {"hf": ["generation.engine=hf"], "vllm": ["generation.engine=vllm"],
             "vllm-eager": ["generation.engine=vllm", "generation.enforce_eager=true"]}
PARTS = ("greedy", "label", "eval", "best-of-n", "ppo")
GREEDY_PROMPTS, GREEDY_TOKENS = 16, 32


def _policy(part: str, engine: str, sft: str, overrides: tuple[str, ...] = ()) -> tuple[Any, ...]:
    """The label or eval recipe with the engine changed, its SFT policy loaded, and its prompts."""
    from rlhf_pipeline.data.loading import load_datasets
    from rlhf_pipeline.stages import load_recipe
    from rlhf_pipeline.stages.common import load_frozen

    name = "label.yaml" if part == "label" else "eval.yaml"
    recipe = load_recipe(RECIPES / name, [f"model.name_or_path={sft}", *overrides, *OVERRIDES[engine]])
    sources, tokenizer, models = load_frozen(recipe, {"policy": sft})
    datasets, _ = load_datasets(recipe, tokenizer, prompts_only=True)
    return recipe, sources, tokenizer, models, [row["prompt"] for split in datasets.values() for row in split]


def sampling_child(part: str, engine: str, sft: str) -> dict[str, Any]:
    """Tokens/s of one sampling call of the label or eval stage, as the stage makes it."""
    from rlhf_pipeline.generation import sample_answers, sampling_engine

    recipe, sources, tokenizer, models, prompts = _policy(part, engine, sft)
    config = recipe.settings
    num_samples = config.num_samples if part == "label" else 1
    started = time.perf_counter()
    with sampling_engine(recipe.sections["generation"], models["policy"], tokenizer, config.batch_size,
                         sources["policy"].path) as sampler:
        ready = time.perf_counter()
        sampler.use(models["policy"], "policy")
        synced = time.perf_counter()
        samples = sample_answers(sampler, tokenizer, prompts, num_samples, config.max_new_tokens,
                                 config.temperature, config.top_p, config.seed, part)
        done = time.perf_counter()
    tokens = sum(len(s.answer_ids) for group in samples for s in group)
    return {"tokens_per_s": tokens / (done - synced), "tokens": float(tokens), "sampling_s": done - synced,
            "startup_s": ready - started, "sync_s": synced - ready, "answers": float(len(prompts) * num_samples)}


def greedy_child(engine: str, sft: str) -> dict[str, Any]:
    """Greedy answer ids, in float32, for the first GREEDY_PROMPTS held-out prompts of the eval recipe."""
    from rlhf_pipeline.generation import sample_answers, sampling_engine

    recipe, sources, tokenizer, models, prompts = _policy("eval", engine, sft, ("generation.dtype=float32",))
    with sampling_engine(recipe.sections["generation"], models["policy"], tokenizer, GREEDY_PROMPTS,
                         sources["policy"].path) as sampler:
        sampler.use(models["policy"], "policy")
        samples = sample_answers(sampler, tokenizer, prompts[:GREEDY_PROMPTS], 1, GREEDY_TOKENS, 0.0)
    return {"answers": [group[0].answer_ids for group in samples]}


def greedy_lines(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    """How many prompts' greedy answers vLLM gives exactly as HF does, and where the first differences are."""
    expected = results["hf"][0]["answers"]
    lines = []
    for engine, runs in results.items():
        for number, run in enumerate(runs, start=1):
            same = sum(a == b for a, b in zip(run["answers"], expected, strict=True))
            firsts = [next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
                      for a, b in zip(run["answers"], expected, strict=True) if a != b]
            where = f"; first differing token at {firsts}" if firsts else ""
            lines.append(f"  {engine} run {number}: {same}/{len(expected)} answers equal hf run 1 token for token "
                         f"({sum(map(len, run['answers']))} tokens){where}")
    return lines


def stage_child(part: str, engine: str, sft: str, rm: str, work: Path, steps: int,
                prompts: int | None = None) -> dict[str, Any]:
    """A whole best-of-n or PPO stage on the demo recipe with the engine changed; its wall time and breakdown."""
    from rlhf_pipeline.pipeline import run_stage
    from rlhf_pipeline.stages import load_recipe

    output = work / f"{part}-{engine}-{time.time_ns()}"
    if part == "best-of-n":
        overrides = [f"model.name_or_path={sft}", f"reward.model={rm}", f"best_of_n.output_dir={output}"]
        if prompts:
            overrides.append(f"data.max_samples={prompts}")
        recipe = load_recipe(RECIPES / "best-of-n.yaml", [*overrides, *OVERRIDES[engine]])
    else:
        overrides = [f"model.name_or_path={sft}", f"training.reward_model_path={rm}", f"training.output_dir={output}",
                     f"training.total_episodes={16 * steps}", "training.save_steps=1000",
                     "training.num_sample_generations=0"]
        recipe = load_recipe(RECIPES / "ppo.yaml", [*overrides, *OVERRIDES[engine]])
    run_stage(recipe, overwrite=True)
    metrics = json.loads((output / "metrics.json").read_text())
    resources = metrics["resources"]
    result = {"wall_s": resources["wall_seconds"],
              "tokens_per_s": float(resources["sampling"]["tokens_per_second"] or 0.0),
              "startup_s": float(resources["sampling"]["startup_seconds"])}
    if part == "ppo":
        later = [entry for entry in metrics["log_history"] if "time/sampling" in entry][1:]  # step 1 warms up
        for key in ("sampling", "sync", "scoring", "optimisation"):
            result[f"{key}_s"] = statistics.mean(entry[f"time/{key}"] for entry in later)
        result["step_s"] = sum(result[f"{key}_s"] for key in ("sampling", "sync", "scoring", "optimisation"))
        result["logprob_gap"] = statistics.mean(entry.get("generation/logprob_gap", 0.0) for entry in later)
    return result


def ratio_line(name: str, results: dict[str, list[dict[str, Any]]], key: str, higher_is_better: bool,
               target: float | None) -> str:
    hf, vllm = common.median(results["hf"], key), common.median(results["vllm"], key)
    speedup = vllm / hf if higher_is_better else hf / vllm
    aim = f" (target >= {target:g}x: {'met' if speedup >= target else 'NOT met'})" if target else ""
    return f"{name}: hf {hf:.4g}, vllm {vllm:.4g} -> vllm speed-up {speedup:.2f}x{aim}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/rlhf_vllm_bench"))
    parser.add_argument("--sft", type=Path, default=common.REPO / "outputs" / "smollm2-135m" / "sft")
    parser.add_argument("--rm", type=Path, default=common.REPO / "outputs" / "smollm2-135m" / "rm")
    parser.add_argument("--ppo-steps", type=int, default=3)
    parser.add_argument("--bon-prompts", type=int, help="best-of-n on the first N prompts (default: all 64)")
    parser.add_argument("--eager", action="store_true", help="also measure vLLM with enforce_eager")
    parser.add_argument("--python", default=os.environ.get("RLHF_VLLM_PYTHON",
                                                           str(common.REPO / ".venv-vllm" / "bin" / "python")))
    parser.add_argument("--child", nargs=2, metavar=("PART", "ENGINE"))
    args = parser.parse_args()
    if args.child:
        part, engine = args.child
        result = (greedy_child(engine, str(args.sft)) if part == "greedy"
                  else sampling_child(part, engine, str(args.sft)) if part in ("label", "eval")
                  else stage_child(part, engine, str(args.sft), str(args.rm), args.work, args.ppo_steps,
                                   args.bon_prompts))
        common.emit(result)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    needs_rm = bool({"best-of-n", "ppo"} & set(args.only))
    if not (args.sft / "stage.json").is_file() or (needs_rm and not (args.rm / "stage.json").is_file()):
        stages = common.prepare_stages(args.work)
        args.sft, args.rm = stages["sft"], stages["rm"]
    info = common.machine()
    lines = [f"policy {args.sft} (reward model {args.rm}); children in {args.python}; vLLM engine: the recipe "
             "defaults of generation: (sync merged on CPU, dtype auto, compiled)"]
    script = Path(__file__)
    engines = (*ENGINES, "vllm-eager") if args.eager else ENGINES
    for part in args.only:
        print(f"{part}:", flush=True)

        def measure(engine: str, part: str = part) -> dict[str, Any]:
            return common.run_child(script, ["--child", part, engine, "--sft", str(args.sft), "--rm", str(args.rm),
                                             "--work", str(args.work), "--ppo-steps", str(args.ppo_steps),
                                             *(["--bon-prompts", str(args.bon_prompts)] if args.bon_prompts else [])],
                                    python=args.python, timeout=7200)

        results = common.interleaved(engines, args.repeats, measure)
        if part == "greedy":
            lines.append(f"greedy in float32, {GREEDY_PROMPTS} eval prompts x {GREEDY_TOKENS} new tokens:")
            lines += greedy_lines(results)
            continue
        if part in ("label", "eval"):
            lines.append(ratio_line(f"{part} sampling tokens/s", results, "tokens_per_s", True, 5.0))
            for engine in engines[1:]:
                lines.append(f"  {engine}: {common.median(results[engine], 'tokens_per_s'):.4g} tokens/s, start-up "
                             f"{common.median(results[engine], 'startup_s'):.1f} s, policy sync "
                             f"{common.median(results[engine], 'sync_s'):.2f} s (not in tokens/s)")
        elif part == "best-of-n":
            lines.append(ratio_line("best-of-n stage wall time (s)", results, "wall_s", False, 4.0))
        else:
            lines.append(ratio_line("PPO seconds per step (after the first)", results, "step_s", False, None))
            for engine in engines:
                parts = ", ".join(f"{key} {common.median(results[engine], f'{key}_s'):.2f} s"
                                  for key in ("sampling", "sync", "scoring", "optimisation"))
                lines.append(f"  {engine}: {parts}")
            lines.append(f"  vllm mean |logp_engine - logp_train| per token: "
                         f"{common.median(results['vllm'], 'logprob_gap'):.4f}")
        lines.append("  per run: " + json.dumps({engine: [{k: round(v, 3) if isinstance(v, float) else v
                                                              for k, v in run.items()} for run in results[engine]]
                                                     for engine in engines}))
    common.report("vLLM vs Hugging Face generate", info, lines, os.getloadavg())


if __name__ == "__main__":
    main()
