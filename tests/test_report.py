"""Reports of real stage runs on the tiny model: plausible metrics, report.md per stage, valid plots, alerts.

One chain (sft → label → rm → ppo → eval, as in test_pipeline) runs once for the module; a second PPO run
on its SFT and RM outputs trips a health monitor and stops early.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from rlhf_pipeline.cli import main
from rlhf_pipeline.pipeline import run_pipeline
from rlhf_pipeline.recipe import load_recipe
from rlhf_pipeline.report import REPORT, write_report_safely, write_stage_report
from rlhf_pipeline.stages import ppo
from tests.test_pipeline import _chain

STAGES = ("sft", "label", "rm", "ppo", "eval")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny pipeline, run once; returns its folder (outputs in outputs/<stage>)."""
    root = tmp_path_factory.mktemp("chain")
    run_pipeline(_chain(root, tiny_model_dir))
    return root


def metrics_of(chain: Path, stage: str) -> dict[str, Any]:
    return json.loads((chain / "outputs" / stage / "metrics.json").read_text())


def finite(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def check_png(path: Path) -> None:
    """A real image: PNG signature, more than 5 kB, and more than a handful of distinct colours."""
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 5_000, (path, len(data))
    pixels = (imread(path) * 255).round().astype(np.int64)
    channels = pixels.shape[-1]
    colours = np.unique(pixels.reshape(-1, channels) @ (256 ** np.arange(channels)))  # one code per colour
    assert len(colours) > 20, (path, len(colours))


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


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_report_references_valid_plots(chain: Path, stage: str) -> None:
    folder = chain / "outputs" / stage
    text = (folder / REPORT).read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert linked, text
    assert set(linked) == {p.name for p in folder.glob("*.png")}  # every plot shown, no stray plot
    for name in linked:
        check_png(folder / name)
    assert "—" not in text.splitlines()[2]  # the headline has all its numbers


def test_pipeline_summary_links_every_stage_report(chain: Path) -> None:
    summary = (chain / "outputs" / REPORT).read_text()
    links = re.findall(r"\[report\]\(([^)]+)\)", summary)
    assert links == [f"{stage}/{REPORT}" for stage in STAGES]
    assert "held-out accuracy" in summary and "eval/eval.png" in summary


def test_report_command_rewrites_a_stage_or_a_folder_of_stages(chain: Path, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    for stage in ("label", "eval"):  # small folders without weights: a report needs none
        shutil.copytree(chain / "outputs" / stage, run_dir / stage)
        (run_dir / stage / REPORT).unlink()
    assert main(["report", str(run_dir / "label")]) == 0
    assert (run_dir / "label" / REPORT).is_file() and not (run_dir / REPORT).exists()
    assert main(["report", str(run_dir)]) == 0
    summary = (run_dir / REPORT).read_text()
    assert "[report](label/report.md)" in summary and "[report](eval/report.md)" in summary
    assert str(run_dir / REPORT) in capsys.readouterr().out
    assert main(["report", str(tmp_path)]) == 2  # neither a stage folder nor a folder of them
    assert "no stage.json" in capsys.readouterr().err


def test_without_matplotlib_reports_say_how_to_get_plots_and_failures_only_warn(
        chain: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "label"
    shutil.copytree(chain / "outputs" / "label", folder)
    for png in folder.glob("*.png"):
        png.unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    text = write_stage_report(folder).read_text()
    assert "pip install matplotlib" in text and "![" not in text and not list(folder.glob("*.png"))
    assert "pairs from 24 prompts" in text  # the numbers are all there

    assert write_report_safely(write_stage_report, tmp_path / "missing") is None
    assert "could not write the report" in caplog.text and "rlhf-pipeline report" in caplog.text


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
