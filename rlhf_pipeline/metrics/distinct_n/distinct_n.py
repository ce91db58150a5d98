"""Distinct-n: how varied a system's answers are, as the share of their n-grams that are distinct.

A policy optimised against a reward model can collapse onto a few phrasings that score well; its answers
then repeat the same n-grams and distinct-n falls, while a judge's mean score may still rise. The count is
over all answers of one system together (Li et al., 2016), so repeating a phrase across prompts counts.
"""

import datasets
import evaluate

_DESCRIPTION = """
Distinct-n of a set of answers: the number of distinct n-grams over the total number of n-grams, counted
over all answers together (an n-gram never spans two answers). Answers shorter than n add none.
"""

_KWARGS_DESCRIPTION = """
Args:
    sequences (list of list of int): each answer as token ids (any tokenisation, the same for every system).
    n (int, default 2): the n-gram order.
Returns:
    distinct (share of distinct n-grams; 0.0 when there is no n-gram at all), ngrams, distinct_ngrams.
Examples:
    >>> metric = evaluate.load("rlhf_pipeline/metrics/distinct_n")
    >>> metric.compute(sequences=[[1, 2, 3], [1, 2, 4]], n=2)["distinct"]
    0.75
"""

_CITATION = """
@inproceedings{li2016diversity,
  title={A Diversity-Promoting Objective Function for Neural Conversation Models},
  author={Li, Jiwei and Galley, Michel and Brockett, Chris and Gao, Jianfeng and Dolan, Bill},
  booktitle={NAACL}, year={2016}
}
"""


class DistinctN(evaluate.Measurement):
    """Share of distinct n-grams over all of a system's answers."""

    def _info(self):
        return evaluate.MeasurementInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"sequences": datasets.Sequence(datasets.Value("int64"))}),
        )

    def _compute(self, sequences, n=2):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        grams = [tuple(tokens[i : i + n]) for tokens in sequences for i in range(len(tokens) - n + 1)]
        distinct = len(set(grams))
        return {"distinct": distinct / len(grams) if grams else 0.0, "ngrams": len(grams),
                "distinct_ngrams": distinct}
