"""`rlhf-pipeline estimate`: the table, the JSON, and the exit status."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_pipeline import cli
from tests.estimate.conftest import LLAMA2_7B, hub_cache, sft_recipe


def test_command_prints_a_table_or_json_and_exits_1_when_it_does_not_fit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache(tmp_path / "hub", "meta-llama/Llama-2-7b-hf", LLAMA2_7B)))
    recipe = sft_recipe(tmp_path, "meta-llama/Llama-2-7b-hf", dtype="bfloat16")
    assert cli.main(["estimate", str(recipe), "model.quantization.load_in_4bit=true", "--gpu-memory", "24GB"]) == 0
    table = capsys.readouterr().out
    assert "weights (linears, 4-bit NF4 + double-quant)" in table and "verdict: fits" in table
    assert cli.main(["estimate", str(recipe), "model.lora=null", "--gpu-memory", "24GB", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is False and out["suggestion"]["changes"]
    assert out["peak_bytes"] > out["device_memory_bytes"]
    assert cli.main(["estimate", str(recipe), "--gpu-memory", "lots"]) == 2
    assert "--gpu-memory" in capsys.readouterr().err
