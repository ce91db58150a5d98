"""Does every GPU path work, and how fast? One command, ≤ 8 minutes on one H100, on the embedded SmolLM2-135M.

    make gpu-check                                  # = python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --demo           # then the whole demo chain (`rlhf-pipeline run`), timed
    python benchmarks/gpu_check.py --gpus 8         # the DeepSpeed and FSDP paths on 8 processes instead of 1
    python benchmarks/gpu_check.py --only lora-sft,lora-rm --work /tmp/gpu-check
    python benchmarks/gpu_check.py --cpu            # every path with a CPU equivalent, a few steps each

Each path is the command a user runs — `rlhf-pipeline sft|rm|ppo|eval` on the shipped demo recipes
(recipes/smollm2-135m/) with `key=value` overrides, or `rlhf-pipeline launch --config <profile>` for DeepSpeed
and FSDP — or a measuring probe (gpu_probes.py), in its own process group with its own timeout: a path that
fails or hangs (killed at its timeout, with every process it started) hides nothing else; a path that needs the
outputs of one that did not pass is skipped, naming it. The paths:

  lora-{sft,rm,ppo,eval}    the demo chain with LoRA, in bf16 on GPUs (`dtype: auto`); fp32 on CPU
  qlora-{sft,rm,ppo,eval}   the same chain on the 4-bit NF4 base (bitsandbytes)
  qlora-checks              later stages keep ≥ 0.8 of the SFT adapter's effect on the 4-bit base (the rm stage's
                            backbone, PPO's reference); 4-bit LoRA gradients = a dequantised copy's (cosine ≥ 0.999)
  zero{2,3}-{sft,ppo}       DeepSpeed ZeRO-2 / ZeRO-3 (the shipped profiles; --gpus processes, 1 by default)
  fsdp-{sft,rm,ppo}         accelerate's FSDP2 profile; PPO refuses FSDP and the path checks that it says why
                            (on a CPU, where accelerate never picks FSDP, only that refusal runs)
  generate-<engine>         sampling tokens/s at batch 64 (generation.sample_answers), one path per engine
  demo                      with --demo: `rlhf-pipeline run recipes/smollm2-135m/pipeline.yaml`, end to end

Every stage path also checks what the stage recorded: the launch its ranks saw (DEEPSPEED with the right ZeRO
stage, FSDP) and, on a GPU, `peak_cuda_gib` in its resources. lora-ppo times each PPO step by part
(generation / scoring / optimisation). Output: <work>/gpu_check.json and a table (path, passed or failed with
the first error line, wall time against its budget, peak GPU memory, tokens/s, and for training steps the
model FLOPs utilisation from the model's FLOPs per token and the GPU's peak bf16 FLOP/s, benchmarks/mfu.py).
Exit 0 when every path that should work worked. Nothing is downloaded (HF_HUB_OFFLINE=1).

The budgets below are the timeouts on one GPU: they sum to at most 8 minutes (the run's own start-up
included), so the whole check ends within 8 minutes even if every path hangs. They are estimates (start-up
~8 s per process, SmolLM2 steps well under a second on an H100) until a first GPU run measures them: the JSON
records every path's wall time beside its budget. `--timeout-scale` stretches them (default 6 with --cpu).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import gpu_probes
import mfu

RECIPES = common.REPO / "recipes" / "smollm2-135m"
PROBES = Path(__file__).resolve().parent / "gpu_probes.py"
WHOLE_RUN_SECONDS = 480
STARTUP_SECONDS = 15  # this script's own start-up and its machine probe, within the 480
MARKER = ".gpu-check"  # a work folder with this file is ours to empty at the next run
FSDP_ON_CPU = ("no GPU: accelerate selects FSDP on GPUs only (on a CPU it runs plain DDP); "
               "tests/test_distributed.py runs FSDP2 on two CPU processes")


class PathFailed(Exception):
    """A path ran but what it produced is wrong (the message says what)."""


@dataclass
class Context:
    """One run's settings: where outputs go, CPU or GPU, the SFT base, processes for the distributed paths."""

    work: Path
    cpu: bool
    model: str | None
    gpus: int
    peak_flops: float | None = None
    max_length: int | None = None

    def folder(self, path: str) -> Path:
        return self.work / path

    def steps(self, gpu: int, cpu: int) -> int:
        return cpu if self.cpu else gpu


