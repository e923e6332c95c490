"""Labeling server throughput: labels/s and submit latency (p50/p99).

Starts ``rlhf label serve`` as a subprocess on 127.0.0.1 over a fresh
database, then drives it with N concurrent simulated labelers (closed loop:
each submits its next label as soon as the last is acknowledged, with the
next pair handed back in the same response, as the web page does). Every
label is committed durably (SQLite WAL, ``synchronous=FULL``) before it is
acknowledged. The load generator runs on the same machine, so on a 2-core
box it competes with the server for CPU: the figure is a floor. Its client
(aiohttp) costs about 0.2 ms of CPU per request, printed as
``load_generator_cpu_ms_per_label``; the server's CPU per label (its worker
processes included) and with ``--postgres`` PostgreSQL's (all its processes)
are printed beside it: with SQLite the database's work is in the server's.

    python benchmarks/labeling_throughput.py                  # SQLite, 20 labelers, 3000 labels
    python benchmarks/labeling_throughput.py --postgres       # a throwaway local PostgreSQL instead
    python benchmarks/labeling_throughput.py --labelers 50 --labels 5000 --json
    python benchmarks/labeling_throughput.py --pairs 50000    # a large project (per-label cost must not grow)
    python benchmarks/labeling_throughput.py --workers 2 --new-connections   # two server processes
    python benchmarks/labeling_throughput.py --responses 4    # ranking items of 4 responses each

With ``--workers N`` the labelers' connections are shared out by the kernel
and uvicorn as they are opened, and a connection stays with the process that
accepted it: the default keep-alive pool, opened in one burst, can all land on
one process. ``--new-connections`` opens a connection per request (as the
browsers of labelers who pause for more than uvicorn's 5 s keep-alive do), so
the requests spread over the processes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

# The load generator and server harness are test helpers (tests/helpers/labeling.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers.labeling import (ServerProcess, make_load_project, percentile,  # noqa: E402
                              simulate_labelers, temporary_postgres)
from rlhf.labeling.schema import MAX_RANKED  # noqa: E402


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid``, of its children that
    have ended, and of those still running (PostgreSQL starts a process per
    connection; uvicorn one per worker). psutil: installed with accelerate."""
    import psutil

    proc = psutil.Process(pid)
    t = proc.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            c = child.cpu_times()
            total += c.user + c.system
    return total


