"""Accuracy, ranking quality and calibration of a rule reward model: a classifier of rule violations.

A rule reward model (DeepMind's Sparrow) gives each answer a score s whose sigmoid is the probability that
the answer breaks the rule. A reward specification uses that probability as it is, so besides accuracy it
must rank answers well (AUROC, independent of any threshold) and mean what it says (calibration: of the
answers it gives 0.8, about 80% should break the rule).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
For scores s and labels y (1 = the answer breaks the rule), with p = σ(s): accuracy of p > 0.5 (a score of
exactly 0 counts as "keeps the rule"), AUROC (the probability that a random violation outscores a random
non-violation, ties counting one half; null when one class is absent), the Brier score mean((p − y)²), the
log loss mean(−y log p − (1 − y) log(1 − p)) (the training loss), the base rate mean(y) (the accuracy of
always guessing the majority is max(base rate, 1 − base rate)), the mean predicted probability, and the
expected calibration error (ECE) of p over `n_bins` equal-width bins on [0, 1]:
Σ_b (n_b / n) · |violation rate_b − mean p_b|. The per-bin numbers are returned too, for a reliability diagram.
"""

_KWARGS_DESCRIPTION = """
Args:
    scores (list of float): the reward model's raw score (logit) of each answer.
    labels (list of int): 1 when the answer breaks the rule, 0 when it keeps it; same order.
    n_bins (int, default 10): calibration bins over the probability range [0, 1].
Returns:
    accuracy, auroc, ece, brier, log_loss, base_rate, mean_probability, answers, and calibration_bins: a list of
    {low, high, count, violation_rate, mean_probability} (empty bins have count 0 and null rates).
Examples:
    >>> metric = evaluate.load("rlhf_pipeline/metrics/rule_classification")
    >>> metric.compute(scores=[2.0, -1.0, 0.5], labels=[1, 0, 0])["auroc"]
    1.0
"""

_CITATION = """
@article{glaese2022sparrow,
  title={Improving alignment of dialogue agents via targeted human judgements},
  author={Glaese, Amelia and McAleese, Nat and Trebacz, Maja and others},
  journal={arXiv preprint arXiv:2209.14375}, year={2022}
}
"""


def _auroc(scores, labels):
    """The Mann-Whitney statistic from average ranks (ties share their rank), normalised to [0, 1]."""
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        return None
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based rank of each distinct score
    rank_sum = average_rank[inverse][labels == 1].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))


class RuleClassification(evaluate.Metric):
    """Accuracy, AUROC and calibration of P(answer breaks the rule) = σ(score) on held-out answers."""

    def _info(self):
        # Inputs come back as Python floats (float64); format="numpy" would cast them to float32.
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"scores": datasets.Value("float64"), "labels": datasets.Value("int64")}),
        )

    def _compute(self, scores, labels, n_bins=10):
        scores = np.asarray(scores, dtype=float)
        labels = np.asarray(labels, dtype=int)
        if scores.size == 0:
            raise ValueError("rule_classification needs at least one answer")
        if not np.isin(labels, (0, 1)).all():
            raise ValueError("rule_classification labels must be 0 (keeps the rule) or 1 (breaks it)")
        if n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        probability = 0.5 * (1.0 + np.tanh(scores / 2.0))  # σ(score), without overflow for large scores
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        which = np.clip(np.searchsorted(edges, probability, side="right") - 1, 0, n_bins - 1)
        bins, ece = [], 0.0
        for index in range(n_bins):
            members = which == index
            count = int(members.sum())
            rate = float(labels[members].mean()) if count else None
            mean_probability = float(probability[members].mean()) if count else None
            if count:
                ece += count / scores.size * abs(rate - mean_probability)
            bins.append({"low": float(edges[index]), "high": float(edges[index + 1]), "count": count,
                         "violation_rate": rate, "mean_probability": mean_probability})
        log_loss = np.logaddexp(0.0, np.where(labels == 1, -scores, scores))  # −log σ(±s), stable
        return {
            "accuracy": float(((scores > 0) == (labels == 1)).mean()),
            "auroc": _auroc(scores, labels),
            "ece": float(ece),
            "brier": float(np.mean((probability - labels) ** 2)),
            "log_loss": float(log_loss.mean()),
            "base_rate": float(labels.mean()),
            "mean_probability": float(probability.mean()),
            "answers": int(scores.size),
            "calibration_bins": bins,
        }
