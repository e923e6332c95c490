"""``rlhf label serve --workers 2``: two server processes on one port and one
store (SQLite, and PostgreSQL where a local server can be started).

Many concurrent labelers on a small project with overlap 1 and a 10 s lease,
some of them holding a pair past its lease and answering late (while others
are being given the lapsed pair, through either process): no pair gets more
than one label, every acknowledged label is stored exactly once, the project's
counters match its labels, "remaining" reaches 0 for everyone, and the access
log (which names the worker pid with several workers) shows both processes
served labels. And a worker killed mid-load (SIGKILL) loses no acknowledged
label and is replaced.

Requests use a new connection each (``keepalive=False``), so that each goes to
whichever process accepts it, as separate browsers' connections would.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from helpers.labeling import LoadResult, ServerProcess, free_port, make_load_project, simulate_labelers
from test_labeling_load import db, db_labels, labeler_ids, query  # noqa: F401 - db: the SQLite/PostgreSQL fixture

LEASE_S = 10  # the shortest lease a project accepts
# An access log line with several workers: `INFO:     [PID] 127.0.0.1:PORT - "POST /api/labels?... HTTP/1.1" 201`
REQUEST_LINE = re.compile(r"\[(\d+)\] \S+ - \"(\S+ /\S*)")


def worker_pids(log: Path, request: str = "POST /api/labels") -> Counter:
    """Worker pid -> requests starting with ``request`` it answered, from the access log."""
    return Counter(m.group(1) for m in REQUEST_LINE.finditer(log.read_text(errors="replace"))
                   if m.group(2).startswith(request))


class TwoWorkers(ServerProcess):
    """``serve --workers 2 --access-log``, started once both workers answer
    (the first to start may answer alone for a second or two)."""

    def __init__(self, db: str, log: Path):
        super().__init__(db, log_path=log, extra_args=("--workers", "2", "--access-log"))

    def start(self, timeout_s: float = 60.0) -> ServerProcess:
        super().start(timeout_s)
        deadline = time.monotonic() + timeout_s
        while len(worker_pids(self.log_path, "GET /healthz")) < 2:
            assert time.monotonic() < deadline, "the second worker never answered"
            httpx.get(f"{self.url}/healthz", timeout=5)  # a new connection each: either worker takes it
            time.sleep(0.05)
        return self


def run_load(url: str, tokens: dict[str, str], total: int, seed: int, **kw) -> LoadResult:
    return asyncio.run(simulate_labelers(url, tokens, total, deadline_s=40, keepalive=False, seed=seed, **kw))


def late_label(url: str, token: str, pair_id: int) -> tuple[int, dict, str]:
    """A holder's answer, sent after its lease lapsed: (status, answer, client id)."""
    client_id = f"late-{pair_id}-{os.urandom(4).hex()}"
    resp = httpx.post(f"{url}/api/labels", headers={"Authorization": f"Bearer {token}"}, timeout=15,
                      json={"client_id": client_id, "pair_id": pair_id, "choice": "A"})
    return resp.status_code, resp.json(), client_id


def assert_consistent(db: str, n_pairs: int, acked: dict[str, tuple[str, int, int, str]]) -> None:
    """Overlap 1 held, every acknowledged label is stored once, the counters match the labels."""
    stored, ids = db_labels(db), labeler_ids(db)
    lost = [cid for cid, (name, label_id, pair, choice) in acked.items()
            if stored.get((ids[name], cid)) != (label_id, pair, choice)]
    assert not lost, f"{len(lost)} acknowledged labels missing or changed, e.g. {lost[:3]}"
    assert len(stored) == len(acked), "labels stored that were never acknowledged, or stored twice"
    over = query(db, "SELECT pair_id, count(*) FROM labeling_labels WHERE choice != 'skip' "
                     "GROUP BY pair_id HAVING count(*) > 1")
    assert not over, f"pairs labeled beyond the overlap of 1: {over[:3]}"
    doubled = query(db, "SELECT pair_id, labeler_id FROM labeling_labels GROUP BY pair_id, labeler_id "
                        "HAVING count(*) > 1")
    assert not doubled, f"a labeler labeled the same pair twice: {doubled[:3]}"
    drift = query(db, "SELECT p.id FROM labeling_pairs p WHERE p.labeled_count != (SELECT count(*) "
                      "FROM labeling_labels l WHERE l.pair_id = p.id AND l.choice != 'skip')")
    assert not drift, f"pairs whose label count disagrees with their labels: {drift[:3]}"
    open_pairs = query(db, "SELECT p.id, a.labeler_id, a.status, a.expires_at FROM labeling_pairs p LEFT JOIN "
                           "labeling_assignments a ON a.pair_id = p.id WHERE p.labeled_count < 1")
    assert not open_pairs, f"pairs left without a label (pair, labeler, status, expires): {open_pairs}"
    assert query(db, "SELECT pair_count, complete_count FROM labeling_projects") == [(n_pairs, n_pairs)]


