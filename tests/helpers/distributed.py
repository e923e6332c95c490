"""Launching test runs under ``torchrun``: two local processes on a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from conftest import OFFLINE_ENV, REPO

TESTS = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a rendezvous, not a fixed one another job may hold."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, *args: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 SCRIPT ARGS`` (SCRIPT may be ``-m``, ``rlhf``), offline,
    one thread per process, with tests/ on the path (reward functions, launchers)."""
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1", **(extra_env or {}),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         script, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
