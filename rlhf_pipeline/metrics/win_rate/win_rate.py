"""Win rate and mean gain of a policy over a baseline on the same prompts, with bootstrap intervals.

Both policies answer the same prompts; a judge or reward model scores each answer. The comparison is
paired: the gain of prompt i is policy_i − baseline_i, and the bootstrap resamples prompts, so the
intervals account for how much the prompts themselves vary.
"""

import datasets
import evaluate
import numpy as np

from rlhf_pipeline.stats import bootstrap_ci

_DESCRIPTION = """
Paired comparison of two systems' scores on the same inputs: win rate (share of inputs where the
policy scores higher, ties counted half), mean gain (policy − baseline) with its standard deviation,
and percentile-bootstrap 95% intervals (resampling inputs, seeded) of the mean gain and the win rate.
"""

_KWARGS_DESCRIPTION = """
Args:
    policy_scores (list of float): the system under test, one score per input.
    baseline_scores (list of float): the reference system on the same inputs, same order.
    bootstrap_samples (int, default 2000): bootstrap resamples.
    seed (int, default 0): seed of the resampling, so a report is reproducible.
Returns:
    win_rate, win_rate_ci95_low, win_rate_ci95_high, mean_gain, gain_std, gain_ci95_low, gain_ci95_high,
    wins, ties, losses, n.
Examples:
    >>> comparison = evaluate.load("rlhf_pipeline/metrics/win_rate")
    >>> comparison.compute(policy_scores=[2.0, 1.0, 0.5], baseline_scores=[1.0, 1.0, 1.0])["win_rate"]
    0.5
"""

_CITATION = """
@book{efron1994bootstrap,
  title={An Introduction to the Bootstrap},
  author={Efron, Bradley and Tibshirani, Robert J.},
  publisher={Chapman and Hall/CRC}, year={1994}
}
"""


class WinRate(evaluate.Comparison):
    """Paired win rate and gain of a policy over a baseline."""

    def _info(self):
        # Inputs come back as Python floats (float64); format="numpy" would cast them to float32.
        return evaluate.ComparisonInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"policy_scores": datasets.Value("float64"),
                                        "baseline_scores": datasets.Value("float64")}),
        )

    def _compute(self, policy_scores, baseline_scores, bootstrap_samples=2000, seed=0):
        gains = np.asarray(policy_scores, dtype=float) - np.asarray(baseline_scores, dtype=float)
        if gains.size == 0:
            raise ValueError("win_rate needs at least one pair of scores")
        outcomes = (gains > 0) + 0.5 * (gains == 0)  # 1 win, ½ tie, 0 loss
        gain_low, gain_high = bootstrap_ci(gains, bootstrap_samples, seed)
        win_low, win_high = bootstrap_ci(outcomes, bootstrap_samples, seed)
        return {
            "win_rate": float(outcomes.mean()),
            "win_rate_ci95_low": win_low,
            "win_rate_ci95_high": win_high,
            "mean_gain": float(gains.mean()),
            "gain_std": float(gains.std()),
            "gain_ci95_low": gain_low,
            "gain_ci95_high": gain_high,
            "wins": int((gains > 0).sum()),
            "ties": int((gains == 0).sum()),
            "losses": int((gains < 0).sum()),
            "n": int(gains.size),
        }