@dataclass(frozen=True)
class Plan:
    """What a path runs, and how its outputs become a row (raises PathFailed when they are wrong)."""

    command: list[str]
    collect: Callable[[], dict[str, Any]]
    cwd: Path = common.REPO


@dataclass(frozen=True)
class Check:
    name: str
    budget: int  # seconds on one H100: the path's timeout there
    plan: Callable[[Context], Plan]
    needs: tuple[str, ...] = ()
    gpu_only: str | None = None  # why the path cannot run on a CPU
    unavailable: Callable[[], str | None] = lambda: None  # a reason to skip it on this install
    refusal: str | None = None  # the path must be refused, with this text in the error


# ------------------------------------------------------------------------------------------------ stage paths

STAGE_RECIPES = {"sft": "sft.yaml", "rm": "rm.yaml", "ppo": "ppo.yaml", "eval": "eval.yaml"}
QLORA = ["model.quantization.load_in_4bit=true"]
LAUNCHES = {  # path prefix -> (GPU profile, CPU profile, what the ranks must report)
    "zero2": ("deepspeed_zero2", "deepspeed_zero2_cpu", ("DEEPSPEED", 2)),
    "zero3": ("deepspeed_zero3", "deepspeed_zero3_cpu", ("DEEPSPEED", 3)),
    "fsdp": ("fsdp", "fsdp", ("FSDP", None)),  # on a CPU only PPO's refusal runs (accelerate picks FSDP on GPUs)
}


def stage_overrides(ctx: Context, stage: str, chain: str, out: Path, processes: int = 1) -> list[str]:
    """Short runs of the demo recipes: the outputs of `chain` (lora, qlora) feed the later stages.

    On a CPU evaluation samples 8 short answers. `--max-length` sets every stage's data.max_length (the tests'
    tiny model tokenizes the demo text into about twice SmolLM2's tokens).
    """
    sft, rm, ppo = (ctx.folder(f"{chain}-{name}") for name in ("sft", "rm", "ppo"))
    length = [f"data.max_length={ctx.max_length}"] if ctx.max_length else []
    if stage == "sft":
        model = [f"model.name_or_path={ctx.model}"] if ctx.model else []
        return [*model, f"training.output_dir={out}", f"training.max_steps={ctx.steps(20, 3)}", "data.eval_split=0.0",
                *length]
    if stage == "rm":
        return [f"model.name_or_path={sft}", f"training.output_dir={out}", "data.train=[demo_preferences_warm]",
                f"data.max_samples={ctx.steps(192, 32)}", "data.eval_split=0.25",
                f"training.max_steps={ctx.steps(16, 2)}", *length]
    if stage == "ppo":
        episodes = 16 * ctx.steps(2, 1) * processes  # the recipe answers 16 prompts per process and step
        return [f"model.name_or_path={sft}", f"training.reward_model_path={rm}", f"training.output_dir={out}",
                f"training.total_episodes={episodes}", f"training.save_steps={ctx.steps(2, 1)}",
                "training.num_sample_generations=0", *length]
    cpu = ["data.max_samples=8", "evaluation.max_new_tokens=8"] if ctx.cpu else []
    return [f"model.name_or_path={sft}", f"evaluation.policy={ppo}", f"evaluation.reward_model={rm}",
            f"evaluation.output_dir={out}", "evaluation.batch_size=64", "evaluation.bootstrap_samples=200", *length,
            *cpu]


def stage_plan(stage: str, chain: str, launch: str | None = None) -> Callable[[Context], Plan]:
    """The stage's own command (under `rlhf-pipeline launch` with a profile for a distributed path)."""

    def plan(ctx: Context) -> Plan:
        name = f"{launch or chain}-{stage}"
        out = ctx.folder(name)
        processes = 1 if launch is None else ctx.gpus
        args = [stage, str(RECIPES / STAGE_RECIPES[stage]), *stage_overrides(ctx, stage, chain, out, processes),
                *(QLORA if chain == "qlora" else [])]
        expected = None
        if launch is not None:
            gpu_profile, cpu_profile, expected = LAUNCHES[launch]
            profile = cpu_profile if ctx.cpu else gpu_profile
            command = [sys.executable, "-m", "rlhf_pipeline", "launch", "--config", profile, "--num-processes",
                       str(ctx.gpus), "--main-process-port", "0", *args]
        elif stage == "ppo":  # the same command, with its steps timed by part
            command = [sys.executable, str(PROBES), "ppo-timed", "--out", str(out / "ppo_timing.json"), "--", *args]
        else:
            command = [sys.executable, "-m", "rlhf_pipeline", *args]
        return Plan(command, lambda: collect_stage(ctx, stage, out, expected))

    return plan


