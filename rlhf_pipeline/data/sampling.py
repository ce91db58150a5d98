"""Taking rows by whole prompts: held-out splits, row caps and mixture shares, all seeded.

Rows are named by their prompts' keys (one key per row); a prompt's rows always go together, so no prompt is
cut in half between training and evaluation, or by a cap. The orders are the ones `datasets` uses
(`train_test_split`, `shuffle`), so with one row per prompt a split or a cap takes exactly the rows a plain
row split or shuffle with the same seed would.
"""

from __future__ import annotations

import math

from rlhf_pipeline.data.conversion import column


def prompt_groups(keys: list[str]) -> list[list[int]]:
    """Row indices gathered by prompt, groups in the order their prompts first appear."""
    groups: dict[str, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return list(groups.values())


def split_indices(keys: list[str], share: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held out) row indices: a seeded `share` of the distinct prompts held out, each with all its rows."""
    from datasets import Dataset

    groups = prompt_groups(keys)
    parts = Dataset.from_dict({"group": range(len(groups))}).train_test_split(test_size=share, seed=seed)
    return ([index for group in column(parts["train"], "group") for index in groups[group]],
            [index for group in column(parts["test"], "group") for index in groups[group]])


def sample_indices(keys: list[str], max_rows: int, seed: int) -> list[int]:
    """At most `max_rows` row indices, whole prompts taken in a seeded order while they fit."""
    from datasets import Dataset

    groups = prompt_groups(keys)
    kept: list[int] = []
    for group in column(Dataset.from_dict({"group": range(len(groups))}).shuffle(seed=seed), "group"):
        if len(kept) + len(groups[group]) <= max_rows:
            kept.extend(groups[group])
    return kept


def capped_size(available: int, max_rows: int | None, fraction: float | None) -> int:
    """The rows a card may give the mixture before weights: all, `max_rows` of them, or `fraction` of them."""
    if max_rows is not None:
        return min(available, max_rows)
    if fraction is not None:
        return round(available * fraction)
    return available


def weighted_sizes(available: list[int], weights: list[float]) -> list[int]:
    """Rows to take from each card so that each has its weight's share of the mixture: the largest mixture with
    those shares that repeats no row (the card that runs out first is taken whole)."""
    total = sum(weights)
    shares = [weight / total for weight in weights]
    size = min(rows / share for rows, share in zip(available, shares, strict=True))
    return [min(rows, math.floor(share * size + 1e-9)) for rows, share in zip(available, shares, strict=True)]
