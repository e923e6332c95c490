"""Labeling: agreement math, pair making, the store's rules, export, stats, the
reward stage's database reader, and the same store on a real PostgreSQL."""

from __future__ import annotations

import json
import threading
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
from rlhf.labeling.store import Conflict, NewPair, NotFound, Store, Submission, parse_db_url

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


def test_lease_expiry_frees_the_slot(sqlite_url):
    store, project, (a, b, _) = new_store(sqlite_url, n_pairs=1, overlap=1)
    t0 = 1_000_000.0
    assert store.next_pair(a, now=t0).id == 1
    assert store.next_pair(b, now=t0 + 1) is None  # a holds the only slot
    assert store.next_pair(b, now=t0 + 61).id == 1  # a's lease lapsed: b gets it
    assert store.next_pair(a, now=t0 + 62) is None  # a's lapsed pair went to b; never shown twice
    store.close()


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
    store.close()
    assert len(read_records(f"{postgres_url}?project=pg-load")) == 40
