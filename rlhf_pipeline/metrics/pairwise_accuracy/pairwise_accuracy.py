"""Pairwise accuracy of a reward model, with the calibration of its preference probabilities.

A reward model r ranks a pair correctly when r(chosen) > r(rejected). Under the Bradley-Terry model it
was trained with, it also states how sure it is: P(chosen ≻ rejected) = σ(r(chosen) − r(rejected)).
Calibration asks whether those probabilities mean what they say: of the pairs it calls with 80%
confidence, about 80% should be right.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Pairwise accuracy (share of pairs with r(chosen) > r(rejected); ties count as wrong), mean margin
r(chosen) − r(rejected), and the calibration of p = σ(margin) as the probability that the chosen answer
is preferred: the Brier score mean((1 − p)²), the log loss mean(−log p) (the reward model's own
training loss without margin), and the expected calibration error (ECE) of the top-label confidence
max(p, 1 − p) over `n_bins` equal-width bins on [0.5, 1]: Σ_b (n_b / n) · |accuracy_b − confidence_b|.
The per-bin numbers are returned too, for a reliability diagram.
"""

_KWARGS_DESCRIPTION = """
Args:
    chosen_rewards (list of float): reward of the preferred answer of each pair.
    rejected_rewards (list of float): reward of the other answer, same order.
    n_bins (int, default 10): calibration bins over the confidence range [0.5, 1].
Returns:
    accuracy, mean_margin, ece, brier, log_loss, pairs, and calibration_bins: a list of
    {low, high, count, accuracy, confidence} (empty bins have count 0 and null accuracy/confidence).
Examples:
    >>> metric = evaluate.load("rlhf_pipeline/metrics/pairwise_accuracy")
    >>> metric.compute(chosen_rewards=[1.0, 2.0], rejected_rewards=[0.0, 3.0])["accuracy"]
    0.5
"""

_CITATION = """
@inproceedings{guo2017calibration,
  title={On Calibration of Modern Neural Networks},
  author={Guo, Chuan and Pleiss, Geoff and Sun, Yu and Weinberger, Kilian Q.},
  booktitle={ICML}, year={2017}
}
"""


class PairwiseAccuracy(evaluate.Metric):
    """Accuracy, margin and calibration of a reward model on held-out preference pairs."""

    def _info(self):
        # Inputs come back as Python floats (float64); format="numpy" would cast them to float32.
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"chosen_rewards": datasets.Value("float64"),
                                        "rejected_rewards": datasets.Value("float64")}),
        )

    def _compute(self, chosen_rewards, rejected_rewards, n_bins=10):
        margins = np.asarray(chosen_rewards, dtype=float) - np.asarray(rejected_rewards, dtype=float)
        if margins.size == 0:
            raise ValueError("pairwise_accuracy needs at least one pair")
        if n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        p_chosen = 0.5 * (1.0 + np.tanh(margins / 2.0))  # σ(margin), without overflow for large margins
        correct = margins > 0
        confidence = np.maximum(p_chosen, 1.0 - p_chosen)
        edges = np.linspace(0.5, 1.0, n_bins + 1)
        which = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, n_bins - 1)
        bins, ece = [], 0.0
        for index in range(n_bins):
            members = which == index
            count = int(members.sum())
            accuracy = float(correct[members].mean()) if count else None
            mean_confidence = float(confidence[members].mean()) if count else None
            if count:
                ece += count / margins.size * abs(accuracy - mean_confidence)
            bins.append({"low": float(edges[index]), "high": float(edges[index + 1]), "count": count,
                         "accuracy": accuracy, "confidence": mean_confidence})
        log_loss = np.logaddexp(0.0, -margins)  # −log σ(margin), stable
        return {
            "accuracy": float(correct.mean()),
            "mean_margin": float(margins.mean()),
            "ece": float(ece),
            "brier": float(np.mean((1.0 - p_chosen) ** 2)),
            "log_loss": float(log_loss.mean()),
            "pairs": int(margins.size),
            "calibration_bins": bins,
        }
