"""What the sections report: plausible stage metrics, a PPO run that a health alert stops early, and the
eval's bake-off table over several policies.

The second PPO run starts from the chain's SFT and RM outputs and trips a health monitor. The bake-off is
drawn from a hand-made eval folder whose every number is known.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from rlhf_pipeline.outputs import StageManifest, mark_complete, write_json
from rlhf_pipeline.report import REPORT, write_stage_report, write_summary_report
from rlhf_pipeline.stages import load_recipe, ppo
from rlhf_pipeline.stages.eval import EvalConfig, compare
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
    policy = report["policies"]["policy"]  # `evaluation.policy: FOLDER` is the policy named "policy"
    assert list(report["policies"]) == ["policy"] and (policy["stage"], report["baseline"]["stage"]) == ("ppo", "sft")
    assert report["prompts"] == 24 and policy["kl"]["n"] == 24
    for block in (policy["kl"], policy["judge_gain"], policy["reward_gain"], policy["judge"]):
        assert block["ci95_low"] <= block["mean"] <= block["ci95_high"]
    assert policy["kl"]["mean"] > -0.05 and 0.0 <= policy["judge_gain"]["win_rate"] <= 1.0
    per_answer = json.loads((chain / "outputs" / "eval" / "eval.json").read_text())["per_answer"]
    assert policy["judge_gain"]["mean"] == pytest.approx(np.mean(per_answer["policies"]["policy"]["judge"])
                                                         - np.mean(per_answer["baseline"]["judge"]))
    assert policy["length_tokens"]["p90"] <= 12 and len(per_answer["policies"]["policy"]["kl"]) == 24
    ppo_costs = json.loads((chain / "outputs" / "ppo" / "stage.json").read_text())["metrics"]["resources"]
    assert policy["resources"] == ppo_costs and ppo_costs["wall_seconds"] > 0 and ppo_costs["peak_rss_gib"] > 0.1


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


def _finished_eval(folder: Path, record: dict) -> Path:
    """An eval stage folder holding `record` (eval.json; metrics without per-answer values and samples)."""
    metrics = {key: value for key, value in record.items() if key not in ("per_answer", "examples")}
    folder.mkdir(parents=True)
    write_json(folder / "eval.json", record)
    write_json(folder / "metrics.json", metrics)
    mark_complete(folder, StageManifest(stage="eval", fingerprint="0", base_model={"origin": "tiny"}, adapter=False,
                                        metrics=metrics))
    return folder


def test_eval_report_ranks_the_policies_in_one_bake_off_table(tmp_path: Path) -> None:
    per_answer = {"baseline": {"judge": [0.1, 0.2, 0.3, 0.4], "reward": [0.0] * 4, "length_tokens": [10, 12, 14, 16]},
                  "policies": {
                      "fast": {"judge": [0.2, 0.2, 0.3, 0.4], "reward": [0.5] * 4, "length_tokens": [8] * 4,
                               "kl": [0.5] * 4},
                      "ppo": {"judge": [0.3, 0.4, 0.5, 0.6], "reward": [1.0] * 4, "length_tokens": [9, 9, 11, 11],
                              "kl": [2.0] * 4}}}
    record = compare(per_answer, EvalConfig(output_dir="unused", policy="unused", bootstrap_samples=200))
    record["baseline"] |= {"eos_fraction": 0.75, "distinct_2": 0.9, "path": "out/sft", "stage": "sft",
                           "resources": {"wall_seconds": 143.2, "peak_rss_gib": 1.9, "peak_cuda_gib": None}}
    record["policies"]["ppo"] |= {"eos_fraction": 1.0, "distinct_2": 0.5, "path": "out/ppo", "stage": "ppo",
                                  "resources": {"wall_seconds": 336.0, "peak_rss_gib": 4.2, "peak_cuda_gib": None}}
    record["policies"]["fast"] |= {"eos_fraction": 0.5, "distinct_2": 0.8, "path": "out/dpo", "stage": "dpo",
                                   "resources": {"wall_seconds": 1500.0, "peak_rss_gib": 2.5, "peak_cuda_gib": 10.25}}
    record |= {"prompts": 4, "judge": "vader", "per_answer": per_answer,
               "examples": [{"prompt": "Describe a rainy Monday.", "baseline": "Wet.",
                             "policies": {"ppo": "Cosy and calm!", "fast": "Rainy."}}]}
    folder = _finished_eval(tmp_path / "eval", record)
    lines = write_stage_report(folder).read_text().splitlines()

    assert lines[2] == ("best of 2 by judge gain: ppo, judge gain +0.200 [+0.200, +0.200], win rate 1.000; "
                        "RM gain +1.000 [+1.000, +1.000], win rate 1.000; KL 2.000 nats/answer.")
    start = lines.index("| method | judge gain [95% CI] | RM gain [95% CI] | judge win rate | KL [95% CI] | "
                        "length (tokens) | distinct-2 | stop token | wall time | peak memory |")
    assert lines[start + 2 : start + 5] == [  # best judge gain first; wall time and memory of each stage
        "| baseline (sft) | — | — | — | 0 | 13.0 | 0.900 | 0.75 | 143 s | 1.90 GiB |",
        "| ppo | +0.200 [+0.200, +0.200] | +1.000 [+1.000, +1.000] | 1.00 | 2.000 [2.000, 2.000] | 10.0 | 0.500 | "
        "1.00 | 336 s | 4.20 GiB |",
        "| fast (dpo) | +0.025 [+0.000, +0.075] | +0.500 [+0.500, +0.500] | 0.62 | 0.500 [0.500, 0.500] | 8.0 | "
        "0.800 | 0.50 | 25.0 min | 2.50 GiB (CUDA 10.25 GiB) |"]
    assert "| fast (dpo) | 0.275 [0.200, 0.350] | 0.500 [0.500, 0.500] | 8 / 8 | 0.5 / 0.5 | 1 / 3 / 0 | 4 / 0 / 0 |" \
        in lines
    assert "| Describe a rainy Monday. | Wet. | Cosy and calm! | Rainy. |" in lines
    assert "![Gain vs KL to the baseline](eval_tradeoff.png)" in lines and "![Scores per answer](eval.png)" in lines
    check_png(folder / "eval_tradeoff.png")
    check_png(folder / "eval.png")


def test_an_eval_recorded_before_several_policies_asks_to_be_run_again(tmp_path: Path) -> None:
    old = {"baseline": {"eos_fraction": 0.8}, "policy": {"eos_fraction": 0.9}, "kl": {"mean": 3.6},
           "judge_gain": {"mean": 0.4, "ci95_low": 0.3, "ci95_high": 0.5, "win_rate": 0.81}, "prompts": 64}
    folder = _finished_eval(tmp_path / "run" / "eval", old)
    report = write_stage_report(folder).read_text()
    assert "This eval was recorded by an earlier rlhf-pipeline" in report and "--from eval" in report
    summary = write_summary_report([folder], tmp_path / "run", "Run").read_text()
    assert "| eval | `eval` | recorded by an earlier rlhf-pipeline" in summary


def test_a_rule_reward_model_reports_its_own_numbers(tmp_path: Path) -> None:
    from rlhf_pipeline.metrics import load_metric

    scores, labels = [2.0, 1.0, -1.0, -2.0, 0.5, -0.5], [1, 1, 0, 0, 0, 1]
    held_out = load_metric("rule_classification").compute(scores=scores, labels=labels) | {
        "violation_score_mean": 0.833, "kept_score_mean": -0.833, "scores": scores, "labels": labels}
    metrics = {"objective": "classification", "eval_accuracy": held_out["accuracy"], "eval_auroc": held_out["auroc"],
               "eval_ece": held_out["ece"], "eval_brier": held_out["brier"], "eval_base_rate": 0.5, "eval": held_out,
               "reward_stats": {"mean": 0.1, "std": 1.5, "answers": 6}, "global_steps": 3,
               "log_history": [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.4}]}
    folder = tmp_path / "rm"
    folder.mkdir()
    write_json(folder / "metrics.json", metrics)
    mark_complete(folder, StageManifest(stage="rm", fingerprint="0", base_model={"origin": "tiny"}, adapter=True,
                                        task="reward", metrics=metrics, extra={"objective": "classification"}))
    lines = write_stage_report(folder).read_text().splitlines()

    # By hand: 4 of 6 on the right side of 0; 8 of the 9 violation/keep pairs ordered right; one answer per
    # bin, so ECE = mean |y − σ(s)| = 2.0213 / 6; Brier = mean (y − σ(s))² = 0.948 / 6.
    assert lines[2] == ("rule classifier: held-out accuracy 0.6667 on 6 answers (base rate 0.5), AUROC 0.8889, "
                        "ECE 0.3369, Brier 0.158.")
    assert "| AUROC | 0.8889 |" in lines and "| base rate (share that breaks the rule) | 0.5 |" in lines
    assert not any("pairwise" in line or "margin" in line for line in lines)
    check_png(folder / "rm_rule.png")
    check_png(folder / "rm_training.png")