def collect_stage(ctx: Context, stage: str, out: Path, expected: tuple[str, int | None] | None) -> dict[str, Any]:
    """A finished stage's row: its resources, the launch its ranks saw, tokens/s and MFU of its training."""
    if not (out / "stage.json").is_file():
        raise PathFailed(f"exited 0 but {out} holds no finished stage (stage.json)")
    manifest = json.loads((out / "stage.json").read_text(encoding="utf-8"))
    metrics = manifest["metrics"]
    resources = metrics.get("resources") or {}
    row: dict[str, Any] = {"peak_gpu_gib": resources.get("peak_cuda_gib"), "peak_rss_gib": resources.get(
        "peak_rss_gib"), "stage_seconds": resources.get("wall_seconds")}
    if not ctx.cpu and resources.get("peak_cuda_gib") is None:
        raise PathFailed(f"{out / 'stage.json'}: metrics.resources.peak_cuda_gib is null on a GPU run")
    if expected is not None:
        kind, zero_stage = expected
        seen = (metrics.get("distributed_type"), metrics.get("zero_stage"), metrics.get("world_size"))
        if seen != (kind, zero_stage, ctx.gpus):
            raise PathFailed(f"the ranks ran {seen[0]} (ZeRO stage {seen[1]}, {seen[2]} process(es)), not {kind}"
                             + (f" ZeRO-{zero_stage}" if zero_stage else "") + f" with {ctx.gpus}")
        row["launch"] = f"{seen[0]}" + (f" ZeRO-{seen[1]}" if seen[1] else "") + f" ×{seen[2]}"
    config = mfu.read_config(manifest["base_model"]["path"])
    gpus = metrics.get("world_size") or 1
    if stage in ("sft", "rm"):
        final = next((log for log in reversed(metrics.get("log_history", [])) if "train_runtime" in log), {})
        tokens, seconds = final.get("num_tokens"), final.get("train_runtime")
        if tokens and seconds:
            rate = tokens / seconds
            flops = mfu.training_flops_per_token(config, context=recipe_max_length(out), logits=stage == "sft")
            row |= {"tokens_per_second": round(rate, 1), "mfu": mfu.mfu(rate, flops, ctx.peak_flops, gpus)}
    if stage == "ppo" and (out / "ppo_timing.json").is_file():
        timing = json.loads((out / "ppo_timing.json").read_text(encoding="utf-8"))
        row |= ppo_row(ctx, config, timing["steps"], recipe_max_length(out))
    if stage == "eval":
        policies = json.loads((out / "eval.json").read_text(encoding="utf-8"))["policies"]
        row["kl_per_answer"] = {name: result["kl"]["mean"] for name, result in policies.items()}
    return row


def recipe_max_length(out: Path) -> int:
    """The stage's `data.max_length` (its longest sequence), read from the resolved recipe it saved."""
    import yaml

    recipe = yaml.safe_load((out / "recipe.yaml").read_text(encoding="utf-8"))
    return int(recipe["data"]["max_length"])


def ppo_row(ctx: Context, config: dict[str, Any], steps: list[dict[str, float]], context: int) -> dict[str, Any]:
    """Generation tokens/s and the step's breakdown (after the first step, a warm-up, when there are more); the
    MFU of the optimisation: policy and critic passes over every prompt + answer token (one PPO epoch)."""
    steady = steps[1:] or steps
    total = statistics.median(step["rollout"] + step["optimisation"] for step in steady)
    parts = {part: statistics.median(step.get(part, 0.0) for step in steady) for part in common.PPO_PARTS}
    rate = statistics.median(step["answer tokens"] / step["generation"] for step in steady)
    trained = statistics.median(step["sequence tokens"] / step["optimisation"] for step in steady)
    flops = (mfu.training_flops_per_token(config, context) + mfu.training_flops_per_token(config, context,
                                                                                          logits=False))
    return {"tokens_per_second": round(rate, 1), "mfu": mfu.mfu(trained, flops, ctx.peak_flops),
            "ppo_step": {"seconds": round(total, 3), "steps_measured": len(steady),
                         "parts": {part: round(seconds, 3) for part, seconds in parts.items()},
                         "first_step_seconds": round(steps[0]["rollout"] + steps[0]["optimisation"], 3)}}


