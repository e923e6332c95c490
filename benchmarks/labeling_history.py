"""Labeling store: does a label cost more once a labeler has labeled thousands?

One labeler labels a large project alone (overlap 1 unless ``--overlap``), through the Store the
server uses, without HTTP. At each checkpoint (100, 1,000, 5,000 and 10,000
labels done) it times ``progress()`` (what every answer's header shows) and
``submit(..., assign_next=True)`` (a label plus the next pair, one commit),
``--calls`` of each, and prints the mean cost per call and the ratio of the
last checkpoint to the first. A cost that grows with the labeler's history
shows as a ratio well above 1.

With PostgreSQL the planner's statistics are refreshed (``ANALYZE``) at each
checkpoint, as autovacuum does by itself in a running system (it analyzes a
table once about a tenth of its rows changed, checking every minute); this
benchmark packs a labeler's days into a minute, before autovacuum looks.
``--no-analyze`` leaves that out: plans made for an empty assignments table
then cost more as it grows.

With ``--overlap 3`` the labeler alone is far ahead of everyone: each pair they
label stays incomplete. ``--fresh-first-after N`` sets the store's
``FRESH_FIRST_AFTER`` (how many such pairs a labeler may have before being
given fresh pairs first); a huge N shows the fullest-first search alone.

    python benchmarks/labeling_history.py                 # SQLite (WAL, synchronous=FULL)
    python benchmarks/labeling_history.py --postgres      # a throwaway local PostgreSQL
    python benchmarks/labeling_history.py --checkpoints 100 1000 --json
    python benchmarks/labeling_history.py --overlap 3 --checkpoints 100 1000 4000 [--fresh-first-after 1000000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers.labeling import temporary_postgres  # noqa: E402

from sqlalchemy import text  # noqa: E402

from rlhf.labeling.config import ProjectConfig  # noqa: E402
import rlhf.labeling.store as store_module  # noqa: E402
from rlhf.labeling.store import NewPair, Store, Submission  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", type=int, nargs="+", default=[100, 1000, 5000, 10000],
                   help="labels done by the labeler at which to measure (default 100 1000 5000 10000)")
    p.add_argument("--calls", type=int, default=200, help="calls timed per checkpoint and operation (default 200)")
    p.add_argument("--postgres", action="store_true", help="use a temporary local PostgreSQL, not SQLite")
    p.add_argument("--no-analyze", action="store_true",
                   help="PostgreSQL: do not refresh the planner's statistics at each checkpoint")
    p.add_argument("--overlap", type=int, default=1, help="labelers per pair (default 1)")
    p.add_argument("--fresh-first-after", type=int, default=None,
                   help=f"set the store's FRESH_FIRST_AFTER (default {store_module.FRESH_FIRST_AFTER})")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = p.parse_args()
    if args.overlap < 1:
        p.error(f"--overlap {args.overlap}: expected a positive integer")
    if args.fresh_first_after is not None:
        if args.fresh_first_after < 0:
            p.error(f"--fresh-first-after {args.fresh_first_after}: expected 0 or more")
        store_module.FRESH_FIRST_AFTER = args.fresh_first_after
    if any(c < 1 for c in args.checkpoints) or sorted(args.checkpoints) != args.checkpoints:
        p.error(f"--checkpoints {args.checkpoints}: expected positive, increasing counts")
    if args.calls < 1:
        p.error(f"--calls {args.calls}: expected a positive integer")
    # Every label done, timed or not, takes a pair: enough for all of them.
    n_pairs = args.checkpoints[-1] + args.calls * len(args.checkpoints) + 10

    rows = []
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-") as tmp, contextlib.ExitStack() as stack:
        db = stack.enter_context(temporary_postgres()) if args.postgres else f"sqlite:///{Path(tmp) / 'h.db'}"
        store = stack.enter_context(Store.open(db, create=True))
        project = store.create_project("history", ProjectConfig(overlap=args.overlap))
        store.add_pairs(project, [NewPair(f"prompt {i}", f"a {i}", f"b {i}") for i in range(n_pairs)])
        who = store.add_labeler(project, "alice", f"rlhf_bench_{uuid.uuid4().hex}")
        view, done = store.next_pair(who), 0

        def label() -> None:
            nonlocal view, done
            _, view = store.submit(who, Submission(client_id=uuid.uuid4().hex, pair_id=view.id, choice="A"),
                                   assign_next=True)
            done += 1

        for checkpoint in args.checkpoints:
            while done < checkpoint:
                label()
            if args.postgres and not args.no_analyze:
                with store.engine.begin() as c:
                    c.execute(text("ANALYZE labeling_pairs, labeling_assignments, labeling_labels"))
            t0 = time.perf_counter()
            for _ in range(args.calls):
                store.progress(who)
            progress_ms = (time.perf_counter() - t0) / args.calls * 1000
            t0 = time.perf_counter()
            for _ in range(args.calls):
                label()
            submit_ms = (time.perf_counter() - t0) / args.calls * 1000
            rows.append({"labels_done": checkpoint, "progress_ms": round(progress_ms, 3),
                         "submit_next_ms": round(submit_ms, 3)})
            if not args.json:
                print(f"{checkpoint:>7} labels done: progress {progress_ms:.3f} ms, "
                      f"submit + next pair {submit_ms:.3f} ms", flush=True)
    first, last = rows[0], rows[-1]
    store_name = "sqlite (WAL, synchronous=FULL)"
    if args.postgres:
        store_name = "postgresql" + (", statistics as of the start" if args.no_analyze else ", ANALYZE at checkpoints")
    figures = {"store": store_name, "overlap": args.overlap, "fresh_first_after": store_module.FRESH_FIRST_AFTER,
               "checkpoints": rows,
               "progress_ratio": round(last["progress_ms"] / first["progress_ms"], 2),
               "submit_next_ratio": round(last["submit_next_ms"] / first["submit_next_ms"], 2)}
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"store: {store_name}; overlap {args.overlap}; fresh pairs first after "
              f"{store_module.FRESH_FIRST_AFTER} open pairs behind a labeler")
        print(f"cost at {last['labels_done']} labels / at {first['labels_done']}: progress "
              f"{figures['progress_ratio']}x, submit + next pair {figures['submit_next_ratio']}x")


if __name__ == "__main__":
    main()
