"""Labels -> preference pairs in the reward stage's format.

Each pair's current labels (one per labeler, skips left out) are a vote among
A, B and tie. The strict plurality wins; a pair whose vote has no strict
winner, or whose winner is "tie", has no preferred side: it is dropped or
given a random side (``ExportConfig.ties``). A pair most of whose voters
marked both responses bad is left out unless ``include_both_bad`` (then its
row says ``both_bad: true``). Rows are ``{prompt, chosen, rejected}`` plus
provenance columns the reward stage ignores (``pair_id``, vote counts, which
model wrote each side, ``both_bad``) and, when asked, a ``margin`` for margin
losses: from the vote, or from the labelers' preference strength
(``schema.STRENGTH_MARGIN``: significantly better 3, better 2, slightly
better 1, negligibly better or unsure 0), which the reward stage reads.

Ranking items (K responses ordered best to worst, ``label pairs --responses
K``): each of the K·(K−1)/2 pairs of responses is a vote among the item's
rankings (the one ranked higher wins it; no ties within a ranking), resolved
like a pair's vote, and becomes a row with ``ranking_id`` (the item), and
``rank_chosen``/``rank_rejected``: the two responses' places (1 = best) in the
item's consensus order (mean place over its rankings). ``margin``: ``votes``
as for pairs; ``strength`` 0.0 (a ranking gives no strength).

Also the reader behind a reward stage's ``data.path: sqlite:///labels.db``
(see :func:`read_db_records`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rlhf.config import build
from rlhf.errors import BadInput
from rlhf.labeling.config import ExportConfig
from rlhf.labeling.schema import STRENGTH_MARGIN, Pair
from rlhf.labeling.store import LabelRow, ProjectInfo, Store, parse_db_url

log = logging.getLogger(__name__)

FORMATS = ("jsonl", "parquet", "hf")


@dataclass
class ExportSummary:
    pairs: int = 0
    exported: int = 0
    too_few_votes: int = 0  # fewer than min_votes non-skip labels (includes unlabeled pairs)
    ties_dropped: int = 0
    ties_randomised: int = 0
    # Pairs most voters marked both bad: left out, or (include_both_bad) exported flagged.
    both_bad: int = 0


def resolve_vote(votes: Counter) -> str | None:
    """The winning choice ("A", "B" or "tie") by strict plurality, or None on a split."""
    ranked = votes.most_common()
    if not ranked or (len(ranked) > 1 and ranked[0][1] == ranked[1][1]):
        return None
    return ranked[0][0]


def strength_margin(strengths: list[str | None]) -> float:
    """The mean ``STRENGTH_MARGIN`` of the strengths given (None: not given,
    left out of the mean); 0.0, no margin, when none was given."""
    given = [STRENGTH_MARGIN[x] for x in strengths if x is not None]
    return sum(given) / len(given) if given else 0.0


def preference_rows(pairs: dict[int, Pair], current: list[LabelRow], cfg: ExportConfig
                    ) -> tuple[list[dict[str, Any]], ExportSummary]:
    """Resolve each pair's votes into a ``{prompt, chosen, rejected, ...}`` row."""
    ballots: dict[int, list[LabelRow]] = {pid: [] for pid in pairs}
    excluded = set(cfg.exclude_labelers)
    for r in current:
        if r.choice != "skip" and r.pair_id in ballots and r.labeler not in excluded:
            ballots[r.pair_id].append(r)
    summary = ExportSummary(pairs=len(pairs))
    rows = []
    for pid in sorted(pairs):
        if pairs[pid].responses is not None:
            ranked = _ranking_rows(pairs[pid], ballots[pid], cfg, summary)
            rows.extend(ranked)
            summary.exported += len(ranked)
            continue
        row = _pair_row(pairs[pid], ballots[pid], cfg, summary)
        if row is not None:
            rows.append(row)
            summary.exported += 1
    if any("ranking_id" in r for r in rows):  # one set of columns for every row (Arrow formats)
        for r in rows:
            r.setdefault("ranking_id", None)
            r.setdefault("rank_chosen", None)
            r.setdefault("rank_rejected", None)
    return rows, summary