# ------------------------------------------------------------------------------------------------ probe paths


def generate_plan(engine: str) -> Callable[[Context], Plan]:
    def plan(ctx: Context) -> Plan:
        out = ctx.folder(f"generate-{engine}") / "result.json"
        command = [sys.executable, str(PROBES), "generate", "--engine", engine, "--policy", str(ctx.folder("lora-sft")),
                   "--out", str(out), "--prompts", "64", "--batch", "64", "--new-tokens", str(ctx.steps(128, 16))]
        return Plan(command, lambda: read_probe(out, ("tokens_per_second", "answer_tokens", "seconds")))

    return plan


def engine_missing(engine: str) -> Callable[[], str | None]:
    package = gpu_probes.ENGINES[engine].package
    return lambda: None if importlib.util.find_spec(package) else f"{package} is not installed"


def qlora_checks_plan(ctx: Context) -> Plan:
    out = ctx.folder("qlora-checks") / "result.json"
    command = [sys.executable, str(PROBES), "qlora-checks", "--sft", str(ctx.folder("qlora-sft")),
               "--rm", str(ctx.folder("qlora-rm")), "--out", str(out)]
    return Plan(command, lambda: read_probe(out, ("sft_effect_kept_in_rm_backbone", "sft_effect_kept_in_ppo_reference",
                                                  "lora_gradient_cosine_vs_dequantised", "compute_dtype")))


def read_probe(out: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    if not out.is_file():
        raise PathFailed(f"exited 0 but wrote no {out}")
    result = json.loads(out.read_text(encoding="utf-8"))
    row = {"peak_gpu_gib": result.get("peak_gpu_gib"), "peak_rss_gib": result.get("peak_rss_gib"),
           "tokens_per_second": result.get("tokens_per_second")}
    return row | {"details": {key: result[key] for key in keys if key in result}}


def demo_plan(ctx: Context) -> Plan:
    """The whole demo chain as `make demo` runs it, in <work>/demo (the recipes' relative output folders)."""
    cwd = ctx.folder("demo")
    cwd.mkdir(parents=True, exist_ok=True)
    outputs = cwd / "outputs" / "smollm2-135m"

    def collect() -> dict[str, Any]:
        return {"details": {"finished": sorted(p.name for p in outputs.iterdir() if (p / "stage.json").is_file())}}

    return Plan([sys.executable, "-m", "rlhf_pipeline", "run", str(RECIPES / "pipeline.yaml")], collect, cwd=cwd)


# ---------------------------------------------------------------------------------------------------- the paths

CHECKS: tuple[Check, ...] = (
    Check("lora-sft", 25, stage_plan("sft", "lora")),
    Check("lora-rm", 20, stage_plan("rm", "lora"), needs=("lora-sft",)),
    Check("lora-ppo", 35, stage_plan("ppo", "lora"), needs=("lora-sft", "lora-rm")),
    Check("lora-eval", 20, stage_plan("eval", "lora"), needs=("lora-sft", "lora-rm", "lora-ppo")),
    Check("qlora-sft", 25, stage_plan("sft", "qlora")),
    Check("qlora-rm", 20, stage_plan("rm", "qlora"), needs=("qlora-sft",)),
    Check("qlora-ppo", 35, stage_plan("ppo", "qlora"), needs=("qlora-sft", "qlora-rm")),
    Check("qlora-eval", 20, stage_plan("eval", "qlora"), needs=("qlora-sft", "qlora-rm", "qlora-ppo")),
    Check("qlora-checks", 20, qlora_checks_plan, needs=("qlora-sft", "qlora-rm")),
    Check("zero2-sft", 25, stage_plan("sft", "lora", "zero2")),
    Check("zero2-ppo", 35, stage_plan("ppo", "lora", "zero2"), needs=("lora-sft", "lora-rm")),
    Check("zero3-sft", 25, stage_plan("sft", "lora", "zero3")),
    Check("zero3-ppo", 40, stage_plan("ppo", "lora", "zero3"), needs=("lora-sft", "lora-rm")),
    Check("fsdp-sft", 25, stage_plan("sft", "lora", "fsdp"), gpu_only=FSDP_ON_CPU),
    Check("fsdp-rm", 25, stage_plan("rm", "lora", "fsdp"), needs=("lora-sft",), gpu_only=FSDP_ON_CPU),
    Check("fsdp-ppo", 10, stage_plan("ppo", "lora", "fsdp"), needs=("lora-sft", "lora-rm"), refusal="FSDP"),
    *(Check(f"generate-{name}", engine.budget, generate_plan(name), needs=("lora-sft",),
            unavailable=engine_missing(name)) for name, engine in gpu_probes.ENGINES.items()),
)
DEMO = Check("demo", 1800, demo_plan)  # --demo only; not part of the 8 minutes


# ----------------------------------------------------------------------------------------------- running a path

@dataclass
class Outcome:
    status: str  # passed, failed, skipped
    detail: str = ""
    wall_seconds: float | None = None
    row: dict[str, Any] = field(default_factory=dict)


def first_error_line(log: str) -> str:
    """The line that says what went wrong: our CLI's `error:` line or a rank's failure, else the exception line
    of the first traceback (torchrun's `[rankN]: ` prefixes removed), else the last line."""
    lines = [re.sub(r"^\[rank\d+\]: ?", "", line.rstrip()) for line in log.splitlines() if line.strip()]
    lines = [line for line in lines if line.strip()]
    for line in lines:
        if line.startswith("error: ") or re.match(r"rank \d+ of \d+ failed: ", line):
            return line
    for index, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last)"):
            for after in lines[index + 1:]:
                if not after[0].isspace() and not after.startswith(("During handling", "The above exception")):
                    return after
    return lines[-1] if lines else "(no output)"


