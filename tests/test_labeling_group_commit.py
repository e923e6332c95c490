"""Group commit of labels (rlhf/labeling/group_commit.py, Store.submit):
submissions that arrive together share one transaction and one commit, each
gets its own outcome (one refused label does not fail the others), and each
returns only after the commit that holds it. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import event, text

from rlhf.labeling.group_commit import GroupCommitter
from rlhf.labeling.store import (Conflict, InvalidLabel, NotFound, PairFull, SubmitResult, Submission, _Pending,
                                 new_ranking)
from test_labeling_core import new_store, sub
from test_labeling_load import db  # noqa: F401 - the SQLite/PostgreSQL fixture

T0 = 1_000_000.0


def count_commits(store) -> list[int]:
    """A one-element list counting the commits of the store's write engine from now on."""
    commits = [0]

    @event.listens_for(store.engine, "commit")
    def _commit(_conn) -> None:
        commits[0] += 1

    return commits


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_one_refused_label_does_not_fail_the_others_of_its_batch(db):
    store, project, (a, b, c) = new_store(db, n_pairs=4, overlap=1)
    try:
        p1 = store.next_pair(a, now=T0).id
        p2 = store.next_pair(b, now=T0).id
        # a's lease on p1 lapses and p1 goes to c: a's late label on it must be refused.
        assert store.next_pair(c, now=T0 + 61).id == p1
        first = sub(p1, "B")
        batch = [
            _Pending(c, first, False, T0 + 62),                            # stored
            _Pending(a, sub(p1), False, T0 + 62),                           # 409 pair full (c holds/filled it)
            _Pending(b, sub(999_999), False, T0 + 62),                      # 404
            _Pending(b, sub(p2, "rank", ranking=(1, 0)), False, T0 + 62),   # 422: not a ranking item
            _Pending(c, Submission(first.client_id, p1, "A"), False, T0 + 62),  # 409: client id reused
            _Pending(c, first, False, T0 + 62),                             # a replay of the first, same batch
            _Pending(b, sub(p2, "A"), True, T0 + 62, progress=True),        # stored, with b's next pair
        ]
        commits = count_commits(store)
        out = store._submit_batch(batch)
        assert commits[0] == 1, "one batch, one commit"
        assert isinstance(out[0], tuple) and isinstance(out[0][0], SubmitResult) and not out[0][0].replayed
        assert isinstance(out[1], PairFull)
        assert isinstance(out[2], NotFound)
        assert isinstance(out[3], InvalidLabel) and out[3].field == "ranking"
        assert isinstance(out[4], Conflict) and not isinstance(out[4], PairFull)
        assert out[5][0] == out[0][0]._replace(replayed=True)
        result, view, progress = out[6]
        assert not result.replayed and view is not None and view.id not in (p1, p2)
        # PostgreSQL reads b's progress in the batch's transaction; SQLite leaves it to a read after the commit.
        assert progress == (None if store.is_sqlite else store.progress(b, now=T0 + 62))
        assert progress is None or progress["done"] == 1
        stored = sorted((r.labeler, r.pair_id, r.choice) for r in store.all_labels(project.id))
        assert stored == [("l1", p2, "A"), ("l2", p1, "B")]
        pairs = store.pairs(project)
        assert (pairs[p1].labeled_count, pairs[p2].labeled_count) == (1, 1)
        assert store.progress(c, now=T0 + 63)["project_complete"] == 2
    finally:
        store.close()


