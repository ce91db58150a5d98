"""The verdict: what fits, and the cheapest change that makes a run fit."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_pipeline.estimate import GIB, cheapest_fix, estimate_recipe, parse_memory
from tests.estimate.conftest import LLAMA2_7B, hub_cache, sft_recipe


def test_7b_qlora_fits_on_a_24gb_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache(tmp_path / "hub", "meta-llama/Llama-2-7b-hf", LLAMA2_7B)))
    recipe = sft_recipe(tmp_path, "meta-llama/Llama-2-7b-hf", {"activation_checkpointing": True},
                         quantization={"load_in_4bit": True}, dtype="bfloat16")
    result = estimate_recipe(recipe, device_memory=parse_memory("24GB"))
    assert result.fits
    assert 5 * GIB < result.peak < 12 * GIB
    assert result.setup.quantization == "4bit" and result.setup.micro_batch == 4


def test_7b_full_fine_tuning_does_not_fit_on_24gb_and_the_fix_is_sensible(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache(tmp_path / "hub", "meta-llama/Llama-2-7b-hf", LLAMA2_7B)))
    recipe = sft_recipe(tmp_path, "meta-llama/Llama-2-7b-hf", {"activation_checkpointing": True},
                         dtype="bfloat16")
    result = estimate_recipe(recipe, ["model.lora=null"], device_memory=24 * GIB)
    assert not result.fits
    assert result.peak > 2 * 24 * GIB  # bf16 weights + gradients + AdamW states: 8 bytes per parameter
    changes, fixed = cheapest_fix(result.setup)
    assert fixed.fits and fixed.peak <= 24 * GIB
    assert [c.text.split(" ")[0] for c in changes] == ["LoRA"]  # one change: train an adapter, not 7B weights
    # With LoRA forbidden (more GPUs are the only way), the search shards the full model with ZeRO-3.
    eight = estimate_recipe(recipe, ["model.lora=null"], num_devices=8, device_memory=24 * GIB)
    fix = cheapest_fix(eight.setup)
    assert fix is not None and fix[1].fits


def test_a_small_change_is_preferred_when_it_is_enough(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LoRA 7B at 4 × 4096 tokens without checkpointing: checkpointing or a smaller micro-batch, not QLoRA/GPUs."""
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache(tmp_path / "hub", "meta-llama/Llama-2-7b-hf", LLAMA2_7B)))
    recipe = sft_recipe(tmp_path, "meta-llama/Llama-2-7b-hf", {"activation_checkpointing": False},
                         dtype="bfloat16")
    result = estimate_recipe(recipe, ["data.max_length=4096"], device_memory=40 * GIB)
    assert not result.fits
    changes, fixed = cheapest_fix(result.setup)
    assert all("checkpointing" in c.text or "micro-batch" in c.text for c in changes)
    assert fixed.setup.micro_batch * fixed.setup.grad_accum == 16  # the global batch is kept