def postmaster_pid(url: str) -> int:
    """The pid of the (local) PostgreSQL server at ``url``, from its data directory."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.connect() as conn:
        data_dir = conn.execute(text("SELECT setting FROM pg_settings WHERE name = 'data_directory'")).scalar_one()
    engine.dispose()
    return int((Path(data_dir) / "postmaster.pid").read_text().split()[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labelers", type=int, default=20, help="concurrent simulated labelers (default 20)")
    p.add_argument("--labels", type=int, default=3000, help="labels to submit in total (default 3000)")
    p.add_argument("--overlap", type=int, default=3, help="labelers per pair (default 3)")
    p.add_argument("--pairs", type=int, default=None,
                   help="pairs in the project (default: just enough for --labels; at least that many)")
    p.add_argument("--responses", type=int, default=2,
                   help="responses per item: 2, A/B pairs (default); K >= 3, ranking items the labelers order")
    p.add_argument("--postgres", action="store_true", help="use a temporary local PostgreSQL, not SQLite")
    p.add_argument("--workers", type=int, default=1, help="server processes (rlhf label serve --workers; default 1)")
    p.add_argument("--new-connections", action="store_true",
                   help="a new connection per request instead of a keep-alive pool (spreads requests over workers)")
    p.add_argument("--deadline", type=float, default=300, help="stop after this many seconds (default 300)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.add_argument("--threads", type=int, default=1,
                   help="OMP/MKL threads for the server process and this one (default 1; no torch work here)")
    args = p.parse_args()
    if args.threads < 1:
        p.error(f"--threads {args.threads}: expected a positive integer")
    if args.workers < 1:
        p.error(f"--workers {args.workers}: expected a positive integer")
    if not 2 <= args.responses <= MAX_RANKED:
        p.error(f"--responses {args.responses}: expected 2 to {MAX_RANKED}")
    # The server subprocess inherits these; set before anything could start an OpenMP pool.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    # Enough open slots to never run dry: each pair takes min(overlap, labelers) labels, plus warm-up.
    n_pairs = (args.labels + args.labelers * 5) // min(args.overlap, args.labelers) + args.labelers * 10
    if args.pairs is not None:
        if args.pairs < n_pairs:
            p.error(f"--pairs {args.pairs}: expected at least {n_pairs} for {args.labels} labels")
        n_pairs = args.pairs

    with tempfile.TemporaryDirectory(prefix="rlhf-bench-") as tmp, contextlib.ExitStack() as stack:
        db = stack.enter_context(temporary_postgres()) if args.postgres else f"sqlite:///{Path(tmp) / 'bench.db'}"
        tokens = make_load_project(db, n_pairs=n_pairs, n_labelers=args.labelers, overlap=args.overlap,
                                   responses=args.responses)
        with ServerProcess(db, log_path=Path(tmp) / "server.log",
                           extra_args=("--workers", str(args.workers))) as server:
            # Warm-up: imports, connection pools, SQLite page cache.
            asyncio.run(simulate_labelers(server.url, tokens, args.labelers * 5, replay_fraction=0, seed=1,
                                          keepalive=not args.new_connections))
            processes = {"server": server.proc.pid, **({"postgres": postmaster_pid(db)} if args.postgres else {})}
            cpu0, tree0 = os.times(), {name: tree_cpu_s(pid) for name, pid in processes.items()}
            r = asyncio.run(simulate_labelers(server.url, tokens, args.labels, deadline_s=args.deadline,
                                              replay_fraction=0.0, skip_fraction=0.05, seed=2,
                                              keepalive=not args.new_connections))
            cpu1, tree1 = os.times(), {name: tree_cpu_s(pid) for name, pid in processes.items()}
    if r.errors or r.server_errors or len(r.acked) < args.labels:
        raise SystemExit(f"incomplete run: {len(r.acked)} of {args.labels} labels, {r.server_errors} server "
                         f"errors, other errors: {dict(r.errors)}")
    ms = lambda xs, q: round(1000 * percentile(xs, q), 1)  # noqa: E731
    figures = {
        "store": "postgresql" if args.postgres else "sqlite (WAL, synchronous=FULL)",
        "labelers": args.labelers,
        "workers": args.workers,
        "connections": "new per request" if args.new_connections else "keep-alive",
        "pairs": n_pairs,
        "responses_per_item": args.responses,
        "labels": len(r.acked),
        "seconds": round(r.elapsed_s, 2),
        "labels_per_s": round(r.labels_per_s, 1),
        "submit_p50_ms": ms(r.submit_latency_s, 50),
        "submit_p99_ms": ms(r.submit_latency_s, 99),
        "load_generator_cpu_ms_per_label": round(1000 * (cpu1.user + cpu1.system - cpu0.user - cpu0.system)
                                                 / len(r.acked), 2),
        **{f"{name}_cpu_ms_per_label": round(1000 * (tree1[name] - tree0[name]) / len(r.acked), 2)
           for name in processes},
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "threads": args.threads,
    }
    if args.json:
        print(json.dumps(figures))
        return
    print(f"store:          {figures['store']}")
    print(f"machine:        {figures['cpu_cores']} CPU cores, Python {figures['python']} "
          "(server and load generator share them)")
    print(f"labelers:       {args.labelers} concurrent, closed loop")
    print(f"server:         {args.workers} worker process{'es' if args.workers > 1 else ''}, "
          f"{figures['connections']} connections")
    print(f"items:          {n_pairs} in the project, "
          + ("A/B pairs" if args.responses == 2 else f"rankings of {args.responses} responses"))
    print(f"threads:        {args.threads} (OMP_NUM_THREADS for server and load generator)")
    print(f"labels:         {figures['labels']} in {figures['seconds']} s")
    print(f"throughput:     {figures['labels_per_s']} labels/s")
    print(f"submit latency: p50 {figures['submit_p50_ms']} ms, p99 {figures['submit_p99_ms']} ms "
          "(includes queueing behind the other labelers)")
    print(f"load generator: {figures['load_generator_cpu_ms_per_label']} ms of CPU per label "
          "(taken from the server's cores)")
    print(f"server:         {figures['server_cpu_ms_per_label']} ms of CPU per label"
          + (f"; PostgreSQL {figures['postgres_cpu_ms_per_label']} ms" if args.postgres else ""))


if __name__ == "__main__":
    main()
