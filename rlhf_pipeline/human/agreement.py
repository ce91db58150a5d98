"""How much annotators agree beyond chance: Cohen's kappa (two raters) and Fleiss' kappa (several).

A preference label is a category (which answer is best, or A / B / tie), so agreement is over categories;
kappa corrects the raw share of agreement for what two raters picking at their own base rates would
reach by luck. 1 is perfect agreement, 0 chance level, below 0 worse than chance.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Hashable, Mapping, Sequence


def cohen_kappa(first: Sequence[Hashable], second: Sequence[Hashable]) -> float | None:
    """Cohen's kappa of two raters over the same items (None when there are no items or chance is 1)."""
    if len(first) != len(second):
        raise ValueError("cohen_kappa: both raters must label the same items")
    n = len(first)
    if n == 0:
        return None
    observed = sum(a == b for a, b in zip(first, second, strict=True)) / n
    counts_a, counts_b = collections.Counter(first), collections.Counter(second)
    chance = sum(counts_a[c] * counts_b[c] for c in counts_a) / n**2
    return None if chance == 1 else (observed - chance) / (1 - chance)


def fleiss_kappa(ratings: Sequence[Sequence[Hashable]]) -> float | None:
    """Fleiss' kappa over items each rated by the same number (at least 2) of raters; None if undefined."""
    if not ratings:
        return None
    raters = len(ratings[0])
    if raters < 2 or any(len(item) != raters for item in ratings):
        raise ValueError("fleiss_kappa: every item needs the same number (at least 2) of ratings")
    per_item = [collections.Counter(item) for item in ratings]
    agreement = sum((sum(c * c for c in counts.values()) - raters) / (raters * (raters - 1)) for counts in per_item)
    observed = agreement / len(ratings)
    totals = collections.Counter()
    for counts in per_item:
        totals.update(counts)
    chance = sum((count / (len(ratings) * raters)) ** 2 for count in totals.values())
    return None if chance == 1 else (observed - chance) / (1 - chance)


def pair_agreement(first: Mapping[int, Hashable], second: Mapping[int, Hashable]) -> dict[str, object] | None:
    """Raw agreement and Cohen's kappa of two raters on the items both labelled; None when they share none.

    The one computation behind every "a vs b" entry, whoever the raters are (annotators, or one of them and
    the machine judge), so no caller looks a pair up by a name it built itself.
    """
    shared = sorted(set(first) & set(second))
    if not shared:
        return None
    return {"items": len(shared), "agreement": sum(first[i] == second[i] for i in shared) / len(shared),
            "cohen_kappa": cohen_kappa([first[i] for i in shared], [second[i] for i in shared])}


def agreement_report(labels: Mapping[str, Mapping[int, Hashable]]) -> dict[str, object]:
    """Pairwise Cohen's kappa on each pair's shared items, and Fleiss' kappa on the items all raters labelled.

    `labels` maps a rater to item -> category; a pair is named "a vs b" with its names in sorted order.
    """
    pairs = {}
    for a, b in itertools.combinations(sorted(labels), 2):
        if (stats := pair_agreement(labels[a], labels[b])) is not None:
            pairs[f"{a} vs {b}"] = stats
    report: dict[str, object] = {"pairs": pairs}
    if len(labels) >= 3:
        common = sorted(set.intersection(*(set(rated) for rated in labels.values())))
        report["fleiss_kappa"] = fleiss_kappa([[labels[r][i] for r in sorted(labels)] for i in common])
        report["fleiss_items"] = len(common)
    return report