def _ranking_rows(item: Pair, ballot: list[LabelRow], cfg: ExportConfig, summary: ExportSummary
                  ) -> list[dict[str, Any]]:
    """A ranking item's K·(K−1)/2 implied pairs, each resolved by the vote of the item's rankings."""
    n = len(ballot)
    if n < cfg.min_votes:
        summary.too_few_votes += 1
        return []
    both_bad_votes = sum(r.both_bad for r in ballot)
    both_bad = 2 * both_bad_votes > n
    if both_bad and not cfg.include_both_bad:
        summary.both_bad += 1
        return []
    summary.both_bad += both_bad
    responses = json.loads(item.responses)
    sources = json.loads(item.sources) if item.sources else [""] * len(responses)
    k = len(responses)
    places = [{idx: place for place, idx in enumerate(r.ranking)} for r in ballot]  # index -> 0-based place
    consensus = sorted(range(k), key=lambda i: (sum(p[i] for p in places) / n, i))
    rank = {idx: place + 1 for place, idx in enumerate(consensus)}
    prompt = json.loads(item.prompt)
    rows = []
    for i in range(k):
        for j in range(i + 1, k):
            i_wins = sum(p[i] < p[j] for p in places)
            j_wins = n - i_wins
            if i_wins == j_wins:  # a split among the rankings: no preferred side
                if cfg.ties == "drop":
                    summary.ties_dropped += 1
                    continue
                winner = random.Random(f"{cfg.seed}:{item.id}:{i}:{j}").choice((i, j))
                summary.ties_randomised += 1
            else:
                winner = i if i_wins > j_wins else j
            loser = j if winner == i else i
            won = i_wins if winner == i else j_wins
            row = {"prompt": prompt, "chosen": responses[winner], "rejected": responses[loser],
                   "pair_id": item.id, "votes": n, "chosen_votes": won, "rejected_votes": n - won, "tie_votes": 0,
                   "chosen_source": sources[winner], "rejected_source": sources[loser],
                   "both_bad": both_bad, "both_bad_votes": both_bad_votes,
                   "ranking_id": item.id, "rank_chosen": rank[winner], "rank_rejected": rank[loser]}
            if cfg.margin is True or cfg.margin == "votes":
                row["margin"] = (2 * won - n) / n
            elif cfg.margin == "strength":
                row["margin"] = 0.0
            rows.append(row)
    return rows


def _pair_row(pair: Pair, ballot: list[LabelRow], cfg: ExportConfig, summary: ExportSummary
              ) -> dict[str, Any] | None:
    """One pair's row from its non-skip labels, or None (counted in ``summary``) when it is left out."""
    n = len(ballot)
    if n < cfg.min_votes:
        summary.too_few_votes += 1
        return None
    both_bad_votes = sum(r.both_bad for r in ballot)
    both_bad = 2 * both_bad_votes > n
    if both_bad and not cfg.include_both_bad:
        summary.both_bad += 1
        return None
    vote = Counter(r.choice for r in ballot)
    winner = resolve_vote(vote)
    randomised = winner not in ("A", "B")
    if randomised:
        if cfg.ties == "drop":
            summary.ties_dropped += 1
            return None
        # Seeded per pair, so the same database always exports the same file.
        winner = random.Random(f"{cfg.seed}:{pair.id}").choice("AB")
        summary.ties_randomised += 1
    summary.both_bad += both_bad
    loser = "B" if winner == "A" else "A"
    sides = {"A": (pair.response_a, pair.source_a), "B": (pair.response_b, pair.source_b)}
    row = {"prompt": json.loads(pair.prompt), "chosen": sides[winner][0], "rejected": sides[loser][0],
           "pair_id": pair.id, "votes": n, "chosen_votes": vote[winner], "rejected_votes": vote[loser],
           "tie_votes": vote["tie"], "chosen_source": sides[winner][1], "rejected_source": sides[loser][1],
           "both_bad": both_bad, "both_bad_votes": both_bad_votes}
    if cfg.margin is True or cfg.margin == "votes":
        row["margin"] = (vote[winner] - vote[loser]) / n
    elif cfg.margin == "strength":
        # A side picked at random was preferred by no majority: no margin to demand.
        row["margin"] = 0.0 if randomised else strength_margin([r.strength for r in ballot if r.choice == winner])
    return row