def test_postgresql_stores_a_batch_in_rounds_not_one_by_one(db):
    """PostgreSQL: the labels of a batch that share no labeler are read
    together and written together, a pipeline each (Store._write_together),
    two labels on the same pair included: the second, which fills the pair,
    counts it full from the count the first left (worked out in SQL), not the
    one both read. None of them goes one by one, and each is stored as one by
    one would."""
    store, project, (a, b, c) = new_store(db, n_pairs=4, overlap=2)
    try:
        if store.is_sqlite:
            pytest.skip("SQLite stores a batch one by one: it has no round trips to save")
        # Fullest first: a and b share the first pair (overlap 2), c gets the second.
        p1, p1_again, p2 = (store.next_pair(w).id for w in (a, b, c))
        assert p1 == p1_again != p2
        pipelines, one_by_one = [], []
        pipeline, submit_one = store._pipeline, store._submit_one
        store._pipeline = lambda conn, runs, **kw: pipelines.append(len(runs)) or pipeline(conn, runs, **kw)
        store._submit_one = lambda *args: one_by_one.append(args) or submit_one(*args)
        commits = count_commits(store)
        out = store._submit_batch([_Pending(a, sub(p1), True, None, progress=True),
                                   _Pending(b, sub(p1, "B"), True, None, progress=True),
                                   _Pending(c, sub(p2), False, None)])
        assert not one_by_one and commits[0] == 1
        # One round: the project's lock and three contexts, then three writes; last, the three
        # labelers' counters, the project's row and a's and b's progress (one statement).
        assert pipelines == [4, 3, 5]
        assert all(isinstance(o, tuple) and not o[0].replayed for o in out), out
        next_a, next_b, next_c = (o[1] for o in out)
        # a (written first) takes p2's free slot beside c's lease; p2 is then full for b.
        assert next_c is None and next_a.id == p2 and next_b.id not in (p1, p2)
        stored = sorted((r.labeler, r.pair_id, r.choice) for r in store.all_labels(project.id))
        assert stored == [("l0", p1, "A"), ("l1", p1, "B"), ("l2", p2, "A")]
        pairs = store.pairs(project)
        assert (pairs[p1].labeled_count, pairs[p2].labeled_count) == (2, 1)
        progress = [store.progress(w) for w in (a, b, c)]
        assert [p["done"] for p in progress] == [1, 1, 1] and progress[0]["project_complete"] == 1
        # The counters b's label moved as p1 filled agree with counting afresh: the project's full
        # pairs, and each labeler's open pairs seen (p1 left a's and b's).
        with store.reading() as s:
            assert s.execute(text("SELECT complete_count FROM labeling_projects")).scalar_one() == 1
            seen = s.execute(text("SELECT l.name, l.open_seen_count, (SELECT count(*) FROM labeling_assignments a "
                                  "JOIN labeling_pairs p ON p.id = a.pair_id WHERE a.labeler_id = l.id "
                                  "AND p.labeled_count < 2) FROM labeling_labelers l ORDER BY l.name")).all()
        assert [tuple(r) for r in seen] == [("l0", 1, 1), ("l1", 1, 1), ("l2", 1, 1)]
        assert [o[2] for o in out] == [progress[0], progress[1], None]  # read after all the batch's writes
    finally:
        store.close()


def test_progress_read_with_a_batch_is_each_labelers_progress(db):
    """PostgreSQL reads the progress of a batch's labelers in one statement
    (Store._finish_batch): the pairs that others' leases fill are found once,
    and each labeler's own count leaves out those shown to them. Each must be
    what progress() reads for that labeler alone, after the commit."""
    store, project, who = new_store(db, n_pairs=12, overlap=2, labelers=6)
    try:
        if store.is_sqlite:
            pytest.skip("SQLite reads progress after the commit, with progress() itself")
        # Fullest first, overlap 2: l0 and l1 hold the first pair, l2 and l3 the second, l4 and
        # l5 the third: each pair filled by leases, blocked for everyone not holding it.
        views = [store.next_pair(w) for w in who]
        assert len({v.id for v in views}) == 3
        store.submit(who[0], sub(views[0].id), assign_next=True)  # l0 moves on to a fourth pair
        batch = [_Pending(who[i], sub(views[i].id, "skip" if i == 4 else "A"), True, None, progress=True)
                 for i in (1, 2, 4)]
        out = store._submit_batch(batch)
        read = [o[2] for o in out]
        alone = [store.progress(who[i]) for i in (1, 2, 4)]
        assert read == alone
        # Leases mattered: l1's remaining leaves out pairs that others' labels and leases fill
        # (the second pair, l2's label and l3's lease; l0's pair, which l2 was then given).
        assert alone[0]["remaining"] < alone[0]["project_pairs"] - alone[0]["project_complete"] - 1
    finally:
        store.close()


def test_labels_submitted_together_share_a_commit_and_wait_for_it(db):
    n = 8
    store, project, who = new_store(db, n_pairs=n, overlap=1, labelers=n)
    try:
        views = [store.next_pair(w) for w in who]
        commits = count_commits(store)
        with ThreadPoolExecutor(n) as pool:
            # Hold the project's write lock (SQLite: the writer queue; PostgreSQL: the
            # project row): the writer's first batch waits on it, the rest queue up behind.
            with store._writing() as c:
                store._lock_project(c, project.id, None)
                futures = [pool.submit(store.submit, who[0], sub(views[0].id))]
                # The writer took it and waits for the lock.
                wait_for(lambda: store._committer._thread is not None and store._committer._queue.qsize() == 0)
                time.sleep(0.2)
                futures += [pool.submit(store.submit, w, sub(v.id)) for w, v in zip(who[1:], views[1:])]
                wait_for(lambda: store._committer._queue.qsize() == n - 1)
                time.sleep(0.1)
                assert not any(f.done() for f in futures), "a label was acknowledged before its commit"
            results = [f.result(timeout=30) for f in futures]
        # The holder's own commit, the first label's batch, then one batch of the other seven.
        assert commits[0] - 1 <= 2, f"{commits[0] - 1} commits for {n} labels that arrived together"
        assert len({r.label_id for r, _ in results}) == n
        assert len(store.all_labels(project.id)) == n
    finally:
        store.close()


