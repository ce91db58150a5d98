"""Summary of one number per answer (KL to the reference, length in tokens, a judge score...).

Means hide tails: a policy whose median answer is fine but whose longest tenth doubled in length has
started to game its reward. So the summary carries the median and the 90th percentile next to the
mean, and a bootstrap interval says how far the mean could move on other prompts.
"""

import datasets
import evaluate
import numpy as np

from rlhf_pipeline.stats import bootstrap_ci

_DESCRIPTION = """
Mean, standard deviation (population), median, 90th percentile, minimum, maximum and a seeded
percentile-bootstrap 95% interval of the mean of a list of numbers (one per answer).
"""

_KWARGS_DESCRIPTION = """
Args:
    values (list of float): one number per answer.
    bootstrap_samples (int, default 2000): bootstrap resamples for the interval of the mean.
    seed (int, default 0): seed of the resampling.
Returns:
    mean, std, median, p90, min, max, ci95_low, ci95_high, n.
Examples:
    >>> summary = evaluate.load("rlhf_pipeline/metrics/sequence_summary")
    >>> summary.compute(values=[1.0, 2.0, 3.0])["median"]
    2.0
"""

_CITATION = """
@book{efron1994bootstrap,
  title={An Introduction to the Bootstrap},
  author={Efron, Bradley and Tibshirani, Robert J.},
  publisher={Chapman and Hall/CRC}, year={1994}
}
"""


class SequenceSummary(evaluate.Measurement):
    """Location, spread, tail and the interval of the mean of per-answer values."""

    def _info(self):
        # Inputs come back as Python floats (float64); format="numpy" would cast them to float32.
        return evaluate.MeasurementInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"values": datasets.Value("float64")}),
        )

    def _compute(self, values, bootstrap_samples=2000, seed=0):
        data = np.asarray(values, dtype=float)
        if data.size == 0:
            raise ValueError("sequence_summary needs at least one value")
        low, high = bootstrap_ci(data, bootstrap_samples, seed)
        return {
            "mean": float(data.mean()),
            "std": float(data.std()),
            "median": float(np.median(data)),
            "p90": float(np.percentile(data, 90)),
            "min": float(data.min()),
            "max": float(data.max()),
            "ci95_low": low,
            "ci95_high": high,
            "n": int(data.size),
        }
