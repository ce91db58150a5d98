"""What every benchmark shares: memory readings from /proc, child processes, interleaved repeats, machine facts.

Each benchmark is a parent that starts one fresh child process per measurement (`--child MODE`) and
alternates the modes it compares (A, B, A, B, ...), so background load on a shared machine hits both sides
alike; it reports medians and their ratio. A child prints one JSON line last.

Memory: resident set size from /proc/self/status. A child takes its baseline after importing every library
a stage uses and warming autograd up, before any weights load; just before training it hands freed heap back
(`malloc_trim`) and resets the kernel's high-water mark (`/proc/self/clear_refs` = 5), so `peak − baseline` is
the training peak: weights + trainable state + activations (+ what the allocator keeps).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MB = 2**20
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
for _key, _value in OFFLINE.items():
    os.environ.setdefault(_key, _value)
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def status(field: str) -> int:
    """A /proc/self/status memory field in bytes (VmRSS, VmHWM)."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) * 1024


def trim() -> None:
    """Collect garbage and hand free heap pages back, so RSS is what is live."""
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak() -> None:
    """Make VmHWM equal the current RSS (Linux >= 4.0): the next peak is measured from here."""
    Path("/proc/self/clear_refs").write_text("5")


def import_libraries() -> None:
    """Everything a stage imports, so library code (~0.5 GB resident) is baseline, not peak."""
    for name in ("torch", "transformers", "peft", "accelerate", "datasets", "trl", "trl.trainer.sft_trainer",
                 "trl.trainer.reward_trainer", "rlhf_pipeline.stages.common", "rlhf_pipeline.data.loading",
                 "rlhf_pipeline.ppo.trainer", "deepspeed"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def warm_up() -> None:
    """First-use allocations of autograd, AdamW, SDPA and the thread pools belong to the baseline."""
    import torch

    layer = torch.nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(layer.parameters())
    for _ in range(2):
        layer(torch.randn(8, 64)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    query = torch.randn(1, 2, 8, 4, requires_grad=True)
    torch.nn.functional.scaled_dot_product_attention(query, query, query).sum().backward()


def baseline() -> int:
    """Import, warm up, trim, and return the RSS every measurement is taken against."""
    import_libraries()
    from rlhf_pipeline.distributed import process_state

    process_state()
    warm_up()
    trim()
    return status("VmRSS")


class TrainWindow:
    """Wraps a `train` method: resets the peak when it starts; records seconds and peak RSS when it ends."""

    def __init__(self) -> None:
        self.seconds: float | None = None
        self.cpu_seconds: float | None = None  # this process's CPU time: steadier than wall time on a busy machine
        self.peak: int | None = None
        self.start_rss: int | None = None

    def wrap(self, owner: type, name: str = "train") -> None:
        original = getattr(owner, name)
        window = self

        def train(self: Any, *args: Any, **kwargs: Any) -> Any:
            trim()
            window.start_rss = status("VmRSS")
            reset_peak()
            started, cpu_started = time.perf_counter(), time.process_time()
            result = original(self, *args, **kwargs)
            window.seconds = time.perf_counter() - started
            window.cpu_seconds = time.process_time() - cpu_started
            window.peak = status("VmHWM")
            return result

        setattr(owner, name, train)


def threads() -> str:
    """Torch threads per child: 1 unless BENCH_THREADS says otherwise.

    On a shared 2-core machine two OpenMP threads that meet another busy process spin-wait for each other:
    an SFT step of SmolLM2 took 23 s forward with 2 threads and 2.7 s with 1 (load average ~5). One thread
    per child keeps the comparison about the code, not about the neighbours.
    """
    return os.environ.get("BENCH_THREADS", "1")


def run_child(script: Path, args: Sequence[str], env: dict[str, str] | None = None,
              timeout: float = 3600, python: str | None = None) -> dict[str, Any]:
    """Run `python script args` in a fresh process (this interpreter unless `python` names another environment's)
    and return the JSON object it printed last."""
    done = subprocess.run([python or sys.executable, str(script), *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **OFFLINE, "OMP_NUM_THREADS": threads(), **(env or {})},
                          timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def interleaved(modes: Sequence[str], repeats: int, measure: Callable[[str], dict[str, Any]],
                say: Callable[[str], None] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Measure each mode `repeats` times, alternating modes, so background load affects all alike."""
    say = say or (lambda text: print(text, flush=True))
    results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    for round_ in range(repeats):
        for mode in modes:
            load = os.getloadavg()[0]
            result = measure(mode)
            result["load_before"] = load
            results[mode].append(result)
            say(f"  round {round_ + 1}/{repeats} {mode}: " + ", ".join(
                f"{k}={v:.3g}" for k, v in result.items() if isinstance(v, float)))
    return results


def median(results: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in results)


def machine() -> dict[str, Any]:
    """Where and with what the numbers were measured."""
    from importlib.metadata import version

    cpu = "unknown"
    with contextlib.suppress(OSError):
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = match.group(1).strip() if match else cpu
    total = 0
    with contextlib.suppress(OSError, AttributeError):
        total = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) * 1024
    packages = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        with contextlib.suppress(Exception):
            packages[name] = version(name)
    return {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "cpu": cpu, "cores": os.cpu_count(),
            "ram_gib": round(total / 2**30, 1), "python": platform.python_version(), "packages": packages,
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "allocator": f"MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}"
            if "MALLOC_MMAP_THRESHOLD_" in os.environ else "glibc default"}


def emit(result: dict[str, Any]) -> None:
    """A child's last line: its measurement as JSON."""
    print("\n" + json.dumps(result), flush=True)


def report(title: str, machine_info: dict[str, Any], lines: list[str], load_after: Sequence[float]) -> None:
    print(f"\n== {title}")
    print(f"{machine_info['date']}; {machine_info['cpu']}, {machine_info['cores']} cores, "
          f"{machine_info['ram_gib']} GiB; " + ", ".join(f"{k} {v}" for k, v in machine_info["packages"].items()))
    print(f"load average before {machine_info['load_average']}, after {[round(x, 2) for x in load_after]}; "
          f"malloc: {machine_info['allocator']}; torch threads per child: {threads()}")
    for line in lines:
        print(line)


def prepare_stages(work: Path, say: Callable[[str], None] = print) -> dict[str, Path]:
    """Small finished SFT and RM stages on SmolLM2 in `work` (reused when already there), for the PPO benchmarks.

    SFT: the demo recipe for 4 steps; RM: the demo RM recipe from that SFT output on the shipped preference
    pairs (64 of them, 4 steps). Enough for PPO to load real stage outputs; not meant to be good models.
    """
    sft, rm = work / "sft", work / "rm"
    recipes = REPO / "recipes" / "smollm2-135m"
    jobs = [("sft", recipes / "sft.yaml", [f"training.output_dir={sft}", "training.max_steps=4",
                                            "training.save_strategy='no'", "data.eval_split=0.0"]),
            ("rm", recipes / "rm.yaml", [f"model.name_or_path={sft}", f"training.output_dir={rm}",
                                          "data.train=[demo_preferences_warm]", "data.max_samples=64",
                                          "data.eval_split=0.25", "training.max_steps=4",
                                          "training.save_strategy='no'"])]
    for name, recipe, overrides in jobs:
        if (work / name / "stage.json").is_file():
            continue
        say(f"preparing a small finished {name} stage in {work / name}")
        done = subprocess.run([sys.executable, "-m", "rlhf_pipeline", name, str(recipe), *overrides],
                              capture_output=True, text=True, cwd=REPO, timeout=3600,
                              env={**os.environ, **OFFLINE, "OMP_NUM_THREADS": threads()})
        if done.returncode != 0:
            raise RuntimeError(f"{name} stage failed:\n{done.stderr[-4000:]}")
    return {"sft": sft, "rm": rm}


PPO_PARTS = ("generation", "policy logprobs", "reference logprobs", "value", "reward", "rollout other", "optimisation")


class PPOStepTimer:
    """Where each PPO step's time goes, measured by wrapping ppo/trainer.py's own code (the originals run unchanged).

    `install()` wraps the trainer's `rollout` (and within it `_generate`, `response_logits` for the policy role,
    then the reference role, `response_values` and `score_responses`) and `ppo_update` (and within it the update's
    own `response_logits` and `response_values`). Each finished step
    becomes a dict in `steps`: the seconds of every part of PPO_PARTS, the whole `rollout`, `optimisation
    forwards` (the update's own policy and value passes), `answer tokens` (sampled, up to the stop token) and
    `sequence tokens` (prompt + answer, what the update's passes process). `clock` is CPU time by default (one
    torch thread: steady on a shared machine); on a GPU pass `cuda_wall_clock`, as kernels run asynchronously.
    """

    def __init__(self, clock: Callable[[], float] = time.process_time) -> None:
        self.clock = clock
        self.steps: list[dict[str, float]] = []
        self._current: dict[str, float] = defaultdict(float)
        self._in_rollout = False
        self._logits_calls = 0

    @contextlib.contextmanager
    def _timed(self, part: str) -> Iterator[None]:
        started = self.clock()
        yield
        self._current[part] += self.clock() - started

    def _wrap(self, owner: Any, name: str, part_of: Callable[[], str]) -> None:
        """Time calls of owner.name (a method, or a module function the trainer looks up when it calls it)."""
        original = getattr(owner, name)

        def timed_call(*args: Any, **kwargs: Any) -> Any:
            with self._timed(part_of()):
                return original(*args, **kwargs)

        setattr(owner, name, timed_call)

    def _logits_part(self) -> str:
        """In a rollout the policy's logits come first, then the reference's, chunk by chunk."""
        if not self._in_rollout:
            return "optimisation forwards"
        self._logits_calls += 1
        return "policy logprobs" if self._logits_calls % 2 else "reference logprobs"

    def install(self) -> None:
        from rlhf_pipeline.ppo import trainer as trainer_module
        from rlhf_pipeline.ppo import update as update_module
        from rlhf_pipeline.ppo.trainer import PPOTrainer

        timer = self
        self._wrap(PPOTrainer, "_generate", lambda: "generation")
        for module in (trainer_module, update_module):  # the rollout's passes, then the update's
            self._wrap(module, "response_logits", self._logits_part)
            self._wrap(module, "response_values", lambda: "value" if self._in_rollout else "optimisation forwards")
        self._wrap(trainer_module, "score_responses", lambda: "reward")
        original_rollout, original_update = PPOTrainer.rollout, PPOTrainer.ppo_update

        def rollout(self: Any, prompts: Any) -> Any:
            timer._in_rollout = True
            started = timer.clock()
            try:
                result = original_rollout(self, prompts)
            finally:
                timer._in_rollout = False
            timer._current["rollout"] = timer.clock() - started
            timer._current["answer tokens"] = int(result.response_mask.sum())
            timer._current["sequence tokens"] = int(result.attention_mask.sum())
            return result

        def ppo_update(self: Any, rollout_: Any) -> Any:
            started = timer.clock()
            result = original_update(self, rollout_)
            step = dict(timer._current, optimisation=timer.clock() - started)
            step["rollout other"] = step["rollout"] - sum(step.get(part, 0.0) for part in PPO_PARTS[:5])
            timer.steps.append(step)
            timer._current.clear()
            return result

        PPOTrainer.rollout, PPOTrainer.ppo_update = rollout, ppo_update


def cuda_wall_clock() -> float:
    """Wall time after the GPU's queued work has finished (the CPU clock alone would time kernel launches)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()
