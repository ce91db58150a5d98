"""The estimate against peaks measured on this CPU.

The measured tests run `benchmarks/memory_probe.py` in a subprocess: one SFT optimizer step of the stage at
the recipe's micro-batch with rows that fill `data.max_length`, peak RSS minus the process baseline (libraries
imported before any weights load). glibc is told to return freed blocks at once (MALLOC_MMAP_THRESHOLD_), so
RSS follows the live tensors — the weights, states and activations the estimate predicts; with the default
allocator the heap keeps 0-1.7× the activations on top (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.estimate.conftest import REPO, sft_recipe

PROBE = REPO / "benchmarks" / "memory_probe.py"


def _probe(recipe: Path | str, overrides: list[str], timeout: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(PROBE), str(recipe), *overrides, "--json"], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_tiny_model_estimate_is_within_25_percent_of_the_measured_sft_peak(tiny_model_dir: Path,
                                                                          tmp_path: Path) -> None:
    recipe = sft_recipe(tmp_path, str(tiny_model_dir), {"per_device_train_batch_size": 32,
                                                         "gradient_accumulation_steps": 1})
    result = _probe(recipe, ["data.max_length=512"], timeout=600)
    assert result["batch_shapes"][0] == [32, 512]
    assert result["measured_mib"] > 100  # activations dominate at this shape, not the constant noise
    assert 0.75 <= result["measured_mib"] / result["predicted_mib"] <= 1.25, result


@pytest.mark.slow
@pytest.mark.parametrize("overrides, rows, most_tokens", [
    ([], 1, 4 * 128),  # the demo SFT recipe as shipped: 4 rows of 128 tokens packed into one padding-free row
    (["training.packing=false", "training.per_device_train_batch_size=8",
      "model.lora.layers_to_transform=[20,21,22,23,24,25,26,27,28,29]"], 8, 128),  # adapter on the top 10 blocks
], ids=["packed", "top-10-blocks"])
def test_smollm2_estimate_is_within_25_percent_of_the_measured_sft_peak(overrides: list[str], rows: int,
                                                                       most_tokens: int) -> None:
    """The demo SFT recipe (LoRA r=16 all-linear, dropout 0.05) on the embedded model, ~1 min each."""
    result = _probe(REPO / "recipes" / "smollm2-135m" / "sft.yaml", overrides, timeout=1800)
    batch, tokens = result["batch_shapes"][0]
    assert batch == rows and 0.8 * most_tokens <= tokens <= most_tokens
    assert 0.75 <= result["measured_mib"] / result["predicted_mib"] <= 1.25, result
