"""benchmarks/gpu_check.py, the GPU check, as it runs on a CPU (`--cpu`) on the tiny model.

The default suite runs a few real paths together with one made to fail and one made to hang (`--inject`): the
failure is reported with its error line, the hang is killed at its timeout with the process it started, and the
paths after them still run. The slow test runs every path with a CPU equivalent and wants them all to pass.
The pieces the numbers come from (FLOPs per token, the GPU peak table, the error line) are checked on their own.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))
import gpu_check  # noqa: E402
import mfu  # noqa: E402

PATHS = [check.name for check in gpu_check.CHECKS]
GPU_ONLY = {check.name for check in gpu_check.CHECKS if check.gpu_only}


def run_check(work: Path, model: Path, *flags: str, timeout: float) -> tuple[subprocess.CompletedProcess[str],
                                                                              dict[str, Any]]:
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--model", str(model), "--max-length", "256",
                           "--work", str(work), *flags],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env={**gpu_check.child_env(cpu=True), "OMP_NUM_THREADS": "1"})
    report = json.loads((work / "gpu_check.json").read_text())
    return done, report


def rows_by_path(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    assert [row["path"] for row in report["paths"]] == PATHS  # one row per path, in order, whatever happened
    return {row["path"]: row for row in report["paths"]}


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_failing_and_a_hanging_path_are_reported_and_the_others_still_run(tmp_path: Path,
                                                                            tiny_model_dir: Path) -> None:
    started = time.monotonic()
    done, report = run_check(tmp_path / "work", tiny_model_dir, "--only", "lora-ppo,qlora-sft,generate-hf",
                             "--inject", "fail:lora-rm", "--inject", "hang:qlora-sft", "--timeout", "qlora-sft=8",
                             timeout=900)
    rows = rows_by_path(report)
    assert done.returncode == 1, done.stdout + done.stderr
    assert rows["lora-sft"]["status"] == "passed" and rows["lora-sft"]["tokens_per_second"] > 0
    assert rows["lora-sft"]["peak_gpu_gib"] is None and rows["lora-sft"]["peak_rss_gib"] > 0
    failed = rows["lora-rm"]
    assert (failed["status"], failed["detail"]) == ("failed", "RuntimeError: injected failure (gpu_check.py "
                                                              "--inject fail:PATH)")
    assert rows["lora-ppo"] == rows["lora-ppo"] | {"status": "skipped", "detail": "needs lora-rm (failed)"}
    hung = rows["qlora-sft"]
    assert hung["status"] == "failed" and hung["detail"] == "timed out after 8 s (budget 25 s); killed"
    assert 8 <= hung["wall_seconds"] < 8 + 15  # the timeout, then a polite SIGTERM (the probe dies of it)
    pids = [int(pid) for pid in (tmp_path / "work" / "qlora-sft.pids").read_text().split()]
    assert len(pids) == 2 and all(gone(pid) for pid in pids)  # the path's process and the one it started
    after = rows["generate-hf"]  # runs after the failure and the hang
    assert after["status"] == "passed" and after["tokens_per_second"] > 0
    assert after["details"]["answer_tokens"] > 0
    for path in set(PATHS) - {"lora-sft", "lora-rm", "lora-ppo", "qlora-sft", "generate-hf"}:
        expected = gpu_check.FSDP_ON_CPU if path in GPU_ONLY else "not selected (--only)"
        assert rows[path]["status"] == "skipped" and rows[path]["detail"] == expected, path
    assert "FAILED: lora-rm, qlora-sft" in done.stdout
    for path in PATHS:
        assert f"\n{path} " in done.stdout  # the table has a line per path
    assert report["mode"] == "cpu" and report["machine"]["cuda"] is False
    print(f"gpu_check --cpu with an injected failure and hang: {time.monotonic() - started:.0f} s")


@pytest.mark.slow
def test_every_path_with_a_cpu_equivalent_passes(tmp_path: Path, tiny_model_dir: Path) -> None:
    started = time.monotonic()  # generous timeouts: the first DeepSpeed run builds its CPU comm op (~1 min alone)
    done, report = run_check(tmp_path / "work", tiny_model_dir, "--timeout-scale", "20", timeout=3600)
    rows = rows_by_path(report)
    assert done.returncode == 0, done.stdout + done.stderr
    missing = {check.name: check.unavailable() for check in gpu_check.CHECKS}  # e.g. vllm in this environment
    for path, row in rows.items():
        assert row["status"] == ("skipped" if path in GPU_ONLY or missing[path] else "passed"), (path, row["detail"])
        if missing[path]:
            assert row["detail"] == missing[path]
    assert rows["fsdp-ppo"]["detail"].startswith("refused as designed: error: ")
    assert "this launch uses FSDP, which the ppo stage does not support" in rows["fsdp-ppo"]["detail"]
    for path in ("zero2-sft", "zero2-ppo"):
        assert rows[path]["launch"] == "DEEPSPEED ZeRO-2 ×1"
    for path in ("zero3-sft", "zero3-ppo"):
        assert rows[path]["launch"] == "DEEPSPEED ZeRO-3 ×1"
    checks = rows["qlora-checks"]["details"]
    assert checks["sft_effect_kept_in_rm_backbone"] >= 0.8 and checks["sft_effect_kept_in_ppo_reference"] >= 0.8
    assert checks["lora_gradient_cosine_vs_dequantised"] >= 0.999
    step = rows["lora-ppo"]["ppo_step"]
    assert set(step["parts"]) == set(gpu_check.common.PPO_PARTS)
    assert sum(step["parts"].values()) == pytest.approx(step["seconds"], rel=0.05)
    assert math.isfinite(rows["lora-eval"]["kl_per_answer"]["policy"])  # a sampled estimate: may dip below 0
    print(f"gpu_check --cpu, every path: {time.monotonic() - started:.0f} s\n{done.stdout}")


def test_the_budgets_keep_a_full_gpu_run_within_eight_minutes() -> None:
    assert gpu_check.WHOLE_RUN_SECONDS == 8 * 60
    assert sum(check.budget for check in gpu_check.CHECKS) + gpu_check.STARTUP_SECONDS <= gpu_check.WHOLE_RUN_SECONDS
    seen: list[str] = []
    for check in gpu_check.CHECKS:  # every path after the ones it needs, each name once
        assert check.name not in seen and set(check.needs) <= set(seen), check.name
        seen.append(check.name)
    assert gpu_check.with_needs({"zero3-ppo"}, gpu_check.CHECKS) == {"zero3-ppo", "lora-sft", "lora-rm"}


@pytest.mark.parametrize(("log", "line"), [
    ("loading x\nerror: recipe.yaml: training.foo: unknown key\n", "error: recipe.yaml: training.foo: unknown key"),
    ("noise\nrank 1 of 2 failed: ValueError: bad batch\nmore noise\n", "rank 1 of 2 failed: ValueError: bad batch"),
    ("Traceback (most recent call last):\n  File \"a.py\", line 1, in <module>\n    f()\nKeyError: 'x'\n\n"
     "During handling of the above exception, another exception occurred:\n\nTraceback (most recent call last):\n"
     "  File \"a.py\", line 3\nRuntimeError: second\n", "KeyError: 'x'"),
    ("[rank0]: Traceback (most recent call last):\n[rank0]:   File \"x.py\", line 2\n[rank0]: ValueError: bad\n"
     "E1207 torch/distributed/elastic: failed (exitcode: 1)\n", "ValueError: bad"),
    ("just some output\nthe last line\n", "the last line"),
    ("", "(no output)"),
])
def test_the_first_error_line_is_the_one_that_says_what_went_wrong(log: str, line: str) -> None:
    assert gpu_check.first_error_line(log) == line


@pytest.mark.parametrize(("name", "tflops"), [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA A10G", 70), ("NVIDIA A10", 125),
    ("NVIDIA L4", 121), ("NVIDIA L40S", 362), ("NVIDIA GeForce RTX 4090", 165), ("Tesla T4", None),
])
def test_the_gpu_peak_is_looked_up_by_its_name(name: str, tflops: float | None) -> None:
    peak = mfu.peak_bf16_flops(name)
    assert (peak if peak is None else peak / 1e12) == tflops


def test_flops_per_token_count_every_matmul_weight_a_token_meets(tiny_model_dir: Path) -> None:
    """2 FLOPs per weight of every linear layer (the tied vocabulary head included), attention on top."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    linear = sum(module.weight.numel() for module in model.modules() if isinstance(module, torch.nn.Linear))
    config = mfu.read_config(tiny_model_dir)
    matmuls, attention = mfu.forward_flops_per_token(config, context=128)
    assert matmuls == 2 * linear
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]  # 4 heads of 16 = hidden
    assert attention == 4 * layers * hidden * 64  # QKᵀ and the weighted sum over 64 earlier tokens on average
    backbone, _ = mfu.forward_flops_per_token(config, context=128, logits=False)
    assert matmuls - backbone == 2 * model.lm_head.weight.numel()
    assert mfu.training_flops_per_token(config, 128) == 2 * matmuls + 3 * attention  # LoRA: no weight gradients
    assert mfu.training_flops_per_token(config, 128, lora=False) == 3 * matmuls + 3 * attention
    assert mfu.mfu(1000.0, 1e9, 1e12 * 100, gpus=2) == pytest.approx(0.005)
    assert mfu.mfu(1000.0, 1e9, None) is None
