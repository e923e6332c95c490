"""Labeling test and benchmark helpers: a server subprocess, a throwaway
PostgreSQL, and simulated labelers (used by tests/ and
benchmarks/labeling_throughput.py; kept out of the package: they start
servers and need the dev-only httpx and aiohttp).

Everything here talks to 127.0.0.1 only, and every loop is bounded by a
label count and a deadline, so a load run always stops by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class ServerProcess:
    """``rlhf label serve`` in a subprocess on 127.0.0.1, for tests that need
    a real server (load, crash, browser)."""

    def __init__(self, db: str, project: str | None = None, port: int | None = None,
                 log_path: Path | None = None, extra_args: tuple[str, ...] = ()):
        self.db, self.project = db, project
        self.port = port or free_port()
        self.log_path = log_path
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, timeout_s: float = 60.0) -> ServerProcess:
        cmd = [sys.executable, "-m", "rlhf", "label", "serve", "--db", self.db, "--host", LOOPBACK,
               "--port", str(self.port), *self.extra_args]
        if self.project:
            cmd += ["--project", self.project]
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            # Its own process group: with --workers N, kill() reaches the worker processes too.
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            if self.log_path:
                out.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = Path(self.log_path).read_text() if self.log_path else ""
                raise RuntimeError(f"server exited with code {self.proc.returncode}: {log[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not answer on {self.url} within {timeout_s}s")

    def kill(self) -> None:
        """SIGKILL to the server and its worker processes: no shutdown handlers
        run, as in a power cut."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> ServerProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------- PostgreSQL


