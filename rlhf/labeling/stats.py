"""``rlhf label stats``: counts, per-labeler throughput and agreement.

Throughput counts *active* time: the gaps between a labeler's consecutive
labels, each capped at ``IDLE_GAP_S`` so a lunch break does not halve their
rate. Agreement uses each labeler's current label per pair, skips left out
(a skip says nothing about which response is better), over the categories
A / B / tie; sides are fixed per pair, so A means the same response to every
labeler of that pair.
"""

from __future__ import annotations

import itertools
import statistics
from collections import Counter, defaultdict
from typing import Any

from rlhf.labeling.agreement import cohen_kappa, fleiss_kappa, percent_agreement
from rlhf.labeling.store import LabelRow, ProjectInfo, Store

IDLE_GAP_S = 300.0  # a pause longer than this between two labels is not labeling time
MIN_SHARED_FOR_COHEN = 2  # pairs two labelers must share for their Cohen's kappa to be reported


def labeler_throughput(rows: list[LabelRow]) -> dict[str, Any]:
    """One labeler's throughput from their labels (every stored row counts as work)."""
    times = sorted(r.created_at for r in rows)
    gaps = [min(b - a, IDLE_GAP_S) for a, b in itertools.pairwise(times)]
    active_s = sum(gaps)
    durations = [r.duration_ms / 1000 for r in rows if r.duration_ms is not None]
    per_label = durations or gaps
    return {
        "first_at": times[0] if times else None,
        "last_at": times[-1] if times else None,
        "active_minutes": round(active_s / 60, 2),
        # n labels span n-1 gaps: rate = (n - 1) / active time.
        "labels_per_hour": round(3600 * len(gaps) / active_s, 1) if active_s > 0 else None,
        "median_seconds_per_label": round(statistics.median(per_label), 2) if per_label else None,
    }


def agreement(current: list[LabelRow]) -> dict[str, Any]:
    """Fleiss' kappa over pairs with >= 2 votes, and Cohen's kappa per labeler pair."""
    votes_by_pair: dict[int, dict[str, str]] = defaultdict(dict)
    for r in current:
        if r.choice not in ("skip", "rank"):  # rankings are not A/B/tie categories
            votes_by_pair[r.pair_id][r.labeler] = r.choice
    items = [Counter(v.values()) for v in votes_by_pair.values() if len(v) >= 2]
    labelers = sorted({name for v in votes_by_pair.values() for name in v})
    cohen = []
    for a, b in itertools.combinations(labelers, 2):
        shared = [v for v in votes_by_pair.values() if a in v and b in v]
        if len(shared) >= MIN_SHARED_FOR_COHEN:
            k = cohen_kappa([v[a] for v in shared], [v[b] for v in shared])
            cohen.append({"labelers": [a, b], "shared_pairs": len(shared), "kappa": k})
    defined = [c["kappa"] for c in cohen if c["kappa"] is not None]
    return {
        "pairs_with_2plus_votes": len(items),
        "fleiss_kappa": fleiss_kappa(items),
        "percent_agreement": percent_agreement(items),
        "cohen_kappa_mean": sum(defined) / len(defined) if defined else None,
        "cohen_kappa": cohen,
    }


def compute(store: Store, project: ProjectInfo) -> dict[str, Any]:
    """Every statistic of a project as one JSON-able dict."""
    overlap = project.config.overlap
    pairs = store.pairs(project)
    every = store.all_labels(project.id)
    current = store.current_labels(project.id)
    by_choice = Counter(r.choice for r in current)
    rows_by_labeler: dict[str, list[LabelRow]] = defaultdict(list)
    for r in every:
        rows_by_labeler[r.labeler].append(r)
    current_by_labeler = Counter(r.labeler for r in current)
    skips_by_labeler = Counter(r.labeler for r in current if r.choice == "skip")
    labelers = []
    for info in store.labelers(project):
        if info.role != "labeler":
            continue
        labelers.append({"name": info.name, "labels": current_by_labeler[info.name] - skips_by_labeler[info.name],
                         "skips": skips_by_labeler[info.name],
                         "revisions": len(rows_by_labeler[info.name]) - current_by_labeler[info.name],
                         **labeler_throughput(rows_by_labeler[info.name])})
    return {
        "project": project.name,
        "overlap": overlap,
        "pairs": {"total": len(pairs),
                  "with_labels": sum(1 for p in pairs.values() if p.labeled_count > 0),
                  "complete": sum(1 for p in pairs.values() if p.labeled_count >= overlap)},
        "labels": {"stored": len(every), "current": len(current), "superseded": len(every) - len(current),
                   **{c: by_choice[c] for c in ("A", "B", "tie", "skip", "rank")},
                   "both_bad": sum(r.both_bad for r in current),
                   "with_strength": sum(r.strength is not None for r in current)},
        "labelers": labelers,
        "agreement": agreement(current),
    }


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def format_stats(st: dict[str, Any]) -> str:
    """The stats as a short plain-text report (what ``rlhf label stats`` prints)."""
    p, lab, ag = st["pairs"], st["labels"], st["agreement"]
    lines = [
        f"project {st['project']} (overlap {st['overlap']})",
        f"pairs:  {p['total']} total, {p['with_labels']} with labels, {p['complete']} complete",
        f"labels: {lab['current']} current ({lab['A']} A, {lab['B']} B, {lab['tie']} tie, {lab['skip']} skip; "
        f"{lab['both_bad']} both bad, {lab['with_strength']} with a strength), {lab['superseded']} superseded, "
        f"{lab['stored']} stored",
        f"agreement over {ag['pairs_with_2plus_votes']} pairs with 2+ votes: Fleiss' kappa "
        f"{_fmt(ag['fleiss_kappa'])}, mean Cohen's kappa {_fmt(ag['cohen_kappa_mean'])}, "
        f"raw agreement {_fmt(ag['percent_agreement'])}",
        "",
        f"{'labeler':<24} {'labels':>7} {'skips':>6} {'revised':>8} {'labels/h':>9} {'s/label':>8} {'active min':>11}",
    ]
    for r in st["labelers"]:
        lines.append(f"{r['name'][:24]:<24} {r['labels']:>7} {r['skips']:>6} {r['revisions']:>8} "
                     f"{_fmt(r['labels_per_hour'], 1):>9} {_fmt(r['median_seconds_per_label'], 1):>8} "
                     f"{_fmt(r['active_minutes'], 1):>11}")
    return "\n".join(lines)
