"""Our `evaluate` modules load from their package folders (offline) and compute hand-checked values."""

from __future__ import annotations

import math
import re

import evaluate
import numpy as np
import pytest

from rlhf_pipeline.metrics import METRICS, load_metric, metric_path

LN3 = math.log(3)  # σ(ln 3) = 3/4 exactly


@pytest.fixture(scope="module")
def metrics() -> dict[str, evaluate.EvaluationModule]:
    """Each module through the public evaluate API, from the folder shipped in the package."""
    return {name: evaluate.load(str(metric_path(name))) for name in METRICS}


def test_modules_ship_as_folder_with_script_of_the_same_name_and_one_import_per_line() -> None:
    for name in METRICS:
        script = metric_path(name) / f"{name}.py"
        assert script.is_file()
        # evaluate's dependency scan reads `import a, b` as a package named "a," (NOTES-CPU)
        assert not re.search(r"^\s*import\s+\w+\s*,", script.read_text(), flags=re.MULTILINE), name
    assert type(load_metric("win_rate")).__name__ == "WinRate"
    with pytest.raises(ValueError, match="unknown metric"):
        metric_path("accuracy")


def test_pairwise_accuracy_margin_and_calibration(metrics: dict[str, evaluate.EvaluationModule]) -> None:
    metric = metrics["pairwise_accuracy"]
    # Every pair called with 75% confidence and 3 of 4 right: accurate and perfectly calibrated.
    calibrated = metric.compute(chosen_rewards=[LN3, LN3, LN3, 0.0], rejected_rewards=[0.0, 0.0, 0.0, LN3])
    assert calibrated["accuracy"] == 0.75 and calibrated["pairs"] == 4
    assert calibrated["mean_margin"] == pytest.approx(LN3 / 2)
    assert calibrated["ece"] == pytest.approx(0.0, abs=1e-12)
    assert calibrated["brier"] == pytest.approx((3 * 0.25**2 + 0.75**2) / 4)  # 0.1875
    assert calibrated["log_loss"] == pytest.approx((3 * math.log(4 / 3) + math.log(4)) / 4)
    # All right at 75% confidence: under-confident by 0.25.
    timid = metric.compute(chosen_rewards=[LN3] * 4, rejected_rewards=[0.0] * 4)
    assert timid["accuracy"] == 1.0
    assert timid["ece"] == pytest.approx(0.25) and timid["brier"] == pytest.approx(0.0625)
    bins = timid["calibration_bins"]
    assert len(bins) == 10 and sum(b["count"] for b in bins) == 4
    (full,) = [b for b in bins if b["count"]]
    assert full["low"] <= 0.75 < full["high"] and full["accuracy"] == 1.0
    assert full["confidence"] == pytest.approx(0.75)
    # A tie counts as wrong; huge margins do not overflow.
    assert metric.compute(chosen_rewards=[1.0, 1e4], rejected_rewards=[1.0, -1e4])["accuracy"] == 0.5
    with pytest.raises(ValueError, match="at least one pair"):
        metric.compute(chosen_rewards=[], rejected_rewards=[])


def test_rule_classification_accuracy_auroc_and_calibration(metrics: dict[str, evaluate.EvaluationModule]) -> None:
    metric = metrics["rule_classification"]
    # Four answers at P(violation) = 3/4, three of them violations, and four at 1/4, one a violation:
    # perfectly calibrated, 6 of 8 right at the 0.5 threshold.
    scores, labels = [LN3] * 4 + [-LN3] * 4, [1, 1, 1, 0, 1, 0, 0, 0]
    calibrated = metric.compute(scores=scores, labels=labels)
    assert calibrated["accuracy"] == 0.75 and calibrated["answers"] == 8 and calibrated["base_rate"] == 0.5
    assert calibrated["ece"] == pytest.approx(0.0, abs=1e-12)
    assert calibrated["brier"] == pytest.approx(0.25**2 * 6 / 8 + 0.75**2 * 2 / 8)
    assert calibrated["log_loss"] == pytest.approx((6 * math.log(4 / 3) + 2 * math.log(4)) / 8)
    assert calibrated["mean_probability"] == pytest.approx(0.5)
    # AUROC: 3·3 violation/non-violation pairs ordered right, 1·1 wrong, 3·1 + 1·3 tied (half each) of 16.
    assert calibrated["auroc"] == pytest.approx((9 + 0.5 * 6) / 16)
    bins = [b for b in calibrated["calibration_bins"] if b["count"]]
    assert [(b["low"], b["count"], b["violation_rate"]) for b in bins] == [(pytest.approx(0.2), 4, 0.25),
                                                                            (pytest.approx(0.7), 4, 0.75)]
    # Over-confident: P = σ(10) for every answer, half of them violations.
    sure = metric.compute(scores=[10.0] * 4, labels=[1, 0, 1, 0])
    assert sure["ece"] == pytest.approx(0.5, abs=1e-4) and sure["auroc"] == 0.5