def postgres_bin_dir() -> Path | None:
    """Debian keeps initdb/pg_ctl in /usr/lib/postgresql/<version>/bin, off PATH."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


@contextlib.contextmanager
def temporary_postgres(timeout_s: float = 60.0) -> Iterator[str]:
    """Start a private PostgreSQL cluster on a loopback port; yield its URL.

    initdb in a temporary directory, trust auth on 127.0.0.1 only, stopped
    and deleted afterwards. PostgreSQL refuses to run as root, so as root the
    server runs as the ``postgres`` system user (created by Debian's package)
    or ``nobody``. Raises RuntimeError when PostgreSQL is not installed.
    """
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")
    run_as: dict = {}
    base = Path(tempfile.mkdtemp(prefix="rlhf-pg-"))
    if os.geteuid() == 0:
        import pwd

        user = next((u for u in ("postgres", "nobody") if _has_user(u)), None)
        if user is None:
            raise RuntimeError("running as root and no 'postgres' or 'nobody' user to run PostgreSQL as")
        pw = pwd.getpwnam(user)
        os.chown(base, pw.pw_uid, pw.pw_gid)
        run_as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": [], "cwd": str(base)}
    data, port = base / "data", free_port()
    try:
        subprocess.run([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True, timeout=timeout_s, **run_as)
        subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(base / "server.log"), "-w",
                        "-t", str(int(timeout_s)), "-o",
                        f"-p {port} -k {base} -c listen_addresses={LOOPBACK} -c max_connections=100",
                        "start"], check=True, capture_output=True, timeout=timeout_s + 5, **run_as)
        try:
            yield f"postgresql://postgres@{LOOPBACK}:{port}/postgres"
        finally:
            subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=timeout_s, **run_as)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"PostgreSQL failed to start: {e.stderr.decode(errors='replace')[-1000:]}") from None
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _has_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


# ---------------------------------------------------------------- simulated labelers


@dataclass
class LoadResult:
    """What the simulated labelers saw."""

    # client_id -> (labeler, label_id, pair_id, choice) of every acknowledged label
    acked: dict[str, tuple[str, int, int, str]] = field(default_factory=dict)
    # client_id -> the ranking sent, for each acknowledged ranking (choice "rank")
    rankings: dict[str, tuple[int, ...]] = field(default_factory=dict)
    submit_latency_s: list[float] = field(default_factory=list)  # first successful POST of each label
    next_latency_s: list[float] = field(default_factory=list)
    replays: int = 0  # deliberate re-sends of an acknowledged label
    replays_mismatched: int = 0  # re-sends that did not return the same label id
    retries: int = 0  # re-sends after a connection error or 5xx
    server_errors: int = 0  # 5xx answers (each was retried)
    errors: Counter = field(default_factory=Counter)  # unexpected HTTP statuses
    finished_labelers: int = 0  # labelers told "no more pairs"
    elapsed_s: float = 0.0

    @property
    def labels_per_s(self) -> float:
        return len(self.acked) / self.elapsed_s if self.elapsed_s else 0.0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, int(round(q / 100 * len(ordered) + 0.5)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class _Reply:
    status_code: int
    text: str

    def json(self):
        return json.loads(self.text)


async def _labeler(client: aiohttp.ClientSession, name: str, token: str, result: LoadResult, total: int,
                   deadline: float, rng: random.Random, replay_fraction: float, skip_fraction: float,
                   on_ack: Callable[[LoadResult], None] | None, check_again: bool = False) -> None:
    headers = {"Authorization": f"Bearer {token}"}

    def finished(answer: dict) -> bool:
        """No pair for this labeler now: done, unless ``check_again`` and the project
        is not complete (pairs held by others come back if they skip or let go), in
        which case the labeler checks again shortly, as the page's "All done" view asks."""
        progress = answer.get("progress") or {}
        if check_again and progress.get("project_complete", 0) < progress.get("project_pairs", 0):
            return False
        result.finished_labelers += 1
        return True

    async def call(method: str, path: str, body: dict | None = None) -> _Reply | None:
        """One request, re-sent unchanged on connection errors and 5xx until the deadline."""
        while time.monotonic() < deadline:
            try:
                async with client.request(method, path, json=body, headers=headers) as resp:
                    reply = _Reply(resp.status, await resp.text())
                if reply.status_code < 500:
                    return reply
                result.server_errors += 1
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass  # server down (crash test) or connection reset: retry the same request
            result.retries += 1
            await asyncio.sleep(0.05 + 0.1 * rng.random())
        return None

    pair = None  # the next pair, when the last submission brought it along
    while len(result.acked) < total and time.monotonic() < deadline:
        if pair is None:
            t0 = time.perf_counter()
            resp = await call("GET", "/api/next")
            if resp is None:
                return
            if resp.status_code != 200:
                result.errors[f"GET /api/next {resp.status_code}"] += 1
                return
            result.next_latency_s.append(time.perf_counter() - t0)
            pair = resp.json()["pair"]
            if pair is None:
                if finished(resp.json()):
                    return
                await asyncio.sleep(0.1 + 0.1 * rng.random())
                continue
        body = {"client_id": uuid.uuid4().hex, "pair_id": pair["id"],
                "reason": f"simulated {name}", "duration_ms": rng.randint(500, 20000)}
        if rng.random() < skip_fraction:
            body["choice"] = "skip"
        elif pair.get("responses"):  # a ranking item: order its K responses, best first
            order = list(range(len(pair["responses"])))
            rng.shuffle(order)
            body.update(choice="rank", ranking=order)
        else:
            body["choice"] = rng.choice(("A", "A", "B", "B", "tie"))
        choice = body["choice"]
        t0 = time.perf_counter()
        resp = await call("POST", "/api/labels?next=true", body)
        if resp is None:
            return
        if resp.status_code not in (200, 201):
            result.errors[f"POST /api/labels {resp.status_code}: {resp.text[:200]}"] += 1
            pair = None
            continue
        result.submit_latency_s.append(time.perf_counter() - t0)
        out = resp.json()
        result.acked[body["client_id"]] = (name, out["label_id"], pair["id"], choice)
        if choice == "rank":
            result.rankings[body["client_id"]] = tuple(body["ranking"])
        if on_ack:
            on_ack(result)
        if rng.random() < replay_fraction:
            # A client that lost the first answer re-sends: it must get the same label back.
            again = await call("POST", "/api/labels?next=true", body)
            result.replays += 1
            if again is None or again.status_code != 200 or again.json().get("label_id") != out["label_id"]:
                result.replays_mismatched += 1
            else:
                # The latest answer's next pair, as that client would have: the re-send may have been given
                # a pair freed since the first answer (which said there was none); dropping it would leave
                # that pair leased to a labeler who has gone.
                out = again.json()
        pair = out["next"]["pair"]
        if pair is None and finished(out["next"]):
            return


async def simulate_labelers(url: str, tokens: dict[str, str], total_labels: int, deadline_s: float = 60.0,
                            replay_fraction: float = 0.1, skip_fraction: float = 0.05, seed: int = 0,
                            on_ack: Callable[[LoadResult], None] | None = None,
                            keepalive: bool = True, check_again: bool = False) -> LoadResult:
    """Run one concurrent client per token until ``total_labels`` labels are
    acknowledged, every labeler runs out of pairs, or the deadline passes.
    ``keepalive=False``: a new connection per request, so that with several
    server processes each request goes to whichever one accepts it. ``check_again``:
    a labeler told there is nothing for them keeps checking while the project is
    incomplete (until the deadline), so a pair that others skip late still finds
    a labeler."""
    result = LoadResult()
    deadline = time.monotonic() + deadline_s
    # aiohttp, not httpx (which the other tests use): the load generator shares the
    # server's CPU, and httpx spent 1-2 ms of it per request, as much as the server
    # did per label; its busy event loop then made up most of the measured tail
    # latency. aiohttp spends about 0.2 ms.
    connector = aiohttp.TCPConnector(limit=len(tokens) * 2, force_close=not keepalive)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=15.0)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(
            _labeler(client, name, token, result, total_labels, deadline, random.Random(f"{seed}:{name}"),
                     replay_fraction, skip_fraction, on_ack, check_again)
            for name, token in tokens.items()))
        result.elapsed_s = time.perf_counter() - t0
    return result


def make_load_project(db: str, n_pairs: int, n_labelers: int, overlap: int, project: str = "load",
                      lease_seconds: int = 900, responses: int = 2) -> dict[str, str]:
    """A project with synthetic items and labelers; returns labeler name -> token.
    ``responses``: 2, A/B pairs; K >= 3, ranking items of K responses each."""
    from rlhf.labeling.config import ProjectConfig
    from rlhf.labeling.store import NewPair, Store, new_ranking

    def item(i: int) -> NewPair:
        prompt = f"Prompt {i}: review film #{i}"
        if responses > 2:
            return new_ranking(prompt, [f"Response {i} #{j}\nline two" for j in range(responses)],
                               [f"model-{j}" for j in range(responses)])
        return NewPair(prompt, f"Response {i} A\nline two", f"Response {i} B <b>bold?</b>", "model-a", "model-b")

    with Store.open(db, create=True) as store:
        proj = store.create_project(project, ProjectConfig(overlap=overlap, lease_seconds=lease_seconds))
        store.add_pairs(proj, [item(i) for i in range(n_pairs)])
        tokens = {}
        for j in range(n_labelers):
            token = f"rlhf_load_{uuid.uuid4().hex}"
            store.add_labeler(proj, f"labeler{j:02d}", token)
            tokens[f"labeler{j:02d}"] = token
    return tokens
