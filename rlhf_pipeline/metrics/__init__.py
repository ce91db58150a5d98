"""Our `evaluate` modules: pairwise_accuracy (reward models), rule_classification (rule reward models), win_rate
(policy vs baseline), sequence_summary, distinct_n (how varied answers are).

`evaluate.load("accuracy")` needs the Hub (metric scripts live there); a local folder loads offline, so
the modules ship inside the package, one folder each, and load like any other evaluate module:

    from rlhf_pipeline.metrics import load_metric
    load_metric("pairwise_accuracy").compute(chosen_rewards=[1.2, 0.3], rejected_rewards=[0.1, 0.9])
    # or, with the folder's path: evaluate.load(str(metric_path("win_rate")))

They are loaded with `keep_in_memory=True`: inputs never go through evaluate's on-disk cache, so several
processes computing the same metric cannot trip over each other's cache files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

METRICS = ("pairwise_accuracy", "rule_classification", "win_rate", "sequence_summary", "distinct_n")


def metric_path(name: str) -> Path:
    """The folder holding `<name>/<name>.py`, as `evaluate.load` expects it."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; ours: {', '.join(METRICS)}")
    return Path(__file__).resolve().parent / name


def load_metric(name: str) -> Any:
    """`evaluate.load` of one of our metric folders (offline, in memory)."""
    import evaluate

    return evaluate.load(str(metric_path(name)), keep_in_memory=True)
