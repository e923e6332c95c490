"""Inter-annotator agreement: Cohen's and Fleiss' kappa, as pure functions.

kappa = (p_o - p_e) / (1 - p_e): observed agreement corrected for the
agreement expected by chance. 1 is perfect, 0 is chance level, < 0 worse
than chance. Undefined (None here) when chance agreement is already 1, i.e.
every label is the same category.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence


def cohen_kappa(rater_1: Sequence[Hashable], rater_2: Sequence[Hashable]) -> float | None:
    """Cohen's kappa of two raters over the same items (Cohen 1960).

    ``p_e = sum_k p_1(k) * p_2(k)`` with each rater's own category frequencies.
    https://en.wikipedia.org/wiki/Cohen%27s_kappa
    """
    if len(rater_1) != len(rater_2):
        raise ValueError(f"raters labeled different numbers of items: {len(rater_1)} vs {len(rater_2)}")
    n = len(rater_1)
    if n == 0:
        return None
    p_o = sum(a == b for a, b in zip(rater_1, rater_2, strict=True)) / n
    c1, c2 = Counter(rater_1), Counter(rater_2)
    p_e = sum(c1[k] * c2[k] for k in c1) / (n * n)
    if p_e >= 1.0:
        return None
    return (p_o - p_e) / (1.0 - p_e)


def fleiss_kappa(items: Sequence[Counter | dict]) -> float | None:
    """Fleiss' kappa over items rated by >= 2 raters each (Fleiss 1971).

    ``items[i][category]`` is how many raters put item i in that category.
    Items may have different numbers of raters: each item's agreement
    ``P_i = (sum_j n_ij^2 - n_i) / (n_i (n_i - 1))`` is averaged, and the
    category proportions ``p_j`` pool all ratings (the usual generalisation;
    with equal n_i it is exactly Fleiss' statistic). Items with fewer than
    two ratings carry no agreement information and are ignored.
    https://en.wikipedia.org/wiki/Fleiss%27_kappa
    """
    rated = [Counter(it) for it in items if sum(it.values()) >= 2]
    if not rated:
        return None
    p_items = []
    totals: Counter = Counter()
    for counts in rated:
        n = sum(counts.values())
        p_items.append((sum(c * c for c in counts.values()) - n) / (n * (n - 1)))
        totals.update(counts)
    p_bar = sum(p_items) / len(p_items)
    n_all = sum(totals.values())
    p_e = sum((c / n_all) ** 2 for c in totals.values())
    if p_e >= 1.0:
        return None
    return (p_bar - p_e) / (1.0 - p_e)


def percent_agreement(items: Sequence[Counter | dict]) -> float | None:
    """Share of agreeing rater pairs, pooled over every item with >= 2 ratings."""
    agree = pairs = 0
    for it in items:
        n = sum(it.values())
        if n < 2:
            continue
        agree += sum(c * (c - 1) for c in it.values()) // 2
        pairs += n * (n - 1) // 2
    return agree / pairs if pairs else None