def stop_tree(pid: int, grace: float = 10.0) -> None:
    """End a path's process and every process it started (by id), politely first, then for good."""
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.terminate()
        _, alive = psutil.wait_procs(tree, timeout=grace)
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(alive, timeout=grace)


def run_path(check: Check, plan: Plan, timeout: float, log: Path, env: dict[str, str]) -> Outcome:
    """Run one path in its own session; kill it (and its children) at `timeout`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log.open("w", encoding="utf-8") as output:
        output.write(f"$ {shlex.join(plan.command)}\n")
        output.flush()
        process = subprocess.Popen(plan.command, cwd=plan.cwd, env=env, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_tree(process.pid)
            process.wait()
            return Outcome("failed", f"timed out after {timeout:.0f} s (budget {check.budget} s); killed",
                           time.monotonic() - started)
    wall = time.monotonic() - started
    text = log.read_text(encoding="utf-8", errors="replace")
    if check.refusal is not None:  # our `error:` line (status 2; under a launcher, its own non-zero status)
        line = first_error_line(text)
        if code != 0 and line.startswith("error: ") and check.refusal in line:
            return Outcome("passed", f"refused as designed: {line}", wall)
        return Outcome("failed", f"expected an error naming {check.refusal}, got exit {code}: {line}", wall)
    if code != 0:
        return Outcome("failed", first_error_line(text), wall)
    try:
        return Outcome("passed", "", wall, plan.collect())
    except (PathFailed, OSError, KeyError, ValueError) as err:  # the outputs are missing or wrong
        return Outcome("failed", str(err) if isinstance(err, PathFailed) else f"{type(err).__name__}: {err}", wall)


def injected(plan: Plan, kind: str, work: Path, name: str) -> Plan:
    """The path replaced by a probe that fails or hangs (`--inject`), for the tests of this harness."""
    if kind == "fail":
        return Plan([sys.executable, str(PROBES), "fail"], plan.collect)
    return Plan([sys.executable, str(PROBES), "hang", "--pid-file", str(work / f"{name}.pids")], plan.collect)


# ------------------------------------------------------------------------------------------------------ the run

def machine(cpu: bool) -> dict[str, Any]:
    """Where the check ran (asked of torch in a child, so this process never holds GPU memory)."""
    probe = ("import json, platform, torch; c = torch.cuda.is_available(); print(json.dumps({'cuda': c, "
             "'gpus': [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if c else [], "
             "'torch': torch.__version__, 'cuda_version': torch.version.cuda, 'python': platform.python_version()}))")
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if cpu else {})}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    info = json.loads(done.stdout.strip().splitlines()[-1])
    return info | {k: v for k, v in common.machine().items() if k in ("date", "cpu", "cores", "ram_gib", "packages",
                                                                       "load_average")}


def prepare_work(work: Path) -> None:
    """An empty work folder: ours from an earlier run (emptied), new, or empty; anything else is refused."""
    if work.exists() and any(work.iterdir()):
        if not (work / MARKER).is_file():
            raise SystemExit(f"error: {work} is not empty and was not made by gpu_check.py; choose another --work")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("made by benchmarks/gpu_check.py; emptied at its next run\n", encoding="utf-8")


def child_env(cpu: bool) -> dict[str, str]:
    env = {**os.environ, **common.OFFLINE}
    env.pop("ACCELERATE_USE_CPU", None)  # it would turn DeepSpeed off silently
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_checks(ctx: Context, checks: tuple[Check, ...], only: set[str] | None, timeouts: dict[str, float],
               scale: float, inject: dict[str, str], say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every path in order; each row says what happened, whatever happened to the others."""
    env = child_env(ctx.cpu)
    results: dict[str, Outcome] = {}
    rows = []
    for check in checks:
        timeout = timeouts.get(check.name, check.budget * scale)
        waiting = [need for need in check.needs if results.get(need) is None or results[need].status != "passed"]
        if ctx.cpu and check.gpu_only:
            outcome = Outcome("skipped", check.gpu_only)
        elif only is not None and check.name not in only:
            outcome = Outcome("skipped", "not selected (--only)")
        elif (reason := check.unavailable()) is not None:
            outcome = Outcome("skipped", reason)
        elif waiting:
            outcome = Outcome("skipped", "needs " + ", ".join(
                f"{need} ({results[need].status if need in results else 'not run'})" for need in waiting))
        else:
            say(f"{check.name}: running (timeout {timeout:.0f} s)")
            plan = check.plan(ctx)
            if check.name in inject:
                plan = injected(plan, inject[check.name], ctx.work, check.name)
            outcome = run_path(check, plan, timeout, ctx.work / "logs" / f"{check.name}.log", env)
            say(f"{check.name}: {outcome.status} in {outcome.wall_seconds:.1f} s"
                + (f": {outcome.detail}" if outcome.detail else ""))
        results[check.name] = outcome
        rows.append({"path": check.name, "status": outcome.status, "detail": outcome.detail,
                     "wall_seconds": None if outcome.wall_seconds is None else round(outcome.wall_seconds, 1),
                     "budget_seconds": check.budget, "timeout_seconds": round(timeout, 1),
                     "log": str(ctx.work / "logs" / f"{check.name}.log") if outcome.wall_seconds is not None else None,
                     **dict.fromkeys(("peak_gpu_gib", "peak_rss_gib", "tokens_per_second", "mfu")), **outcome.row})
    return rows