def test_ranking_items_in_a_batch(db):
    store, project, (a, b, _) = new_store(db, n_pairs=0, overlap=1)
    try:
        store.add_pairs(project, [new_ranking(f"rank {i}", [f"r{i}-{k}" for k in range(4)]) for i in range(2)])
        va, vb = store.next_pair(a), store.next_pair(b)
        out = store._submit_batch([_Pending(a, sub(va.id, "rank", ranking=(3, 2, 1, 0)), False, None),
                                   _Pending(b, sub(vb.id, "rank", ranking=(0, 1, 1, 2)), False, None),
                                   _Pending(b, sub(vb.id, "A"), False, None)])
        assert isinstance(out[0], tuple)
        assert isinstance(out[1], InvalidLabel) and isinstance(out[2], InvalidLabel)
        assert [r.ranking for r in store.all_labels(project.id)] == [(3, 2, 1, 0)]
    finally:
        store.close()


# ---------------------------------------------------------------- the committer alone


def test_committer_gives_each_caller_its_outcome_and_a_failed_batch_to_all():
    seen: list[list[int]] = []
    entered: list[int] = []
    gate = threading.Event()

    def run_batch(items: list[int]) -> list:
        entered.extend(items)
        gate.wait(10)
        seen.append(items)
        if -1 in items:
            raise RuntimeError("commit failed")
        return [ValueError(i) if i % 2 else i * 10 for i in items]

    committer: GroupCommitter[int, int] = GroupCommitter(run_batch, name="test-writer")
    try:
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(committer.submit, i) for i in range(6)]
            # All six handed over (the first batch being written, the rest queued).
            wait_for(lambda: len(entered) + committer._queue.qsize() == 6)
            gate.set()
            outcomes = []
            for f in futures:
                try:
                    outcomes.append(f.result(timeout=10))
                except ValueError as e:
                    outcomes.append(f"refused {e}")
        assert outcomes == [0, "refused 1", 20, "refused 3", 40, "refused 5"]
        assert len(seen) <= 2 and sorted(i for b in seen for i in b) == list(range(6))
        with pytest.raises(RuntimeError, match="commit failed"):
            committer.submit(-1)
        assert committer.submit(4) == 40  # the writer goes on after a failed batch
    finally:
        committer.close()
    assert committer.submit(2) == 20  # a closed committer starts a new writer when used again
    committer.close()


def test_committer_close_writes_what_is_queued_first():
    gate = threading.Event()
    written: list[int] = []

    def run_batch(items: list[int]) -> list:
        written.extend(items)
        gate.wait(10)
        return [i * 10 for i in items]

    committer: GroupCommitter[int, int] = GroupCommitter(run_batch, name="test-writer")
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(committer.submit, i) for i in range(3)]
        # Every item handed over (being written, or queued behind the first batch)
        # before close() is called: waited for, not slept for, as a loaded machine
        # may start the pool's threads late.
        deadline = time.monotonic() + 10
        while len(written) + committer._queue.qsize() < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        closing = pool.submit(committer.close)
        time.sleep(0.1)
        assert not closing.done()  # the first batch is still being written
        gate.set()
        closing.result(timeout=10)
        assert sorted(written) == [0, 1, 2]  # all of them written before close() returned
        assert [f.result(timeout=10) for f in futures] == [0, 10, 20]


def test_a_submission_failing_after_its_writes_is_undone_alone(db):
    """A failure after a submission wrote (a database error, say) rolls the
    batch back; it is run again with a savepoint per submission, so the
    others are stored and the failed one leaves nothing behind."""
    store, project, (a, b, c) = new_store(db, n_pairs=3, overlap=1)
    views = {w.id: store.next_pair(w) for w in (a, b, c)}
    names = {w.id: w.name for w in (a, b, c)}
    write_label, calls = store._write_label, []

    def failing_for_b(conn, plan, *rest):
        out = write_label(conn, plan, *rest)  # the label and its next pair are written: then it fails
        calls.append(names[plan.params["labeler_id"]])
        if plan.params["labeler_id"] == b.id:
            raise RuntimeError("lost the connection")
        return out

    store._write_label = failing_for_b
    # PostgreSQL writes such a batch's labels together (Store._write_together), not through
    # _write_label: the failure comes from there, in the pipeline that holds them all.
    pipeline = store._pipeline

    def pipeline_failing_for_b(conn, runs, **kw):
        rows = pipeline(conn, runs, **kw)
        if any(params.get("new_labeler_id") == b.id for _stmt, params in runs):
            raise RuntimeError("lost the connection")
        return rows

    store._pipeline = pipeline_failing_for_b
    try:
        commits = count_commits(store)
        out = store._submit_batch([_Pending(w, sub(views[w.id].id), True, None) for w in (a, b, c)])
        assert isinstance(out[1], RuntimeError) and isinstance(out[0], tuple) and isinstance(out[2], tuple)
        # Stopped at b (SQLite) or at the pipeline holding b (PostgreSQL), then again with savepoints.
        assert calls == (["l0", "l1"] if store.is_sqlite else []) + ["l0", "l1", "l2"]
        assert commits[0] == 1
        labels = store.all_labels(project.id)
        assert sorted(r.labeler for r in labels) == ["l0", "l2"]
        assert store.pairs(project)[views[b.id].id].labeled_count == 0
        assert store.progress(a)["project_complete"] == 2
    finally:
        store.close()