def export_rows(store: Store, project: ProjectInfo, cfg: ExportConfig) -> tuple[list[dict[str, Any]], ExportSummary]:
    known = {lab.name for lab in store.labelers(project)}
    for name in cfg.exclude_labelers:
        if name not in known:
            raise BadInput(f"exclude_labelers: {name!r} is not a labeler of project {project.name} "
                           f"(labelers: {', '.join(sorted(known)) or 'none'})")
    return preference_rows(store.pairs(project), store.current_labels(project.id), cfg)


def output_format(out: Path, fmt: str | None) -> str:
    """The format named by ``--format``, else by the output's suffix."""
    if fmt is not None:
        return fmt
    suffix = out.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    if suffix == "":
        return "hf"
    raise BadInput(f"--out {out}: unknown format '{suffix}' (expected .jsonl, .parquet, or a directory "
                   "for a Hugging Face dataset; or pass --format)")


def write_rows(rows: list[dict[str, Any]], out: Path, fmt: str, protect: Sequence[Path] = ()) -> Path:
    """Write rows atomically: to a temporary sibling, then renamed over ``out``.

    ``protect`` lists files that must never be overwritten (the database
    itself: exporting onto it would destroy the labels).
    """
    resolved = out.resolve()
    for p in (p.resolve() for p in protect):
        journals = {p, *(p.with_name(p.name + ext) for ext in ("-wal", "-shm", "-journal"))}
        if resolved in journals or p.is_relative_to(resolved):
            raise BadInput(f"--out {out}: is (or holds) the labeling database; choose another path")
    if fmt == "hf" and out.exists() and (out.is_file() or (any(out.iterdir()) and
                                                           not (out / "dataset_info.json").exists())):
        raise BadInput(f"--out {out}: exists and is not a Hugging Face dataset directory; not overwriting it")
    if fmt != "hf" and out.is_dir():
        raise BadInput(f"--out {out}: is a directory, expected a {fmt} file path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    if fmt == "jsonl":
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        from datasets import Dataset

        # Chat prompts are lists and text prompts strings; Arrow needs one type per column.
        if len({type(r["prompt"]) for r in rows}) > 1:
            raise BadInput(f"--out {out}: the project mixes text and chat prompts; export to .jsonl instead")
        ds = Dataset.from_list(rows)
        if fmt == "parquet":
            ds.to_parquet(str(tmp))
        else:
            ds.save_to_disk(str(tmp))
    if fmt == "hf" and out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------- the reward stage's reader


def read_db_records(path: str) -> list:
    """Records for ``rlhf.data.read_records`` from a labeling database URL.

    ``sqlite:///labels.db?project=NAME`` (``project`` may be left out when the
    database has one project). Other ``ExportConfig`` fields can be given the
    same way, e.g. ``&min_votes=2&ties=random``.
    """
    from rlhf.data import Record

    db = parse_db_url(path, flag="data.path")
    options = {}
    for key, raw in db.options.items():
        try:
            options[key] = yaml.safe_load(raw) if key != "project" else raw
        except yaml.YAMLError:
            options[key] = raw
    cfg = build(ExportConfig, options, "", lambda key: f"data.path {db.display}: ")
    with Store.open(db, create=False, flag="data.path") as store:
        project = store.project(cfg.project, flag=f"data.path {db.display} ?project=")
        rows, summary = export_rows(store, project, cfg)
    both_bad = f"{summary.both_bad} marked both bad {'kept' if cfg.include_both_bad else 'left out'}"
    log.info("%s project %s: %d preference pairs from %d pairs (%d with too few votes, %d ties dropped, %s)",
             db.display, project.name, summary.exported, summary.pairs, summary.too_few_votes, summary.ties_dropped,
             both_bad)
    if not rows:
        raise BadInput(f"{db.display}: project {project.name} has no labeled pairs yet "
                       f"({summary.pairs} pairs, {summary.too_few_votes} with too few votes, "
                       f"{summary.ties_dropped} ties dropped, {both_bad})")
    return [Record(row, f"{db.display} project {project.name} pair {row['pair_id']}") for row in rows]
