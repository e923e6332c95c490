"""Load and crash tests against a real ``rlhf label serve`` process on 127.0.0.1.

Load: 20 concurrent labelers submit >= 2,000 labels (10% of them re-sent
with the same client id, as a client that lost the answer would); zero lost,
zero duplicated. Crash: SIGKILL the server mid-load, restart it on the same
database; every acknowledged label is there, and the clients' retries (same
client ids) did not double-count anything. Both run on SQLite and on a local
PostgreSQL server (skipped where none can be started; CI installs one).

Loops are bounded by a label count and a deadline; traffic stays on loopback.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from rlhf.labeling.store import parse_db_url
from helpers.labeling import LoadResult, ServerProcess, make_load_project, simulate_labelers

LABELERS = 20
TOTAL = 2000
OVERLAP = 3


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path) -> str:
    """A fresh database URL: an SQLite file, or a new database on a local PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'labels.db'}"
    server = request.getfixturevalue("postgres_server")
    name = f"load_{request.node.name.split('[')[0][-20:]}_{int(time.time() * 1000) % 10**8}"
    admin = create_engine(parse_db_url(server).url, isolation_level="AUTOCOMMIT")
    with admin.connect() as con:
        con.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return server.rsplit("/", 1)[0] + "/" + name


def query(db: str, sql: str, **params) -> list[tuple]:
    """Rows straight from the database, bypassing the server and the Store."""
    engine = create_engine(parse_db_url(db).url)
    try:
        with engine.connect() as con:
            return [tuple(r) for r in con.execute(text(sql), params)]
    finally:
        engine.dispose()


def db_labels(db: str) -> dict[tuple[int, str], tuple[int, int, str]]:
    """(labeler id, client id) -> (label id, pair id, choice)."""
    rows = query(db, "SELECT labeler_id, client_id, id, pair_id, choice FROM labeling_labels")
    return {(r[0], r[1]): (r[2], r[3], r[4]) for r in rows}


def labeler_ids(db: str) -> dict[str, int]:
    return dict(query(db, "SELECT name, id FROM labeling_labelers"))


def assert_exactly_once(db: str, result: LoadResult) -> dict:
    """Every acknowledged label is stored with its id, pair and choice; nothing stored twice."""
    stored = db_labels(db)
    ids = labeler_ids(db)
    lost = [cid for cid, (name, label_id, pair, choice) in result.acked.items()
            if stored.get((ids[name], cid)) != (label_id, pair, choice)]
    assert not lost, f"{len(lost)} acknowledged labels missing or changed, e.g. {lost[:3]}"
    doubled = query(db, "SELECT pair_id, labeler_id, count(*) FROM labeling_labels "
                        "GROUP BY pair_id, labeler_id HAVING count(*) > 1")
    over = query(db, "SELECT pair_id, count(*) FROM labeling_labels WHERE choice != 'skip' "
                     "GROUP BY pair_id HAVING count(*) > :overlap", overlap=OVERLAP)
    counts = query(db, "SELECT p.id FROM labeling_pairs p WHERE p.labeled_count != (SELECT count(*) "
                       "FROM labeling_labels l WHERE l.pair_id = p.id AND l.choice != 'skip')")
    assert not doubled, f"a labeler labeled the same pair twice: {doubled[:3]}"
    assert not over, f"pairs labeled beyond the overlap of {OVERLAP}: {over[:3]}"
    assert not counts, f"pairs whose cached label count disagrees with the labels: {counts[:3]}"
    # The labelers' counters (progress reads them) agree with counting their assignments.
    labelers = query(db, "SELECT l.id, l.done_count, l.open_seen_count, "
                         "(SELECT count(*) FROM labeling_assignments a WHERE a.labeler_id = l.id "
                         " AND a.status IN ('labeled', 'skipped')), "
                         "(SELECT count(*) FROM labeling_assignments a JOIN labeling_pairs p ON p.id = a.pair_id "
                         " WHERE a.labeler_id = l.id AND p.labeled_count < :overlap) "
                         "FROM labeling_labelers l", overlap=OVERLAP)
    drift = [row for row in labelers if row[1:3] != row[3:5]]
    assert not drift, f"labeler counters (id, done, open seen, then counted) that disagree: {drift[:3]}"
    # And the project's (pairs, full pairs), which every answer's header reads.
    projects = query(db, "SELECT pr.pair_count, pr.complete_count, (SELECT count(*) FROM labeling_pairs p "
                         "WHERE p.project_id = pr.id), (SELECT count(*) FROM labeling_pairs p "
                         "WHERE p.project_id = pr.id AND p.labeled_count >= :overlap) "
                         "FROM labeling_projects pr", overlap=OVERLAP)
    assert all(row[:2] == row[2:] for row in projects), f"project counters, then counted: {projects}"
    return stored


def test_20_concurrent_labelers_2000_labels_none_lost_none_duplicated(db, tmp_path):
    tokens = make_load_project(db, n_pairs=800, n_labelers=LABELERS, overlap=OVERLAP)
    with ServerProcess(db, log_path=tmp_path / "server.log") as server:
        result = asyncio.run(simulate_labelers(server.url, tokens, TOTAL, deadline_s=75, replay_fraction=0.1))
    assert not result.errors and result.server_errors == 0, (result.errors, result.server_errors)
    assert len(result.acked) >= TOTAL, f"only {len(result.acked)} labels in {result.elapsed_s:.0f}s"
    assert result.replays >= 100 and result.replays_mismatched == 0
    stored = assert_exactly_once(db, result)
    assert len(stored) == len(result.acked)  # nothing stored that was not acknowledged, nothing twice
    assert len({name for name, *_ in result.acked.values()}) == LABELERS  # all 20 really took part