def table(rows: list[dict[str, Any]], cpu: bool = False) -> str:
    """The printed summary: one line per path (peak GPU memory, or on a CPU peak RSS), the PPO steps below."""
    def number(value: Any, form: str) -> str:
        return "—" if value is None else format(value, form)

    memory = "peak_rss_gib" if cpu else "peak_gpu_gib"
    lines = [f"{'path':<15} {'result':<62} {'wall s':>7} {'budget':>6} {'RSS GiB' if cpu else 'GPU GiB':>8} "
             f"{'tok/s':>8} {'MFU':>6}"]
    for row in rows:
        result = row["status"] + (f": {row['detail']}" if row["detail"] else "")
        lines.append(f"{row['path']:<15} {result[:62]:<62} {number(row['wall_seconds'], '.1f'):>7} "
                     f"{row['budget_seconds']:>6} {number(row.get(memory), '.2f'):>8} "
                     f"{number(row['tokens_per_second'], '.0f'):>8} {number(row['mfu'], '.1%'):>6}")
    for row in rows:
        if "ppo_step" in row:
            step = row["ppo_step"]
            lines.append(f"{row['path']} step: {step['seconds']:.2f} s (median of {step['steps_measured']}; first "
                         f"{step['first_step_seconds']:.2f} s): " + ", ".join(
                             f"{part} {seconds / step['seconds']:.0%}" for part, seconds in step["parts"].items()))
    return "\n".join(lines)


def with_needs(names: set[str], checks: tuple[Check, ...]) -> set[str]:
    """The named paths and every path they need, directly or not."""
    needs = {check.name: check.needs for check in checks}
    chosen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name not in chosen:
            chosen.add(name)
            todo.extend(needs.get(name, ()))
    return chosen


