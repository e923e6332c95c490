"""Load and crash tests against a real ``rlhf label serve`` process on 127.0.0.1.

Load: 20 concurrent labelers submit >= 2,000 labels (10% of them re-sent
with the same client id, as a client that lost the answer would); zero lost,
zero duplicated. Crash: SIGKILL the server mid-load, restart it on the same
database; every acknowledged label is there, and the clients' retries (same
client ids) did not double-count anything.

Loops are bounded by a label count and a deadline; traffic stays on loopback.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

from rlhf.labeling.testing import LoadResult, ServerProcess, make_load_project, simulate_labelers

LABELERS = 20
TOTAL = 2000
OVERLAP = 3


def db_labels(db_path: Path) -> dict[tuple[int, str], tuple[int, int, str]]:
    """(labeler id, client id) -> (label id, pair id, choice), read straight from the file."""
    with sqlite3.connect(db_path) as con:
        rows = con.execute("SELECT labeler_id, client_id, id, pair_id, choice FROM labeling_labels").fetchall()
    return {(r[0], r[1]): (r[2], r[3], r[4]) for r in rows}


def labeler_ids(db_path: Path) -> dict[str, int]:
    with sqlite3.connect(db_path) as con:
        return dict(con.execute("SELECT name, id FROM labeling_labelers").fetchall())


def assert_exactly_once(db_path: Path, result: LoadResult) -> dict:
    """Every acknowledged label is stored with its id, pair and choice; nothing stored twice."""
    stored = db_labels(db_path)
    ids = labeler_ids(db_path)
    lost = [cid for cid, (name, label_id, pair, choice) in result.acked.items()
            if stored.get((ids[name], cid)) != (label_id, pair, choice)]
    assert not lost, f"{len(lost)} acknowledged labels missing or changed, e.g. {lost[:3]}"
    with sqlite3.connect(db_path) as con:
        doubled = con.execute("SELECT pair_id, labeler_id, count(*) FROM labeling_labels "
                              "GROUP BY pair_id, labeler_id HAVING count(*) > 1").fetchall()
        over = con.execute("SELECT pair_id, count(*) FROM labeling_labels WHERE choice != 'skip' "
                           "GROUP BY pair_id HAVING count(*) > ?", (OVERLAP,)).fetchall()
        counts = con.execute("SELECT p.id FROM labeling_pairs p WHERE p.labeled_count != (SELECT count(*) "
                             "FROM labeling_labels l WHERE l.pair_id = p.id AND l.choice != 'skip')").fetchall()
    assert not doubled, f"a labeler labeled the same pair twice: {doubled[:3]}"
    assert not over, f"pairs labeled beyond the overlap of {OVERLAP}: {over[:3]}"
    assert not counts, f"pairs whose cached label count disagrees with the labels: {counts[:3]}"
    return stored


def test_20_concurrent_labelers_2000_labels_none_lost_none_duplicated(tmp_path):
    db_path = tmp_path / "load.db"
    db = f"sqlite:///{db_path}"
    tokens = make_load_project(db, n_pairs=800, n_labelers=LABELERS, overlap=OVERLAP)
    with ServerProcess(db, log_path=tmp_path / "server.log") as server:
        result = asyncio.run(simulate_labelers(server.url, tokens, TOTAL, deadline_s=75, replay_fraction=0.1))
    assert not result.errors and result.server_errors == 0, (result.errors, result.server_errors)
    assert len(result.acked) >= TOTAL, f"only {len(result.acked)} labels in {result.elapsed_s:.0f}s"
    assert result.replays >= 100 and result.replays_mismatched == 0
    stored = assert_exactly_once(db_path, result)
    assert len(stored) == len(result.acked)  # nothing stored that was not acknowledged, nothing twice
    assert len({name for name, *_ in result.acked.values()}) == LABELERS  # all 20 really took part


def test_sigkill_mid_load_keeps_every_acknowledged_label(tmp_path):
    db_path = tmp_path / "crash.db"
    db = f"sqlite:///{db_path}"
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
        # With no server running, the file alone holds every label acknowledged so far.
        stored = db_labels(db_path)
        ids = labeler_ids(db_path)
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
    stored = assert_exactly_once(db_path, result)
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