def test_rule_classification_auroc_matches_counting_pairs(metrics: dict[str, evaluate.EvaluationModule]) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(labels * 1.0, 1.0), 1)  # rounded: many ties
    positive, negative = scores[labels == 1], scores[labels == 0]
    counted = ((positive[:, None] > negative[None, :]).sum()
               + 0.5 * (positive[:, None] == negative[None, :]).sum()) / (positive.size * negative.size)
    result = metrics["rule_classification"].compute(scores=scores.tolist(), labels=labels.tolist())
    assert result["auroc"] == pytest.approx(counted, abs=1e-12)
    assert result["accuracy"] == pytest.approx(float(((scores > 0) == (labels == 1)).mean()))


def test_rule_classification_refuses_what_it_cannot_score(metrics: dict[str, evaluate.EvaluationModule]) -> None:
    metric = metrics["rule_classification"]
    assert metric.compute(scores=[1.0, 2.0], labels=[1, 1])["auroc"] is None  # no answer keeps the rule
    assert metric.compute(scores=[-1e4, 1e4], labels=[0, 1])["log_loss"] == pytest.approx(0.0)  # no overflow
    with pytest.raises(ValueError, match="at least one answer"):
        metric.compute(scores=[], labels=[])
    with pytest.raises(ValueError, match=r"must be 0 \(keeps the rule\) or 1"):
        metric.compute(scores=[0.3], labels=[2])


def test_win_rate_counts_ties_half_and_its_interval_covers_the_true_gain(
        metrics: dict[str, evaluate.EvaluationModule]) -> None:
    comparison = metrics["win_rate"]
    result = comparison.compute(policy_scores=[3.0, 1.0, 2.0, 2.0], baseline_scores=[1.0, 1.0, 3.0, 0.0],
                                bootstrap_samples=500, seed=0)  # gains 2, 0, -1, 2
    assert (result["wins"], result["ties"], result["losses"], result["n"]) == (2, 1, 1, 4)
    assert result["win_rate"] == 0.625 and result["mean_gain"] == 0.75
    assert result["gain_std"] == pytest.approx(np.std([2, 0, -1, 2]))

    rng = np.random.default_rng(0)
    baseline = rng.normal(0.0, 1.0, 300)
    policy = baseline + rng.normal(0.4, 1.0, 300)  # true mean gain 0.4
    seeded = comparison.compute(policy_scores=policy, baseline_scores=baseline, bootstrap_samples=2000, seed=3)
    assert seeded["gain_ci95_low"] < 0.4 < seeded["gain_ci95_high"]
    assert seeded["gain_ci95_low"] < seeded["mean_gain"] < seeded["gain_ci95_high"]
    assert seeded["gain_ci95_high"] - seeded["gain_ci95_low"] < 0.3  # ≈ 4 · 1/√300
    assert seeded["win_rate_ci95_low"] < seeded["win_rate"] < seeded["win_rate_ci95_high"]
    again = comparison.compute(policy_scores=policy, baseline_scores=baseline, bootstrap_samples=2000, seed=3)
    assert again == seeded  # the seed makes the report reproducible

    # One interval may miss (1 in 20); over many samples about 95% must cover the true gain.
    covered = 0
    for replicate in range(200):
        rng = np.random.default_rng(1000 + replicate)
        baseline = rng.normal(0.0, 1.0, 60)
        policy = baseline + rng.normal(0.4, 1.0, 60)
        result = comparison.compute(policy_scores=policy, baseline_scores=baseline, bootstrap_samples=400,
                                    seed=replicate)
        covered += result["gain_ci95_low"] < 0.4 < result["gain_ci95_high"]
    assert 0.88 <= covered / 200 <= 0.99


def test_sequence_summary(metrics: dict[str, evaluate.EvaluationModule]) -> None:
    summary = metrics["sequence_summary"].compute(values=list(range(1, 11)), bootstrap_samples=1000, seed=0)
    assert summary["mean"] == 5.5 and summary["median"] == 5.5 and summary["n"] == 10
    assert summary["p90"] == pytest.approx(9.1) and (summary["min"], summary["max"]) == (1.0, 10.0)
    assert summary["std"] == pytest.approx(math.sqrt(8.25))
    assert 1.0 < summary["ci95_low"] < 5.5 < summary["ci95_high"] < 10.0
    exact = metrics["sequence_summary"].compute(values=[LN3])  # values keep float64 precision
    assert exact["mean"] == LN3 and exact["ci95_low"] == exact["ci95_high"] == LN3


def test_distinct_n_counts_ngrams_over_all_answers_together(metrics: dict[str, evaluate.EvaluationModule]) -> None:
    distinct = metrics["distinct_n"]
    # Bigrams: (1 2) (2 3) | (1 2) (2 4) | none in [7]: 3 distinct of 4. Unigrams: 1 2 3 4 7, 5 of 7 tokens.
    answers = [[1, 2, 3], [1, 2, 4], [7]]
    assert distinct.compute(sequences=answers, n=2) == {"distinct": 0.75, "ngrams": 4, "distinct_ngrams": 3}
    assert distinct.compute(sequences=answers, n=1)["distinct"] == pytest.approx(5 / 7)
    # The same answer twice halves it: repeating a phrase across prompts is what distinct-n is for.
    assert distinct.compute(sequences=[[5, 6, 7, 8]] * 2, n=2)["distinct"] == 0.5
    assert distinct.compute(sequences=[[1], []], n=2)["distinct"] == 0.0  # no bigram at all
    with pytest.raises(ValueError, match="n must be >= 1"):
        distinct.compute(sequences=answers, n=0)