def test_two_workers_overlap_and_late_labels_hold_across_processes(db, tmp_path):
    n_pairs, holders = 120, 4
    tokens = make_load_project(db, n_pairs=n_pairs, n_labelers=16 + holders, overlap=1, lease_seconds=LEASE_S)
    names = sorted(tokens)
    held_by, fast = {name: tokens[name] for name in names[:holders]}, {name: tokens[name] for name in names[holders:]}
    log = tmp_path / "server.log"
    with TwoWorkers(db, log) as server:
        # The holders take a pair each and go quiet past their lease.
        held = {name: httpx.get(f"{server.url}/api/next", headers={"Authorization": f"Bearer {token}"},
                                timeout=15).json()["pair"]["id"] for name, token in held_by.items()}
        leased_at = time.monotonic()
        first = run_load(server.url, fast, 10**6, seed=1, replay_fraction=0.1)
        assert not first.errors and first.server_errors == 0, (first.errors, first.server_errors)
        assert first.finished_labelers == len(fast)
        assert not query(db, f"SELECT id FROM labeling_labels WHERE pair_id IN ({','.join(map(str, held.values()))})")
        time.sleep(max(0.0, leased_at + LEASE_S + 0.5 - time.monotonic()))
        # Two holders answer while the others are being given their lapsed pairs; two after.
        racing, after = list(held)[:2], list(held)[2:]
        with ThreadPoolExecutor(len(racing)) as pool:
            races = [pool.submit(late_label, server.url, held_by[name], held[name]) for name in racing]
            # check_again: a lapsed pair one fast labeler skips goes to another even when the
            # rest were already told "nothing for you", so every lapsed pair is filled by the
            # time the late holders answer.
            second = run_load(server.url, fast, 10**6, seed=2, replay_fraction=0.1, check_again=True)
            raced = [f.result() for f in races]
        late = [late_label(server.url, held_by[name], held[name]) for name in after]
        progress = [httpx.get(f"{server.url}/api/me", headers={"Authorization": f"Bearer {token}"},
                              timeout=15).json()["progress"] for token in tokens.values()]
        for _ in range(4):  # a token in a URL stays out of the log, whichever worker answers
            assert httpx.get(f"{server.url}/?token=rlhf_secret_in_url", timeout=15).status_code == 200
    assert not second.errors and second.server_errors == 0, (second.errors, second.server_errors)
    assert len(second.acked) >= holders - len(racing), "the lapsed pairs were not handed out again"
    # Late labels on a pair someone else now holds or filled are refused; a racing one may have won.
    assert all(status == 409 and out["code"] == "pair_full" for status, out, _ in late), late
    assert all(status == 201 or (status == 409 and out["code"] == "pair_full") for status, out, _ in raced), raced
    acked = {**first.acked, **second.acked,
             **{cid: (name, out["label_id"], held[name], "A")
                for name, (status, out, cid) in zip(racing, raced) if status == 201}}
    assert_consistent(db, n_pairs, acked)
    assert all(p["remaining"] == 0 and p["project_complete"] == p["project_pairs"] == n_pairs for p in progress)
    pids = worker_pids(log)
    assert len(pids) == 2 and min(pids.values()) >= 10, f"labels answered per worker pid: {dict(pids)}"
    text = log.read_text()
    assert "rlhf_secret_in_url" not in text and text.count("GET /?token=[redacted]") == 4


