"""Labeling: agreement math, pair making, the store's rules, export, stats, the
reward stage's database reader, and the same store on a real PostgreSQL."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter

import pytest

from rlhf.data import normalize_preferences, read_records
from rlhf.errors import BadInput
from rlhf.labeling.agreement import cohen_kappa, fleiss_kappa, percent_agreement
from rlhf.labeling.config import ExportConfig, ProjectConfig
from rlhf.labeling.export import export_rows, resolve_vote, write_rows
from rlhf.labeling.pairs import Candidate, make_pairs, read_pair_file
from rlhf.labeling.stats import compute
from rlhf.labeling.schema import STRENGTH_MARGIN, Strength
from rlhf.labeling.store import Conflict, NewPair, NotFound, PairFull, Store, Submission, parse_db_url

# ---------------------------------------------------------------- agreement (hand-computed)


def test_cohen_kappa_matches_hand_computation():
    # Wikipedia's example: 50 proposals, 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no.
    # p_o = 35/50 = 0.7; p_e = 0.5*0.6 + 0.5*0.4 = 0.5; kappa = 0.2/0.5 = 0.4.
    r1 = ["y"] * 25 + ["n"] * 25
    r2 = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert cohen_kappa(r1, r2) == pytest.approx(0.4)
    assert cohen_kappa(["A", "B"], ["A", "B"]) == pytest.approx(1.0)
    assert cohen_kappa(["A", "A"], ["A", "A"]) is None  # chance agreement is 1: undefined
    with pytest.raises(ValueError):
        cohen_kappa(["A"], ["A", "B"])


def test_fleiss_kappa_matches_hand_computation():
    # Wikipedia's example: 10 subjects, 14 raters, 5 categories; P-bar 0.378, P_e 0.213, kappa 0.210.
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    items = [Counter({j: n for j, n in enumerate(row) if n}) for row in table]
    assert fleiss_kappa(items) == pytest.approx(0.2099, abs=1e-4)
    # Two raters, two items, both agree on different categories: P-bar = 1, P_e = 0.5 -> 1.
    assert fleiss_kappa([{"A": 2}, {"B": 2}]) == pytest.approx(1.0)
    # Items with one rating carry no agreement information.
    assert fleiss_kappa([{"A": 1}]) is None
    assert percent_agreement([{"A": 2}, {"A": 1, "B": 1}]) == pytest.approx(0.5)


def test_resolve_vote_strict_plurality():
    assert resolve_vote(Counter({"A": 2, "B": 1})) == "A"
    assert resolve_vote(Counter({"A": 1, "B": 1})) is None
    assert resolve_vote(Counter({"tie": 2, "A": 1})) == "tie"
    assert resolve_vote(Counter()) is None


# ---------------------------------------------------------------- pairs


def test_make_pairs_drops_identical_empty_duplicates_and_shuffles_sides():
    cands = [Candidate(f"p{i}", f"one {i}", f"two {i}", "m1", "m2", f"f:{i}") for i in range(200)]
    cands += [Candidate("p0", "two 0", "one 0", "m2", "m1", "f:dup"),  # same pair, swapped
              Candidate("q", "same", "same", "m1", "m2", "f:same"),
              Candidate("q", "  ", "x", "m1", "m2", "f:empty")]
    pairs, st = make_pairs(cands, seed=3)
    assert (st.kept, st.duplicates, st.identical, st.empty) == (200, 1, 1, 1)
    first = Counter(p.source_a for p in pairs)
    assert 70 < first["m1"] < 130  # sides shuffled, not always model 1 on the left
    for p in pairs:
        assert {p.response_a, p.response_b} == {f"one {p.prompt[1:]}", f"two {p.prompt[1:]}"}
        assert (p.source_a == "m1") == p.response_a.startswith("one")  # the source follows its response
    again, _ = make_pairs(cands, seed=3)
    assert again == pairs  # seeded


def test_read_pair_file_formats_and_errors(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "a", "response_a": "x", "response_b": "y"},
        {"prompt": "b", "responses": ["x", "y"]},
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": "x", "rejected": "y"},
    ]) + "\n")
    cands = read_pair_file(str(f))
    assert [c.prompt for c in cands][:2] == ["a", "b"] and cands[2].prompt[0]["content"] == "hi"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response_a": "x", "response_b": "y"}\n{"prompt": "b", "answer": "x"}\n')
    with pytest.raises(BadInput, match=r"bad.jsonl:2: expected 'response_a'"):
        read_pair_file(str(bad))
    bad.write_text('{"prompt": "a", "response_a": 3, "response_b": "y"}\n')
    with pytest.raises(BadInput, match=r"bad.jsonl:1: first response must be a string"):
        read_pair_file(str(bad))


# ---------------------------------------------------------------- store rules


def new_store(url: str, n_pairs: int = 6, overlap: int = 2, labelers: int = 3, name: str = "p"):
    store = Store.open(url, create=True)
    project = store.create_project(name, ProjectConfig(overlap=overlap, lease_seconds=60))
    store.add_pairs(project, [NewPair(f"prompt {i}", f"A{i}", f"B{i}", "ma", "mb") for i in range(n_pairs)])
    who = [store.add_labeler(project, f"l{j}", f"tok-{name}-{j}") for j in range(labelers)]
    return store, project, who


def sub(pair_id: int, choice: str = "A", **kw) -> Submission:
    return Submission(client_id=uuid.uuid4().hex, pair_id=pair_id, choice=choice, **kw)


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'labels.db'}"


def check_assignment_rules(url: str, name: str = "p"):
    """Overlap is respected, a labeler never sees a pair twice, skips free a slot."""
    store, project, (a, b, c) = new_store(url, n_pairs=4, overlap=2, name=name)
    try:
        seen = {x.name: [] for x in (a, b, c)}
        for _round in range(10):
            for who in (a, b, c):
                view = store.next_pair(who)
                if view is None:
                    continue
                assert store.next_pair(who).id == view.id  # reload: same pair
                seen[who.name].append(view.id)
                # c skips everything: skips must not use up the overlap.
                result, _ = store.submit(who, sub(view.id, "skip" if who is c else "A"))
                assert not result.replayed
        for name_, ids in seen.items():
            assert len(ids) == len(set(ids)), f"{name_} saw a pair twice"
        votes = Counter(r.pair_id for r in store.current_labels(project.id) if r.choice != "skip")
        assert votes == {pid: 2 for pid in store.pairs(project)}  # exactly `overlap` each
        assert store.next_pair(a) is None and store.progress(a)["remaining"] == 0
    finally:
        store.close()


def test_assignment_respects_overlap_and_never_repeats(sqlite_url):
    check_assignment_rules(sqlite_url)


def check_far_ahead_labeler_gets_fresh_pairs(url: str, name: str = "p", fresh_first_after: int = 2):
    """A labeler far ahead of the others on an overlap above 1 (more of their
    pairs still open than store.FRESH_FIRST_AFTER, here set to 2 by the caller)
    is given pairs nobody labeled first, not the fullest, which the search would
    reach only after passing over each of theirs; once no fresh pair is left,
    the others' started pairs; never a pair twice. With the default threshold
    the same state gives the fullest pair (``fresh_first_after`` large)."""
    store, project, (a, b, _c) = new_store(url, n_pairs=8, overlap=3, name=name)
    try:
        ids = sorted(store.pairs(project))
        for _ in range(3):  # a: p1, p2, p3, each then labeled once
            store.submit(a, sub(store.next_pair(a).id))
        for _ in range(4):  # b: the fullest first (p1, p2, p3), then p4, which a has not seen
            store.submit(b, sub(store.next_pair(b).id))
        assert store.pairs(project)[ids[3]].labeled_count == 1
        view, order = store.next_pair(a), []
        while view is not None:
            order.append(view.id)
            _result, view = store.submit(a, sub(view.id), assign_next=True)
        if fresh_first_after < 3:  # a has 3 open pairs behind them: far ahead
            assert order == [ids[4], ids[5], ids[6], ids[7], ids[3]]
        else:
            assert order == [ids[3], ids[4], ids[5], ids[6], ids[7]]
        assert store.progress(a)["remaining"] == 0
    finally:
        store.close()


@pytest.mark.parametrize("threshold", [2, 64])
def test_a_labeler_far_ahead_gets_fresh_pairs_first(sqlite_url, monkeypatch, threshold):
    monkeypatch.setattr("rlhf.labeling.store.FRESH_FIRST_AFTER", threshold)
    check_far_ahead_labeler_gets_fresh_pairs(sqlite_url, fresh_first_after=threshold)


def test_lease_expiry_frees_the_slot(sqlite_url):
    store, project, (a, b, _) = new_store(sqlite_url, n_pairs=1, overlap=1)
    t0 = 1_000_000.0
    assert store.next_pair(a, now=t0).id == 1
    assert store.next_pair(b, now=t0 + 1) is None  # a holds the only slot
    assert store.next_pair(b, now=t0 + 61).id == 1  # a's lease lapsed: b gets it
    assert store.next_pair(a, now=t0 + 62) is None  # a's lapsed pair went to b; never shown twice
    store.close()


def check_late_labels(url: str, name: str = "p"):
    """A label sent after its lease lapsed is stored only while the pair has a
    free slot (non-skip labels + others' live leases < overlap)."""
    t0 = 1_000_000.0
    store, project, (a, b, c) = new_store(url, n_pairs=1, overlap=1, name=name)
    try:
        pid = store.next_pair(a, now=t0).id
        assert store.next_pair(b, now=t0 + 61).id == pid  # a's lease lapsed: the slot went to b
        # b's live lease holds the only slot: a's late label is refused, nothing stored.
        with pytest.raises(PairFull, match=f"pair {pid}: your hold on it lapsed"):
            store.submit(a, sub(pid), now=t0 + 62)
        store.submit(b, sub(pid, "B"), now=t0 + 63)
        late = sub(pid)
        with pytest.raises(PairFull):  # b's label fills it now
            store.submit(a, late, now=t0 + 64)
        with pytest.raises(PairFull):  # and a retry of the refused label stays refused
            store.submit(a, late, now=t0 + 65)
        assert [(r.labeler, r.choice) for r in store.all_labels(project.id)] == [("l1", "B")]
        assert store.pairs(project)[pid].labeled_count == 1
        store.submit(a, sub(pid, "skip"), now=t0 + 66)  # a late skip takes no slot: stored
        assert store.next_pair(a, now=t0 + 67) is None and store.progress(a, now=t0 + 67)["remaining"] == 0
        assert store.next_pair(c, now=t0 + 68) is None and store.progress(c, now=t0 + 68)["remaining"] == 0
    finally:
        store.close()
    store, project, (a, b, _) = new_store(url, n_pairs=1, overlap=2, name=name + "-room")
    try:
        pid = store.next_pair(a, now=t0).id
        # Lapsed, but nobody took the slot (overlap 2, nobody else holds it): the late label is stored.
        assert not store.submit(a, sub(pid), now=t0 + 500)[0].replayed
        assert store.next_pair(b, now=t0 + 501).id == pid  # the second slot is still free
        store.submit(b, sub(pid, "skip"), now=t0 + 502)
        last = store.submit(b, sub(pid, "A", supersedes=store.current_labels(project.id)[1].id), now=t0 + 503)
        assert last[0].revision == 1  # skip revised into a vote: there was room
        assert store.pairs(project)[pid].labeled_count == 2
    finally:
        store.close()


def test_late_labels_are_stored_only_while_the_pair_has_room(sqlite_url):
    check_late_labels(sqlite_url)


def test_a_skip_revised_into_a_vote_needs_a_free_slot(sqlite_url):
    store, project, (a, b, _) = new_store(sqlite_url, n_pairs=1, overlap=1)
    pid = store.next_pair(a).id
    skipped, _ = store.submit(a, sub(pid, "skip"))
    assert store.next_pair(b).id == pid
    store.submit(b, sub(pid, "A"))
    with pytest.raises(PairFull):
        store.submit(a, sub(pid, "B", supersedes=skipped.label_id))
    assert store.pairs(project)[pid].labeled_count == 1
    store.close()


def check_late_label_race(url: str, name: str = "p", racers: int = 6):
    """Labelers whose leases on the same pair all lapsed submit at once
    (overlap 1): exactly one label is stored; the rest are refused."""
    store, project, who = new_store(url, n_pairs=1, overlap=1, labelers=racers, name=name)
    try:
        t0 = time.time() - 10_000  # every lease below lapsed long ago
        (pid,) = store.pairs(project)
        for k, labeler in enumerate(who):
            assert store.next_pair(labeler, now=t0 + 61 * k).id == pid  # each lease lapses before the next
        outcomes: list[str] = []
        start = threading.Barrier(racers)

        def race(labeler):
            start.wait()
            try:
                store.submit(labeler, sub(pid), assign_next=True)
                outcomes.append("stored")
            except PairFull:
                outcomes.append("full")

        threads = [threading.Thread(target=race, args=(w,)) for w in who]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert sorted(outcomes) == ["full"] * (racers - 1) + ["stored"]
        assert len(store.all_labels(project.id)) == 1 and store.pairs(project)[pid].labeled_count == 1
    finally:
        store.close()


def test_late_label_race_stores_exactly_one(sqlite_url):
    check_late_label_race(sqlite_url)


def test_remaining_counts_only_what_the_labeler_can_be_given(sqlite_url):
    """The progress count agrees with next_pair: pairs others hold are not 'remaining'."""
    t0 = 1_000_000.0
    store, project, (a, b, _) = new_store(sqlite_url, n_pairs=3, overlap=1)
    held = store.next_pair(a, now=t0).id  # a holds one pair
    assert store.progress(b, now=t0)["remaining"] == 2
    for k in range(2):
        view = store.next_pair(b, now=t0 + k)
        assert view.id != held and store.progress(b, now=t0 + k)["remaining"] == 2 - k  # the one on screen counts
        store.submit(b, sub(view.id), now=t0 + k)
    assert store.next_pair(b, now=t0 + 2) is None
    assert store.progress(b, now=t0 + 2) == {"done": 2, "remaining": 0, "project_pairs": 3, "project_complete": 2}
    assert store.progress(a, now=t0 + 2)["remaining"] == 1  # a's own pair, still leased to a
    # a's lease lapses: the pair is b's to take again, and counted for b (and still for a, who may renew it).
    assert store.progress(b, now=t0 + 100)["remaining"] == 1 and store.progress(a, now=t0 + 100)["remaining"] == 1
    assert store.next_pair(b, now=t0 + 100).id == held
    assert store.progress(a, now=t0 + 101)["remaining"] == 0 and store.next_pair(a, now=t0 + 101) is None
    store.close()


def _progress_by_scanning(store: Store, who, overlap: int, now: float) -> dict[str, int]:
    """progress() as it was computed before the project counters: by counting
    the project's pairs and this labeler's assignments outright."""
    from sqlalchemy import func, select

    from rlhf.labeling.schema import Assignment, Pair
    from rlhf.labeling.store import _Q

    params = {"me": who.id, "project": who.project_id, "overlap": overlap, "now": now}
    with store.reading() as s:
        done = s.scalar(select(func.count()).select_from(Assignment).where(
            Assignment.labeler_id == who.id, Assignment.status.in_(("labeled", "skipped"))))
        remaining = s.scalar(select(func.count()).select_from(Pair).where(
            Pair.project_id == who.project_id, Pair.labeled_count < overlap, *_Q._new_to_me), params)
        own = s.execute(_Q.own_open, params).first()
        if own is not None and (own.expires_at > now or s.scalar(_Q.taken, {**params, "pair": own.id}) < overlap):
            remaining += 1
        total, complete = s.execute(_Q.pair_counts, params).one()
    return {"done": done, "remaining": remaining, "project_pairs": total, "project_complete": complete or 0}


def check_progress_counters_match_a_full_count(url: str, name: str = "p", steps: int = 300):
    """The incremental progress (project counters, this labeler's assignments,
    the live leases) equals counting everything, through random leases, lapses,
    labels, skips, revisions, late labels, new pairs and an overlap change."""
    import random

    rng = random.Random(7)
    store, project, who = new_store(url, n_pairs=10, overlap=2, labelers=4, name=name)
    t, overlap = 1_000_000.0, 2
    for step in range(steps):
        t += rng.choice([0.5, 1, 5, 70])  # 70 > lease_seconds: leases lapse now and then
        w = rng.choice(who)
        action = rng.random()
        if action < 0.45:
            view = store.next_pair(w, now=t)
            if view is not None and rng.random() < 0.8:
                try:  # half the time with the next pair handed out in the same commit, as the page asks
                    store.submit(w, sub(view.id, rng.choice(["A", "B", "skip"])), assign_next=rng.random() < 0.5,
                                 now=t)
                except PairFull:
                    pass
        elif action < 0.6:  # revise a label: a skip into a vote or back, which moves the pair's count
            mine = store.current_labels(project.id, labeler_id=w.id)
            if mine:
                cur = rng.choice(mine)
                try:
                    store.submit(w, sub(cur.pair_id, "skip" if cur.choice != "skip" else "A", supersedes=cur.id),
                                 now=t)
                except PairFull:
                    pass
        elif action < 0.63:
            store.add_pairs(project, [NewPair(f"{name} more {step}", "x", "y")])
        elif action < 0.65:
            overlap = 3 if overlap == 2 else 2
            project = store.set_project_config(project, ProjectConfig(overlap=overlap, lease_seconds=60))
        elif action < 0.66:  # revoked: their open pairs go back to the pool; reinstated at once
            store.revoke_labeler(project, w.name)
            store.add_labeler(project, w.name, f"tok-{name}-{w.name}-{step}", replace_token=True)
        for x in who:
            assert store.progress(x, now=t) == _progress_by_scanning(store, x, overlap, t), (step, x.name)
    store.close()


def test_progress_counters_match_a_full_count(sqlite_url):
    check_progress_counters_match_a_full_count(sqlite_url)


def check_idempotency_and_history(url: str, name: str = "p"):
    store, project, (a, b, _) = new_store(url, n_pairs=2, name=name)
    try:
        view = store.next_pair(a)
        first = sub(view.id, "A", reason="<script>alert(1)</script>")
        r1, _ = store.submit(a, first)
        r2, _ = store.submit(a, first)  # a retry: same client id, same content
        assert (r2.label_id, r2.replayed) == (r1.label_id, True)
        with pytest.raises(Conflict, match="already used"):
            store.submit(a, Submission(first.client_id, view.id, "B"))
        with pytest.raises(Conflict, match="supersedes="):
            store.submit(a, sub(view.id, "B"))
        with pytest.raises(NotFound):
            store.submit(a, sub(999_999))
        other = next(pid for pid in store.pairs(project) if pid != view.id)
        with pytest.raises(Conflict, match="not assigned"):
            store.submit(b, sub(other))
        r3, _ = store.submit(a, sub(view.id, "B", supersedes=r1.label_id))
        assert r3.revision == 1
        with pytest.raises(Conflict):  # superseding the old revision again: stale
            store.submit(a, sub(view.id, "tie", supersedes=r1.label_id))
        history = store.all_labels(project.id)
        assert [(r.choice, r.revision) for r in history] == [("A", 0), ("B", 1)]
        assert history[0].reason == "<script>alert(1)</script>"  # stored verbatim, never rewritten
        assert [(r.choice, r.revision) for r in store.current_labels(project.id)] == [("B", 1)]
    finally:
        store.close()


def test_idempotent_submissions_and_superseded_history(sqlite_url):
    check_idempotency_and_history(sqlite_url)


def test_labels_table_is_append_only_in_the_database(sqlite_url, tmp_path):
    import sqlite3

    check_idempotency_and_history(sqlite_url)
    with sqlite3.connect(tmp_path / "labels.db") as con:
        for sql in ("UPDATE labeling_labels SET choice = 'B'", "DELETE FROM labeling_labels"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                con.execute(sql)
        assert con.execute("SELECT count(*) FROM labeling_labels").fetchone() == (2,)


def _sql(url: str, *statements: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(parse_db_url(url).url)
    try:
        with engine.begin() as con:
            for statement in statements:
                con.execute(text(statement))
    finally:
        engine.dispose()


def check_schema_upgrade(url: str, name: str = "p"):
    """A version-1 database (labels without strength and both_bad) is upgraded
    in place when opened; its labels are kept and new ones carry the new fields.
    A version this code does not know is refused."""
    store, project, (a, _, _) = new_store(url, n_pairs=2, name=name)
    first = store.next_pair(a).id
    old, _ = store.submit(a, sub(first, "A", reason="from version 1"))
    store.close()
    # Back to version 1: the labels table as it was then, no project counters (version 3), no rankings (4),
    # no labeler counters (5).
    _sql(url, "ALTER TABLE labeling_labels DROP COLUMN strength", "ALTER TABLE labeling_labels DROP COLUMN both_bad",
         "ALTER TABLE labeling_projects DROP COLUMN pair_count",
         "ALTER TABLE labeling_projects DROP COLUMN complete_count", "DROP INDEX ix_labeling_assignments_live",
         "ALTER TABLE labeling_pairs DROP COLUMN responses", "ALTER TABLE labeling_pairs DROP COLUMN sources",
         "ALTER TABLE labeling_labels DROP COLUMN ranking",
         "ALTER TABLE labeling_labelers DROP COLUMN done_count",
         "ALTER TABLE labeling_labelers DROP COLUMN open_seen_count",
         """UPDATE labeling_meta SET value = '1' WHERE "key" = 'schema_version'""")
    with Store.open(url) as store:
        (kept,) = [r for r in store.all_labels(project.id) if r.id == old.label_id]
        assert (kept.choice, kept.reason, kept.strength, kept.both_bad) == ("A", "from version 1", None, False)
        # Counters unknown after the upgrade: progress counts the pairs until a write stores them.
        assert store.progress(a) == {"done": 1, "remaining": 1, "project_pairs": 2, "project_complete": 0}
        second = store.next_pair(a).id
        store.submit(a, sub(second, "B", strength="slightly_better", both_bad=True))
        assert [(r.strength, r.both_bad) for r in store.current_labels(project.id, labeler_id=a.id)] == [
            (None, False), ("slightly_better", True)]
        assert store.progress(a) == {"done": 2, "remaining": 0, "project_pairs": 2, "project_complete": 0}
    _sql(url, """UPDATE labeling_meta SET value = '99' WHERE "key" = 'schema_version'""")
    try:
        with pytest.raises(BadInput, match="labeling schema version 99, this rlhf reads 5"):
            Store.open(url)
    finally:
        _sql(url, """UPDATE labeling_meta SET value = '5' WHERE "key" = 'schema_version'""")


def test_a_version_1_database_is_upgraded_in_place(sqlite_url):
    check_schema_upgrade(sqlite_url)


def test_open_refuses_missing_foreign_and_garbage_databases(tmp_path):
    with pytest.raises(BadInput, match="no labeling database there"):
        Store.open(f"sqlite:///{tmp_path / 'none.db'}")
    assert not (tmp_path / "none.db").exists()  # not even an empty file was created
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not sqlite at all" * 10)
    with pytest.raises(BadInput, match="cannot open"):
        Store.open(str(garbage), create=True)
    assert garbage.read_bytes() == b"not sqlite at all" * 10
    import sqlite3

    other = tmp_path / "other.db"
    with sqlite3.connect(other) as con:
        con.execute("create table mine (x)")
    with pytest.raises(BadInput, match="not a labeling database"):
        Store.open(str(other), create=True)
    with pytest.raises(BadInput, match="unsupported database 'mysql'"):
        parse_db_url("mysql://u@h/db")
    db = parse_db_url("postgresql://u:secret@h/db?project=x&min_votes=2")
    assert "secret" not in db.display and db.options == {"project": "x", "min_votes": "2"}
    assert db.url.drivername == "postgresql+psycopg"


# ---------------------------------------------------------------- export and the reward stage's reader


def labeled_store(url: str):
    """3 labelers, overlap 3: pair 1 -> A wins 2:1, pair 2 -> B unanimous,
    pair 3 -> split A/B/tie, pair 4 -> tie majority, pair 5 -> one skip only."""
    store, project, who = new_store(url, n_pairs=5, overlap=3)
    plan = {1: "AAB", 2: "BBB", 3: "ABt", 4: "ttA", 5: "s"}
    names = {"A": "A", "B": "B", "t": "tie", "s": "skip"}
    for pid, votes in plan.items():
        for j, v in enumerate(votes):
            assert store.next_pair(who[j]).id == pid
            store.submit(who[j], sub(pid, names[v]))
    return store, project


def test_export_majority_ties_min_votes_and_margin(sqlite_url, tmp_path):
    store, project = labeled_store(sqlite_url)
    rows, st = export_rows(store, project, ExportConfig())
    assert [(r["pair_id"], r["chosen"], r["rejected"]) for r in rows] == [(1, "A0", "B0"), (2, "B1", "A1")]
    assert (st.exported, st.ties_dropped, st.too_few_votes) == (2, 2, 1)
    assert rows[0]["chosen_source"] == "ma" and rows[0]["chosen_votes"] == 2
    rows, st = export_rows(store, project, ExportConfig(ties="random", margin=True))
    assert st.ties_randomised == 2 and len(rows) == 4
    assert rows[0]["margin"] == pytest.approx(1 / 3) and rows[1]["margin"] == pytest.approx(1.0)
    rows, _ = export_rows(store, project, ExportConfig(min_votes=3))
    assert [r["pair_id"] for r in rows] == [1, 2]
    # The rows are what the reward stage reads.
    out = write_rows(rows, tmp_path / "prefs.jsonl", "jsonl")
    pairs, dropped = normalize_preferences(read_records(str(out)))
    assert dropped == 0 and pairs[0] == {"prompt": "prompt 0", "chosen": "A0", "rejected": "B0"}
    hf = write_rows(rows, tmp_path / "prefs_hf", "hf")
    from datasets import load_from_disk

    assert load_from_disk(str(hf))["chosen"] == ["A0", "B1"]
    write_rows(rows, tmp_path / "prefs.parquet", "parquet")
    store.close()


def judged_store(url: str):
    """3 labelers, overlap 3, labels with strengths and "both bad" marks:
    pair 1 -> A 2:1, strengths 3 and 2 among A's voters; pair 2 -> B 2:1, both
    bad by 2 of 3; pair 3 -> A 3:0, no strengths; pair 4 -> A/B/tie split, one
    "both bad" mark."""
    store, project, who = new_store(url, n_pairs=4, overlap=3)
    plan = {1: [("A", "significantly_better", False), ("A", "better", False), ("B", "slightly_better", False)],
            2: [("B", "slightly_better", True), ("B", None, True), ("A", None, False)],
            3: [("A", None, False)] * 3,
            4: [("A", "significantly_better", True), ("B", None, False), ("tie", None, False)]}
    for pid, votes in plan.items():
        for j, (choice, strength, both_bad) in enumerate(votes):
            assert store.next_pair(who[j]).id == pid
            store.submit(who[j], sub(pid, choice, strength=strength, both_bad=both_bad))
    return store, project


def test_export_strength_margin_and_both_bad(sqlite_url, tmp_path):
    assert set(STRENGTH_MARGIN) == set(Strength.__args__)  # every grade the API takes has a margin
    store, project = judged_store(sqlite_url)
    rows, st = export_rows(store, project, ExportConfig())
    # Pair 2 (both bad) and pair 4 (no majority) are left out by default; no margin column unless asked.
    assert [(r["pair_id"], r["both_bad"], r["both_bad_votes"]) for r in rows] == [(1, False, 0), (3, False, 0)]
    assert (st.exported, st.both_bad, st.ties_dropped) == (2, 1, 1) and "margin" not in rows[0]
    rows, _ = export_rows(store, project, ExportConfig(margin="strength"))
    # The winners' mean strength: (3 + 2) / 2; none given -> 0 (no margin: the plain Bradley-Terry loss).
    assert [r["margin"] for r in rows] == [2.5, 0.0]
    rows, st = export_rows(store, project, ExportConfig(margin="strength", include_both_bad=True, ties="random"))
    by_pair = {r["pair_id"]: r for r in rows}
    assert (by_pair[2]["both_bad"], by_pair[2]["both_bad_votes"], by_pair[2]["chosen"]) == (True, 2, "B1")
    assert by_pair[2]["margin"] == 1.0  # only one B voter gave a strength: slightly better
    assert by_pair[4]["margin"] == 0.0 and not by_pair[4]["both_bad"]  # a random side: no margin; 1 of 3 marks
    assert (st.exported, st.both_bad, st.ties_randomised) == (4, 1, 1)
    rows, _ = export_rows(store, project, ExportConfig(margin=True))  # true: the vote margin, as before
    assert rows[0]["margin"] == pytest.approx(1 / 3)
    # The reward stage reads the margin column, from a file and from the database.
    rows, _ = export_rows(store, project, ExportConfig(margin="strength", include_both_bad=True))
    out = write_rows(rows, tmp_path / "prefs.jsonl", "jsonl")
    pairs, _ = normalize_preferences(read_records(str(out)))
    assert [p["margin"] for p in pairs] == [2.5, 1.0, 0.0]
    write_rows(rows, tmp_path / "prefs.parquet", "parquet")  # bool and float columns: Arrow takes them
    store.close()
    pairs, _ = normalize_preferences(read_records(f"{sqlite_url}?margin=strength&include_both_bad=true"))
    assert [p["margin"] for p in pairs] == [2.5, 1.0, 0.0]
    with pytest.raises(BadInput, match=r"key 'margin': expected bool or 'votes' \| 'strength', got 'loud'"):
        read_records(f"{sqlite_url}?margin=loud")


def test_export_never_overwrites_the_database_or_a_foreign_directory(sqlite_url, tmp_path):
    store, project = labeled_store(sqlite_url)
    rows, _ = export_rows(store, project, ExportConfig())
    store.close()
    db = tmp_path / "labels.db"
    before = db.read_bytes()
    for target in (db, tmp_path / "labels.db-wal", tmp_path):
        with pytest.raises(BadInput, match="labeling database"):
            write_rows(rows, target, "jsonl" if target.name != tmp_path.name else "hf", protect=[db])
    mine = tmp_path / "my_dir"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(BadInput, match="not a Hugging Face dataset directory"):
        write_rows(rows, mine, "hf", protect=[db])
    assert (mine / "notes.txt").read_text() == "keep me" and db.read_bytes() == before


def test_reward_data_path_reads_a_labeling_database(sqlite_url, tmp_path):
    store, _ = labeled_store(sqlite_url)
    store.close()
    records = read_records(f"{sqlite_url}?project=p")
    assert [r.data["chosen"] for r in records] == ["A0", "B1"]
    assert records[0].where.endswith("project p pair 1")
    pairs, _ = normalize_preferences(records)
    assert pairs[1] == {"prompt": "prompt 1", "chosen": "B1", "rejected": "A1"}
    assert len(read_records(f"{sqlite_url}?ties=random&margin=true")) == 4  # the only project by default
    with pytest.raises(BadInput, match=r"no such project"):
        read_records(f"{sqlite_url}?project=nope")
    with pytest.raises(BadInput, match=r"key 'min_votes': expected an integer"):
        read_records(f"{sqlite_url}?min_votes=lots")
    with pytest.raises(BadInput, match="no labeling database there"):
        read_records(f"sqlite:///{tmp_path / 'missing.db'}")


def test_stats_counts_throughput_and_agreement(sqlite_url):
    store, project = labeled_store(sqlite_url)
    st = compute(store, project)
    assert st["pairs"] == {"total": 5, "with_labels": 4, "complete": 4}
    assert st["labels"]["current"] == 13 and st["labels"]["skip"] == 1
    # Votes per pair over {A, B, tie}: {A2 B1}, {B3}, {A1 B1 tie1}, {tie2 A1}.
    # P_i = 1/3, 1, 0, 1/3 -> P-bar = 5/12; p(A, B, tie) = (4, 5, 3)/12 -> P_e = 50/144;
    # kappa = (60 - 50) / (144 - 50) = 10/94.
    assert st["agreement"]["fleiss_kappa"] == pytest.approx(10 / 94)
    by_name = {r["name"]: r for r in st["labelers"]}
    assert by_name["l0"]["labels"] == 4 and by_name["l0"]["skips"] == 1
    assert (by_name["l2"]["labels"], by_name["l2"]["skips"]) == (4, 0)
    assert len(st["agreement"]["cohen_kappa"]) == 3
    store.close()


# ---------------------------------------------------------------- PostgreSQL


@pytest.fixture
def postgres_url(postgres_server):
    return postgres_server


def test_postgres_store_same_rules_and_concurrent_submits(postgres_url):
    pytest.importorskip("psycopg")
    check_assignment_rules(postgres_url, name="pg-rules")
    check_idempotency_and_history(postgres_url, name="pg-history")
    check_late_labels(postgres_url, name="pg-late")
    check_late_label_race(postgres_url, name="pg-race", racers=8)
    check_schema_upgrade(postgres_url, name="pg-upgrade")
    check_progress_counters_match_a_full_count(postgres_url, name="pg-progress", steps=150)
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import DBAPIError

    engine = create_engine(parse_db_url(postgres_url).url)
    with pytest.raises(DBAPIError, match="append-only"), engine.begin() as con:
        con.execute(text("DELETE FROM labeling_labels"))
    engine.dispose()
    # 8 threads, each a labeler submitting and replaying at once: no label lost or doubled.
    store = Store.open(postgres_url)
    project = store.create_project("pg-load", ProjectConfig(overlap=3))
    store.add_pairs(project, [NewPair(f"q{i}", f"x{i}", f"y{i}") for i in range(40)])
    who = [store.add_labeler(project, f"t{j}", f"pg-load-{j}") for j in range(8)]
    acked: list[tuple[str, int]] = []
    errors: list[BaseException] = []

    def work(labeler):
        try:
            view = store.next_pair(labeler)
            while view is not None:
                s = sub(view.id, "A")
                # Submit-and-assign in one transaction, as the web page does (this once deadlocked).
                result, view = store.submit(labeler, s, assign_next=True)
                assert store.submit(labeler, s)[0].label_id == result.label_id
                acked.append((s.client_id, result.label_id))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(w,)) for w in who]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    rows = store.all_labels(project.id)
    assert len(acked) == len(rows) == 40 * 3  # every slot filled exactly once
    assert sorted(r.id for r in rows) == sorted(i for _, i in acked)
    assert Counter(r.pair_id for r in rows) == {pid: 3 for pid in store.pairs(project)}
    now = time.time()  # the counters kept up under concurrent submits
    for w in who:
        progress = store.progress(w, now=now)
        assert progress == _progress_by_scanning(store, w, 3, now)
        assert (progress["remaining"], progress["project_pairs"], progress["project_complete"]) == (0, 40, 40)
    store.close()
    assert len(read_records(f"{postgres_url}?project=pg-load")) == 40


# ---------------------------------------------------------------- ranking items (K responses)


def test_ranking_items_store_overlap_revision_and_export_pairs(sqlite_url):
    from rlhf.labeling.export import preference_rows
    from rlhf.labeling.pairs import RankCandidate, make_rankings
    from rlhf.labeling.store import InvalidLabel

    cands = [RankCandidate(f"q{i}", [f"r{i}-{j}" for j in range(4)], [f"m{j}" for j in range(4)], f"f:{i}")
             for i in range(3)]
    cands += [RankCandidate("q0", ["r0-3", "r0-2", "r0-1", "r0-0"], ["", "", "", ""], "f:dup"),
              RankCandidate("q9", ["a", "b", "a", "c"], ["", "", "", ""], "f:same"),
              RankCandidate("q8", ["a", " ", "b", "c"], ["", "", "", ""], "f:empty")]
    items, st = make_rankings(cands, seed=1)
    assert (st.kept, st.duplicates, st.identical, st.empty) == (3, 1, 1, 1)
    assert all(sorted(it.responses) == [f"r{i}-{j}" for j in range(4)] for i, it in enumerate(items))
    store = Store.open(sqlite_url, create=True)
    project = store.create_project("rank", ProjectConfig(overlap=2, lease_seconds=60))
    assert store.add_pairs(project, items) == (3, 0)
    assert store.add_pairs(project, [NewPair("q1", "x", "y")]) == (1, 0)  # a pair next to the rankings
    a, b, c = (store.add_labeler(project, f"l{j}", f"tok-rank-{j}") for j in range(3))
    view = store.next_pair(a)
    assert view.responses == items[0].responses
    with pytest.raises(InvalidLabel) as bad:
        store.submit(a, sub(view.id, "rank", ranking=(0, 1, 1, 2)))
    assert bad.value.field == "ranking"
    for wrong in [(0, 1, 2), (0, 1, 2, 3, 4), (1, 2, 3, 4)]:
        with pytest.raises(InvalidLabel, match="permutation"):
            store.submit(a, sub(view.id, "rank", ranking=wrong))
    with pytest.raises(InvalidLabel) as bad:
        store.submit(a, sub(view.id, "A"))
    assert bad.value.field == "choice"
    first = sub(view.id, "rank", ranking=(2, 0, 3, 1))
    done, _ = store.submit(a, first)
    assert store.submit(a, first)[0].replayed  # a retry
    with pytest.raises(Conflict):  # the same client id, another order
        store.submit(a, Submission(first.client_id, view.id, "rank", ranking=(0, 1, 2, 3)))
    # Revised, append-only: the new order counts.
    store.submit(a, sub(view.id, "rank", ranking=(3, 2, 1, 0), supersedes=done.label_id))
    store.submit(a, sub(view.id, "rank", ranking=(0, 1, 2, 3), supersedes=done.label_id + 1))
    # Overlap 2: a ranking item takes two labelers, never a third at the same time.
    got = {who.name: [] for who in (a, b, c)}
    for _round in range(6):
        for who in (a, b, c):
            v = store.next_pair(who)
            if v is None:
                continue
            got[who.name].append(v.id)
            if v.responses is None:
                store.submit(who, sub(v.id, "A"))
            else:
                store.submit(who, sub(v.id, "rank", ranking=tuple(range(len(v.responses)))))
    for pid, p in store.pairs(project).items():
        assert p.labeled_count == 2, pid
    current = store.current_labels(project.id)
    assert [r.ranking for r in current if r.labeler == "l0" and r.pair_id == view.id] == [(0, 1, 2, 3)]
    rows, summary = preference_rows(store.pairs(project), current, ExportConfig(margin="votes"))
    ranked = [r for r in rows if r["ranking_id"] == view.id]
    assert len(ranked) == 6 and summary.exported == 3 * 6 + 1
    shown = view.responses
    for r in ranked:  # both labelers ranked in shown order: index i beats every j > i
        assert shown.index(r["chosen"]) < shown.index(r["rejected"])
        assert (r["rank_chosen"], r["rank_rejected"]) == (shown.index(r["chosen"]) + 1,
                                                          shown.index(r["rejected"]) + 1)
        assert r["margin"] == 1.0 and r["chosen_votes"] == 2 and r["pair_id"] == view.id
    (pair_row,) = [r for r in rows if r["ranking_id"] is None]
    assert pair_row["chosen"] == "x" and pair_row["rank_chosen"] is None
    store.close()


def test_ranking_export_orientation_and_split_votes():
    from types import SimpleNamespace

    from rlhf.labeling.export import preference_rows
    from rlhf.labeling.store import LabelRow

    item = SimpleNamespace(id=7, prompt=json.dumps("q"), responses=json.dumps(["w", "x", "y", "z"]),
                           sources=json.dumps(["m0", "m1", "m2", "m3"]), response_a="w", response_b="x")

    def rank(labeler, order):
        return LabelRow(1, 7, labeler, "rank", "", 0, 0.0, None, None, False, tuple(order))

    rows, _ = preference_rows({7: item}, [rank("ann", (2, 0, 3, 1))], ExportConfig())  # y > w > z > x
    assert len(rows) == 6
    place = {"y": 1, "w": 2, "z": 3, "x": 4}
    assert {(r["chosen"], r["rejected"]) for r in rows} == {
        (a, b) for a in place for b in place if place[a] < place[b]}
    assert all((r["rank_chosen"], r["rank_rejected"]) == (place[r["chosen"]], place[r["rejected"]]) for r in rows)
    assert all(r["chosen_source"] == "m" + str("wxyz".index(r["chosen"])) for r in rows)
    # Two labelers who disagree on one pair: that pair is a split, dropped by default.
    rows, summary = preference_rows({7: item}, [rank("ann", (2, 0, 3, 1)), rank("ben", (0, 2, 3, 1))],
                                    ExportConfig())
    assert len(rows) == 5 and summary.ties_dropped == 1
    rows, summary = preference_rows({7: item}, [rank("ann", (2, 0, 3, 1)), rank("ben", (0, 2, 3, 1))],
                                    ExportConfig(ties="random"))
    assert len(rows) == 6 and summary.ties_randomised == 1


@pytest.mark.parametrize("threshold", [2, 64])
def test_postgres_labeler_far_ahead_gets_fresh_pairs_first(postgres_url, monkeypatch, threshold):
    pytest.importorskip("psycopg")
    monkeypatch.setattr("rlhf.labeling.store.FRESH_FIRST_AFTER", threshold)
    check_far_ahead_labeler_gets_fresh_pairs(postgres_url, name=f"pg-ahead-{threshold}",
                                             fresh_first_after=threshold)


def prepared_form(store: Store, stmt, params: dict) -> tuple[str, str]:
    """``stmt`` as PostgreSQL's PREPARE takes it ($1, $2, ...) and its
    parameters as EXECUTE's argument list, to look at the plan kept for it."""
    import re

    compiled = stmt.compile(dialect=store.engine.dialect)
    values = compiled.construct_params(params)
    names: list[str] = []

    def placeholder(m: re.Match) -> str:
        if m[1] not in names:
            names.append(m[1])
        return f"${names.index(m[1]) + 1}"

    sql = re.sub(r"%\((\w+)\)s", placeholder, str(compiled))
    return sql, ", ".join(f"'{values[n]}'" for n in names)


def test_postgres_progress_finds_live_leases_by_index_after_the_project_grows(postgres_url):
    """PostgreSQL keeps one (generic) plan for a statement psycopg prepared, made
    with the table sizes of that moment. Made while a project had few
    assignments, progress's plan read the whole assignment table once per live
    lease, its cost growing with every label until autovacuum's next ANALYZE.
    The store's connections must plan it with indexes whenever it is planned."""
    pytest.importorskip("psycopg")
    from sqlalchemy import text

    from rlhf.labeling.store import _Q

    store = Store.open(postgres_url, create=True)
    project = store.create_project("pg-plan", ProjectConfig(overlap=3))
    store.add_pairs(project, [NewPair(f"q{i}", f"x{i}", f"y{i}") for i in range(200)])
    who = [store.add_labeler(project, f"p{j}", f"pg-plan-{j}") for j in range(25)]
    now = time.time()
    sql, args = prepared_form(store, _Q.progress_counts, {"me": who[0].id, "project": project.id, "overlap": 3,
                                                         "now": now})
    with store.engine.connect() as c:
        c.exec_driver_sql("SET plan_cache_mode = force_generic_plan")  # what psycopg's prepared statement may get
        c.exec_driver_sql(f"PREPARE progress AS {sql}".replace("%", "%%"))
        c.exec_driver_sql(f"EXECUTE progress({args})").one()  # planned now, with no assignments yet
        with store.engine.begin() as w:  # the project grows to 5,000 assignments
            w.execute(text("INSERT INTO labeling_assignments (pair_id, labeler_id, status, assigned_at, expires_at) "
                           "SELECT p.id, l.id, CASE WHEN p.id % 40 = 0 THEN 'open' ELSE 'labeled' END, :now, :exp "
                           "FROM labeling_pairs p, labeling_labelers l WHERE p.project_id = :project "
                           "AND l.project_id = :project"), {"now": now, "exp": now + 600, "project": project.id})
        plan = "\n".join(c.exec_driver_sql(f"EXPLAIN EXECUTE progress({args})").scalars())
    store.close()
    assert "Seq Scan on labeling_assignments" not in plan, plan


def test_postgres_progress_plan_probes_pairs_whatever_the_labelers_history(postgres_url):
    """With one plan per statement made without the parameters' values, a
    status bound as a parameter looked like a third of all assignments:
    progress's plan then hashed every assignment of the labeler (growing with
    their history) instead of probing the few pairs others' leases fill by
    key. The statuses are constants in the SQL, where the statistics see them."""
    pytest.importorskip("psycopg")
    from sqlalchemy import text

    from rlhf.labeling.store import _Q

    store, project, (solo, other) = new_store(postgres_url, n_pairs=3000, overlap=2, labelers=2, name="pg-hist")
    try:
        now = time.time()
        with store.engine.begin() as w:  # the labeler's long history: 3,000 pairs labeled
            w.execute(text("INSERT INTO labeling_assignments (pair_id, labeler_id, status, assigned_at, expires_at) "
                           "SELECT id, :me, 'labeled', :now, :now FROM labeling_pairs WHERE project_id = :project"),
                      {"me": solo.id, "now": now - 100, "project": project.id})
            w.execute(text("ANALYZE labeling_assignments, labeling_pairs"))
        store.next_pair(other)  # one live lease, on a pair the labeler has seen
        sql, args = prepared_form(store, _Q.progress_counts, store._progress_params(solo, 2, now))
        with store.engine.connect() as c:
            c.exec_driver_sql(f"PREPARE progress AS {sql}".replace("%", "%%"))
            plan = "\n".join(c.exec_driver_sql(f"EXPLAIN (ANALYZE, COSTS OFF) EXECUTE progress({args})").scalars())
        assert "Hash Anti Join" not in plan and "rows=3000" not in plan, plan
    finally:
        store.close()


def test_postgres_keeps_one_plan_per_statement_it_prepared(postgres_url):
    """PostgreSQL planned some prepared statements afresh on every call (their
    plan for unknown parameters looked costlier than one made for the values):
    the batch's progress read (``= ANY(:ids)``) and handing out a pair nobody
    labeled, 120-180 µs of planning each time. The store's connections keep one
    generic plan per statement: none planned for the values once prepared."""
    pytest.importorskip("psycopg")
    from rlhf.labeling.store import _Q

    store, project, who = new_store(postgres_url, n_pairs=20, overlap=2, labelers=6, name="pg-generic")
    try:
        for w in who:
            store.next_pair(w)
        params = {**store._progress_params(who[0], 2, time.time()), "ids": [who[0].id]}
        with store.engine.connect() as c:
            for n in range(12):  # psycopg prepares it on the 5th call; one labeler, then all six
                params["ids"] = [w.id for w in who[: 1 if n % 2 else 6]]
                rows = store._pipeline(c, [(_Q.progress_of_labelers, params)], every_row=True)[0]
                assert len(rows) == len(params["ids"])
            generic, custom = c.exec_driver_sql(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements "
                "WHERE statement LIKE '%%filled_by_leases%%'").one()
        assert custom == 0 and generic >= 5, (generic, custom)
    finally:
        store.close()