def test_rankings_under_load_none_lost_none_duplicated(db, tmp_path):
    """Ranking items (4 responses each) under 10 concurrent labelers: every
    acknowledged ranking is stored once, as sent; re-sends return the same label."""
    import json

    tokens = make_load_project(db, n_pairs=200, n_labelers=10, overlap=OVERLAP, responses=4)
    with ServerProcess(db, log_path=tmp_path / "server.log") as server:
        result = asyncio.run(simulate_labelers(server.url, tokens, 400, deadline_s=60, replay_fraction=0.1))
    assert not result.errors and result.server_errors == 0, (result.errors, result.server_errors)
    assert len(result.acked) >= 400 and result.replays_mismatched == 0
    assert_exactly_once(db, result)
    assert len(result.rankings) >= 300  # the rest are skips
    stored = dict(query(db, "SELECT client_id, ranking FROM labeling_labels WHERE choice = 'rank'"))
    wrong = [cid for cid, ranking in result.rankings.items() if json.loads(stored[cid]) != list(ranking)]
    assert not wrong and len(stored) == len(result.rankings), wrong[:3]


def test_sigkill_mid_load_keeps_every_acknowledged_label(db, tmp_path):
    tokens = make_load_project(db, n_pairs=400, n_labelers=LABELERS, overlap=OVERLAP)
    server = ServerProcess(db, log_path=tmp_path / "server.log").start()
    live: dict[str, LoadResult] = {}
    going = threading.Event()

    def on_ack(result: LoadResult) -> None:
        live["result"] = result
        if len(result.acked) >= 300:
            going.set()

    worker = threading.Thread(target=lambda: asyncio.run(simulate_labelers(
        server.url, tokens, 700, deadline_s=90, replay_fraction=0.1, on_ack=on_ack)))
    worker.start()
    try:
        assert going.wait(timeout=60), "load never got going"
        server.kill()  # mid-load: requests are in flight, some committed but not yet answered
        time.sleep(0.3)
        result = live["result"]
        acked_before_restart = dict(result.acked)
        # With no server running, the database alone holds every label acknowledged so far.
        stored = db_labels(db)
        ids = labeler_ids(db)
        missing = [cid for cid, (name, label_id, _, _) in acked_before_restart.items()
                   if stored.get((ids[name], cid), (None,))[0] != label_id]
        assert not missing, f"{len(missing)} acknowledged labels lost in the crash"
        server.start()  # same port, same database: the clients' retries reach it
        worker.join(timeout=120)
        assert not worker.is_alive(), "load did not finish"
    finally:
        server.stop()
    assert not result.errors, result.errors
    assert result.retries > 0, "the kill interrupted no request"
    assert len(result.acked) >= 700 and set(acked_before_restart) <= set(result.acked)
    stored = assert_exactly_once(db, result)
    # Requests in flight at the kill were retried with their client ids: each
    # landed once, whether or not its first attempt had committed.
    assert len(stored) == len(result.acked)


def test_benchmark_script_runs_and_reports(tmp_path):
    """benchmarks/labeling_throughput.py at toy size: it runs and prints its figures."""
    import json
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "labeling_throughput.py"
    proc = subprocess.run([sys.executable, str(bench), "--labelers", "2", "--labels", "40", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["labels"] >= 40 and figures["labels_per_s"] > 0 and figures["submit_p99_ms"] > 0
    assert figures["load_generator_cpu_ms_per_label"] > 0


def test_history_benchmark_runs_and_reports():
    """benchmarks/labeling_history.py at toy size: it runs and prints its figures."""
    import json
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "labeling_history.py"
    proc = subprocess.run([sys.executable, str(bench), "--checkpoints", "5", "20", "--calls", "5", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [row["labels_done"] for row in figures["checkpoints"]] == [5, 20]
    assert all(row["progress_ms"] > 0 and row["submit_next_ms"] > 0 for row in figures["checkpoints"])
    assert figures["progress_ratio"] > 0 and figures["submit_next_ratio"] > 0


def test_lost_postgresql_connections_are_replaced_without_an_error(postgres_server, tmp_path):
    """PostgreSQL drops every connection of the server (as a restart of the
    database does): the next sign-in, label and progress read each run once
    more on a new connection (Store's _reconnecting) and the labeler sees no
    error; the label is stored once."""
    import httpx

    db = postgres_server
    project = f"lost_{time.time_ns()}"  # the session's PostgreSQL server holds other tests' projects
    tokens = make_load_project(db, n_pairs=20, n_labelers=1, overlap=1, project=project)
    headers = {"Authorization": f"Bearer {next(iter(tokens.values()))}"}
    with (ServerProcess(db, project=project, log_path=tmp_path / "server.log") as server,
          httpx.Client(base_url=server.url) as web):
        pair = web.get("/api/next", headers=headers).json()["pair"]
        for round_ in range(3):
            dropped = query(db, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                                "AND backend_type = 'client backend'")[0][0]
            assert dropped >= 1, "the server held no connection to drop"
            r = web.post("/api/labels?next=true", headers=headers,
                         json={"client_id": f"lost-connection-{round_}", "pair_id": pair["id"], "choice": "A"})
            assert r.status_code == 201, r.text
            assert r.json()["next"]["progress"]["done"] == round_ + 1
            pair = r.json()["next"]["pair"]
        assert "lost the database connection" in (tmp_path / "server.log").read_text()
    assert query(db, "SELECT count(*) FROM labeling_labels WHERE client_id LIKE 'lost-connection-%'")[0][0] == 3
