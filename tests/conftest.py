"""Shared fixtures: a tiny SFT -> reward recipe and a helper to run the CLI.

The tiny recipe trains the ``tiny`` preset for a few steps on small slices of
the bundled quickstart data (absolute paths, so it runs from any directory)
and writes into ``tmp_path``; the whole chain takes a few seconds on 2 CPU
cores. Nothing here touches the network: the environment is forced offline
for this process and every subprocess.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from collections.abc import Iterator
from typing import Callable, NamedTuple

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "data" / "quickstart"

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}
# In-process tests (rlhf.cli.main, rlhf.* imports) need the same: set it before
# transformers or datasets are imported by any test module.
os.environ.update(OFFLINE_ENV)
# One torch thread: the tiny models gain nothing from more, and on a busy
# 2-core machine OpenMP threads spin against each other (3-4x slower runs).
# Subprocesses inherit it; set OMP_NUM_THREADS yourself to override.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

TINY_RECIPE = {
    "output_dir": None,  # filled in per test
    "seed": 7,
    "stages": {
        "sft": {
            "type": "sft",
            "model": "tiny",
            "data": {
                "path": str(QUICKSTART / "sft_train.jsonl"),
                "eval_path": str(QUICKSTART / "sft_test.jsonl"),
                "max_samples": 64,
                "max_eval_samples": 16,
            },
            "max_length": 64,
            "train": {"max_steps": 4, "batch_size": 8, "learning_rate": 1.0e-3, "warmup": 0.0,
                      "logging_steps": 1, "save_steps": 2, "eval_batch_size": 16},
        },
        "reward": {
            "type": "reward",
            "model": "${output_dir}/sft/final",
            "data": {
                "path": str(QUICKSTART / "prefs_train.jsonl"),
                "eval_path": str(QUICKSTART / "prefs_test.jsonl"),
                "max_samples": 64,
                "max_eval_samples": 20,
            },
            "max_length": 64,
            "train": {"max_steps": 4, "batch_size": 8, "learning_rate": 5.0e-4, "warmup": 0.0,
                      "logging_steps": 1, "save_steps": 2, "eval_batch_size": 16},
        },
    },
}


def tiny_recipe_dict(output_dir: Path, stages: tuple[str, ...] = ("sft", "reward")) -> dict:
    """A fresh copy of the tiny recipe (only ``stages``), writing to ``output_dir``."""
    cfg = copy.deepcopy(TINY_RECIPE)
    cfg["output_dir"] = str(output_dir)
    cfg["stages"] = {name: cfg["stages"][name] for name in stages}
    return cfg


def write_recipe(path: Path, cfg: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


class CliResult(NamedTuple):
    rc: int
    stdout: str
    stderr: str


def run_cli(*args: str, cwd: Path | str | None = None, timeout: float = 300) -> CliResult:
    """``python -m rlhf ARGS`` in a subprocess, offline; returns (rc, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "rlhf", *map(str, args)], cwd=cwd or REPO,
                          env={**os.environ, **OFFLINE_ENV}, capture_output=True, text=True, timeout=timeout)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def run_cli_many(arg_lists: list[list[str]], cwd: Path | str | None = None, workers: int = 3) -> list[CliResult]:
    """Several CLI subprocesses at once (each spends seconds importing torch)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda a: run_cli(*a, cwd=cwd), arg_lists))


def run_in_process(*args: str) -> int:
    """``rlhf ARGS`` in this process (no import cost); returns the exit code."""
    from rlhf.cli import main

    return main([str(a) for a in args])


@pytest.fixture
def tiny_recipe(tmp_path) -> Path:
    """The tiny SFT -> reward recipe, written to ``tmp_path/recipe.yaml``, output in ``tmp_path/out``."""
    return write_recipe(tmp_path / "recipe.yaml", tiny_recipe_dict(tmp_path / "out"))


@pytest.fixture
def make_recipe(tmp_path) -> Callable[..., Path]:
    """Factory for tiny-recipe variants: ``make_recipe(edit=fn, stages=("sft",), name="r.yaml")``.

    ``edit`` gets the recipe dict and changes it in place before it is written.
    """

    def make(edit: Callable[[dict], None] | None = None, stages: tuple[str, ...] = ("sft", "reward"),
             name: str = "recipe.yaml") -> Path:
        cfg = tiny_recipe_dict(tmp_path / "out", stages)
        if edit is not None:
            edit(cfg)
        return write_recipe(tmp_path / name, cfg)

    return make


@pytest.fixture(scope="session")
def cli() -> Callable[..., CliResult]:
    return run_cli


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """URL of a private PostgreSQL server on a loopback port, one for the session
    (helpers.labeling.temporary_postgres); the test is skipped without one."""
    from helpers.labeling import temporary_postgres

    try:
        with temporary_postgres() as url:
            yield url
    except RuntimeError as e:
        pytest.skip(f"PostgreSQL not available: {e}")