def parse_pairs(values: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        key, sep, setting = value.partition("=" if flag == "--timeout" else ":")
        if not sep:
            raise SystemExit(f"error: {flag} {value}: expected " + ("PATH=SECONDS" if flag == "--timeout"
                                                                    else "fail:PATH or hang:PATH"))
        pairs[setting if flag == "--inject" else key] = key if flag == "--inject" else setting
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:3]))
    parser.add_argument("--cpu", action="store_true", help="the CPU equivalents, a few steps each (GPU-only paths "
                                                           "say 'skipped: no GPU')")
    parser.add_argument("--work", type=Path, default=common.REPO / "outputs" / "gpu-check",
                        help="folder for the stages, logs and gpu_check.json (emptied first if an earlier run made it)")
    parser.add_argument("--gpus", type=int, default=1, help="processes for the DeepSpeed and FSDP paths")
    parser.add_argument("--model", help="the SFT paths' base instead of the embedded SmolLM2-135M (tests: a tiny "
                                        "model folder)")
    parser.add_argument("--max-length", type=int, help="every stage's data.max_length (default: the recipes' 128)")
    parser.add_argument("--only", help="comma-separated paths to run (the others are listed as not selected)")
    parser.add_argument("--demo", action="store_true",
                        help="also run the whole demo chain, timed (beyond the 8 minutes)")
    parser.add_argument("--timeout-scale", type=float, help="multiply every budget (default 1 on GPUs, 6 with --cpu)")
    parser.add_argument("--timeout", action="append", default=[], metavar="PATH=SECONDS", help="one path's timeout")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if benchmarks/mfu.py lacks it")
    parser.add_argument("--inject", action="append", default=[], metavar="fail:PATH|hang:PATH",
                        help="replace a path by a failing or hanging process (tests of this script)")
    args = parser.parse_args(argv)
    checks = (*CHECKS, DEMO) if args.demo else CHECKS
    names = {check.name for check in checks}
    only = with_needs(set(args.only.split(",")), checks) if args.only else None
    timeouts = {name: float(seconds) for name, seconds in parse_pairs(args.timeout, "--timeout").items()}
    inject = parse_pairs(args.inject, "--inject")
    unknown = sorted(((only or set()) | timeouts.keys() | inject.keys()) - names)
    if unknown:
        raise SystemExit(f"error: unknown path(s) {', '.join(unknown)}; paths: {', '.join(sorted(names))}")
    started = time.monotonic()
    info = machine(args.cpu)
    if not args.cpu and not info["cuda"]:
        build = (f"torch {info['torch']}, built for CUDA {info['cuda_version']}" if info["cuda_version"]
                 else f"torch {info['torch']}, a CPU build")
        print(f"error: {build}, sees no GPU; with a GPU present, is the NVIDIA driver older than that CUDA needs "
              "(nvidia-smi; docs/gpu.md, 'Install')? Without one, run with --cpu", file=sys.stderr)
        return 2
    prepare_work(args.work)
    device = "cpu" if args.cpu else info["gpus"][0]
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (None if args.cpu else mfu.peak_bf16_flops(device))
    ctx = Context(args.work.resolve(), args.cpu, args.model, args.gpus, peak, args.max_length)
    scale = args.timeout_scale or (6.0 if args.cpu else 1.0)
    mode = "CPU equivalents" if args.cpu else f"{args.gpus} process(es) for the distributed paths"
    print(f"gpu_check: {len(checks)} paths on {device} ({mode}); budgets total {sum(c.budget for c in CHECKS)} s; "
          f"work folder {ctx.work}", flush=True)
    rows = run_checks(ctx, checks, only, timeouts, scale, inject, lambda text: print(text, flush=True))
    report = {"machine": info, "mode": "cpu" if args.cpu else "gpu", "device": device,
              "peak_bf16_tflops": None if peak is None else peak / 1e12, "gpus_for_distributed_paths": args.gpus,
              "model": args.model or "smollm2-135m-instruct (embedded)",
              "budget_seconds": sum(c.budget for c in CHECKS),
              "wall_seconds": round(time.monotonic() - started, 1), "paths": rows}
    (ctx.work / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print("\n" + table(rows, args.cpu))
    failed = [row["path"] for row in rows if row["status"] == "failed"]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} paths passed or were skipped; "
          + (f"FAILED: {', '.join(failed)}" if failed else "none failed")
          + f"; {report['wall_seconds']:.0f} s in all; {ctx.work / 'gpu_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
