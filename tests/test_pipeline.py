"""The whole chain on the tiny model with a trivial judge: runs, skips what is finished, re-runs what changed."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest
import yaml

from rlhf_pipeline.pipeline import run_pipeline, validate_pipeline
from tests.stages.conftest import sft_rows, write_card

JUDGE = {"type": "callable", "function": "tests.stages.judges:letter_e_share"}


def _chain(tmp_path: Path, model_dir: Path) -> Path:
    write_card(tmp_path, "chat", sft_rows(32), "messages", ["sft"])
    write_card(tmp_path, "prompts", [{"prompt": f"Say something about topic {i}."} for i in range(24)],
               "prompt_only", ["label", "ppo", "eval"])
    out = tmp_path / "outputs"
    lora = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}
    small = {"per_device_train_batch_size": 8, "per_device_eval_batch_size": 8, "learning_rate": 5e-3,
             "logging_steps": 1, "save_steps": 50, "eval_strategy": "no", "seed": 0}
    recipes = {
        "sft": {"stage": "sft", "model": {"name_or_path": str(model_dir), "lora": lora},
                "data": {"train": ["chat"], "eval_split": 0.25, "max_length": 96},
                "training": {"output_dir": str(out / "sft"), "max_steps": 3} | small},
        "label": {"stage": "label", "model": {"name_or_path": str(out / "sft")},
                  "data": {"train": ["prompts"], "eval_split": 0.0, "max_length": 96}, "judge": JUDGE,
                  "labelling": {"output_dir": str(out / "label"), "num_samples": 4, "max_new_tokens": 12,
                                "min_gap": 0.0, "pairs": "all", "batch_size": 32}},
        "rm": {"stage": "rm", "model": {"name_or_path": str(out / "sft"), "lora": lora},
               "data": {"train": [str(out / "label" / "data_card.yaml")], "eval_split": 0.2, "max_length": 96},
               "training": {"output_dir": str(out / "rm"), "max_steps": 3} | small},
        "ppo": {"stage": "ppo", "model": {"name_or_path": str(out / "sft"), "lora": lora},
                "data": {"train": ["prompts"], "eval_split": 0.0, "max_length": 96},
                "training": {"output_dir": str(out / "ppo"), "reward_model_path": str(out / "rm"),
                             "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                             "response_length": 8, "total_episodes": 24, "num_ppo_epochs": 2, "save_steps": 2,
                             "normalize_reward": True, "missing_eos_penalty": 1.0, "disable_tqdm": True}},
        "eval": {"stage": "eval", "model": {"name_or_path": str(out / "sft")},
                 "data": {"train": ["prompts"], "eval_split": 0.0, "max_length": 96}, "judge": JUDGE,
                 "evaluation": {"output_dir": str(out / "eval"), "policy": str(out / "ppo"),
                                "reward_model": str(out / "rm"), "max_new_tokens": 12, "bootstrap_samples": 200}},
    }
    for name, recipe in recipes.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"name": "tiny", "stages": [{"stage": n, "recipe": f"{n}.yaml"}
                                                                   for n in recipes]}))
    return pipeline


def test_chain_runs_then_skips_then_reruns_only_downstream(tmp_path: Path, tiny_model_dir: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    pipeline = _chain(tmp_path, tiny_model_dir)
    assert [r.stage for r in validate_pipeline(pipeline)] == ["sft", "label", "rm", "ppo", "eval"]
    results = run_pipeline(pipeline)
    out = tmp_path / "outputs"
    for stage in ("sft", "label", "rm", "ppo", "eval"):
        assert json.loads((out / stage / "stage.json").read_text())["stage"] == stage
    assert results["label"]["counts"]["answers"] == 24 * 4
    pairs = [json.loads(line) for line in (out / "label" / "preferences.jsonl").read_text().splitlines()]
    assert pairs and all(p["judge_gap"] >= 0 for p in pairs)
    assert results["rm"]["data"]["rows_kept"] == len(pairs)
    ppo = results["ppo"]
    assert ppo["global_steps"] == 3 and ppo["global_batch_size"] == 8
    assert all(math.isfinite(ppo["final"][key]) for key in ("objective/kl", "objective/scores", "loss/value"))
    assert json.loads((out / "ppo" / "stage.json").read_text())["lineage"] == [str((out / "sft").resolve())]
    report = json.loads((out / "eval" / "eval.json").read_text())
    assert report["prompts"] == 24 and "reward" in report["policies"]["policy"]
    assert (out / "eval" / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    summary = printed[printed.index("pipeline finished in "):].splitlines()[1:6]
    assert [line.split()[0] for line in summary] == ["sft", "label", "rm", "ppo", "eval"]
    assert all(re.match(r"\s+\w+\s+[\d.]+ s\s+[\d.]+ GiB  \S", line) for line in summary), summary
    assert "held-out accuracy" in summary[2] and "judge gain" in summary[4] and "nats/answer" in summary[4]

    started = time.monotonic()
    again = run_pipeline(pipeline)
    assert set(again.values()) == {"skipped"}
    assert time.monotonic() - started < 15
    printed = capsys.readouterr().out
    assert all(" skipped  " in line for line in printed[printed.index("pipeline finished in "):].splitlines()[1:6])

    rm_recipe = yaml.safe_load((tmp_path / "rm.yaml").read_text())
    rm_recipe["training"]["learning_rate"] = 1e-3
    (tmp_path / "rm.yaml").write_text(yaml.safe_dump(rm_recipe))
    changed = run_pipeline(pipeline)
    assert changed["sft"] == "skipped" and changed["label"] == "skipped"
    assert all(changed[stage] != "skipped" for stage in ("rm", "ppo", "eval"))
