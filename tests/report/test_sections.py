"""What the sections report: plausible stage metrics, and a PPO run that a health alert stops early.

The second PPO run starts from the chain's SFT and RM outputs and trips a health monitor.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from rlhf_pipeline.report import REPORT
from rlhf_pipeline.stages import load_recipe, ppo
from tests.report.conftest import check_png, finite, metrics_of


def test_stage_metrics_have_the_expected_keys_and_plausible_values(chain: Path) -> None:
    sft = metrics_of(chain, "sft")
    assert finite(sft["eval_loss_before"], sft["eval_loss"], sft["train_loss"]) and sft["global_steps"] == 3
    assert sft["perplexity"] == pytest.approx(math.exp(sft["eval_loss"]))
    assert [e["step"] for e in sft["log_history"] if "loss" in e] == [1, 2, 3]

    label = metrics_of(chain, "label")
    assert label["counts"]["answers"] == 24 * 4 and 0 < label["counts"]["pairs"] <= 24 * 6  # "all" pairs of 4
    assert 0.0 <= label["mean_judge_score"] <= 1.0  # the judge is a letter share

    rm = metrics_of(chain, "rm")
    held_out = rm["eval"]
    pairs = held_out["pairs"]
    assert pairs == len(held_out["chosen_rewards"]) == len(held_out["rejected_rewards"]) > 0
    wins = sum(c > r for c, r in zip(held_out["chosen_rewards"], held_out["rejected_rewards"], strict=True))
    assert rm["eval_accuracy"] == held_out["accuracy"] == pytest.approx(wins / pairs)
    assert 0.0 <= rm["eval_ece"] <= 0.5 and 0.0 <= rm["eval_brier"] <= 1.0 and held_out["log_loss"] > 0
    assert sum(b["count"] for b in held_out["calibration_bins"]) == pairs
    assert rm["eval_mean_margin"] == pytest.approx(np.mean(held_out["chosen_rewards"])
                                                   - np.mean(held_out["rejected_rewards"]))

    run = metrics_of(chain, "ppo")
    assert run["stopped_early"] is False and run["stop"] is None and run["alerts"] == []
    steps = [e for e in run["log_history"] if "objective/scores" in e]
    assert [e["step"] for e in steps] == [1, 2, 3]
    for entry in steps:
        assert finite(*(entry[k] for k in ("objective/scores", "objective/kl", "objective/entropy", "loss/value")))
        assert entry["objective/entropy"] > 0 and 0 <= entry["response/eos_fraction"] <= 1
        assert 0 <= entry["policy/clipfrac"] <= 1 and 1 <= entry["response/length"] <= 8
    # The untouched adapter is the reference: KL exactly 0 at step 1. Later the k1 estimate of a barely moved
    # policy may be a hair below 0 on a batch, never meaningfully.
    assert steps[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert all(e["objective/kl"] > -0.05 for e in steps)

    report = metrics_of(chain, "eval")
    assert report["prompts"] == 24 and report["kl"]["n"] == 24
    for block in (report["kl"], report["judge_gain"], report["reward_gain"], report["policy"]["judge"]):
        assert block["ci95_low"] <= block["mean"] <= block["ci95_high"]
    assert report["kl"]["mean"] > -0.05
    assert 0.0 <= report["judge_win_rate"] <= 1.0 and report["judge_win_rate"] == report["judge_gain"]["win_rate"]
    per_answer = json.loads((chain / "outputs" / "eval" / "eval.json").read_text())["per_answer"]
    assert report["judge_gain"]["mean"] == pytest.approx(np.mean(per_answer["policy"]["judge"])
                                                         - np.mean(per_answer["baseline"]["judge"]))
    assert report["policy"]["length_tokens"]["p90"] <= 12 and len(per_answer["policy"]["kl"]) == 24


def test_a_health_alert_stops_ppo_after_saving_a_checkpoint(chain: Path) -> None:
    recipe_data = yaml.safe_load((chain / "ppo.yaml").read_text())
    out = chain / "outputs" / "ppo_alert"
    recipe_data["training"] |= {"output_dir": str(out), "save_steps": 50, "kl_estimator": "k3",
                                "max_kl": 1e-9, "early_stop_on_alert": True}
    path = chain / "ppo_alert.yaml"
    path.write_text(yaml.safe_dump(recipe_data, sort_keys=False))
    metrics = ppo.run(load_recipe(path))

    # Step 1 samples from the reference itself (KL 0); its update moves the policy, so step 2's KL > 1e-9.
    assert metrics["stopped_early"] is True and metrics["global_steps"] == 2
    assert metrics["stop"]["step"] == 2 and [a["monitor"] for a in metrics["stop"]["alerts"]] == ["max_kl"]
    alert_entries = [e for e in metrics["log_history"] if "alerts" in e]
    assert [e["step"] for e in alert_entries] == [2] and alert_entries[0]["alerts"][0]["value"] > 1e-9
    checkpoint = out / "checkpoint-2"  # save_steps is 50: only the alert saved it
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and any("alerts" in e for e in state["log_history"])

    assert json.loads((out / "stage.json").read_text())["metrics"]["stopped_early"] is True
    assert (out / "adapter_model.safetensors").is_file()  # the stage finished: the work is kept
    report = (out / REPORT).read_text()
    assert "Stopped early at step 2" in report and "max_kl" in report and "KL to the reference" in report
    check_png(out / "ppo_training.png")