def test_sigkill_of_one_worker_loses_no_acknowledged_label(db, tmp_path):
    n_pairs = 600
    tokens = make_load_project(db, n_pairs=n_pairs, n_labelers=16, overlap=1, lease_seconds=LEASE_S)
    log = tmp_path / "server.log"
    going = threading.Event()
    results: list[LoadResult] = []

    def on_ack(result: LoadResult) -> None:
        if len(result.acked) >= 150:
            going.set()

    with TwoWorkers(db, log) as server:
        load = threading.Thread(target=lambda: results.append(run_load(
            server.url, tokens, 10**6, seed=3, replay_fraction=0.1, on_ack=on_ack,
            # Every pair must end labeled (assert_consistent): a pair skipped after the
            # others were told "nothing for you now" must still find one of them.
            check_again=True)))
        load.start()
        assert going.wait(timeout=40), "load never got going"
        before = worker_pids(log, "")
        assert len(before) == 2, f"requests answered per worker pid: {dict(before)}"
        victim = before.most_common(1)[0][0]
        os.kill(int(victim), signal.SIGKILL)  # mid-load: requests are in flight on it
        load.join(timeout=60)
        assert not load.is_alive(), "load did not finish"
        # uvicorn replaces the dead worker: a third pid starts answering.
        deadline = time.monotonic() + 20
        while set(worker_pids(log, "")) <= set(before) and time.monotonic() < deadline:
            httpx.get(f"{server.url}/healthz", timeout=5)  # a new connection each: either worker takes it
            time.sleep(0.05)
        alive = server.proc.poll() is None
    assert alive, "the server stopped when one of its workers died"
    result = results[0]
    assert not result.errors and result.finished_labelers == len(tokens), (result.errors, result.finished_labelers)
    assert set(worker_pids(log, "")) - set(before), f"no worker replaced {victim}: {log.read_text()[-2000:]}"
    assert_consistent(db, n_pairs, result.acked)


# ---------------------------------------------------------------- a worker that cannot start

# `rlhf label serve --workers 2` in a subprocess, after the command's own checks
# passed, with its serve_workers call changed by SABOTAGE: the workers get a
# database that is not there, a project that is not there, or the port is taken
# meanwhile. The workers are spawned afresh, so they run the real code. A guard
# on __main__: spawned workers import the main module.
SERVE_SCRIPT = """\
import socket, sys
import rlhf.labeling.server as server
from rlhf.cli import main

def sabotaged(db, project, workers, host, port, *args, **kw):
    if SABOTAGE == "db":
        db = db + "-missing.db"
    elif SABOTAGE == "project":
        project = project._replace(id=10**6)
    elif SABOTAGE == "port":
        holder = socket.socket()
        holder.bind((host, port))
        holder.listen()
    return original(db, project, workers, host, port, *args, **kw)

if __name__ == "__main__":
    original, server.serve_workers = server.serve_workers, sabotaged
    sys.exit(main(sys.argv[1:]))
"""


def serve_sabotaged(tmp_path: Path, sabotage: str, db: str, port: int) -> subprocess.CompletedProcess:
    script = tmp_path / "serve.py"
    script.write_text(f"SABOTAGE = {sabotage!r}\n" + SERVE_SCRIPT)
    return subprocess.run([sys.executable, str(script), "label", "serve", "--db", db, "--workers", "2",
                           "--host", "127.0.0.1", "--port", str(port)],
                          capture_output=True, text=True, timeout=90, cwd=tmp_path)


def test_a_worker_that_cannot_start_stops_serve_with_one_error_line(tmp_path):
    db = f"sqlite:///{tmp_path / 'labels.db'}"
    make_load_project(db, n_pairs=4, n_labelers=1, overlap=1)
    port = free_port()
    missing = serve_sabotaged(tmp_path, "db", db, port)
    assert missing.returncode == 2, missing.stderr
    assert missing.stderr.strip().splitlines() == [
        f"error: serve: a worker process could not start: --db {db}-missing.db: no labeling database there "
        "(create one with `rlhf label pairs`)"], missing.stderr
    taken = serve_sabotaged(tmp_path, "port", db, port)
    assert taken.returncode == 2, taken.stderr
    assert taken.stderr.strip().splitlines() == [
        f"error: --host 127.0.0.1 --port {port}: cannot listen there (Address already in use); pick another port"]
    # Not the user's to fix: exit code 1, still one line and no traceback.
    broken = serve_sabotaged(tmp_path, "project", db, port)
    assert broken.returncode == 1, broken.stderr
    lines = broken.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: serve: a worker process failed to start: "), lines
    assert "Traceback" not in missing.stderr + taken.stderr + broken.stderr


def test_serve_with_workers_exits_0_when_told_to_stop(tmp_path):
    db = f"sqlite:///{tmp_path / 'labels.db'}"
    make_load_project(db, n_pairs=4, n_labelers=1, overlap=1)
    with TwoWorkers(db, tmp_path / "server.log") as server:
        pass  # SIGTERM on leaving
    assert server.proc.returncode == 0, (tmp_path / "server.log").read_text()[-2000:]
