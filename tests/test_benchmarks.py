"""Smoke tests for the benchmarks: they finish and print their tables (ppo_throughput is slow-marked).

No timing is asserted: the figures depend on the machine and on its load.
The quick run takes about a minute on 2 CPU cores (more when they are busy),
hence the slow marker: ``pytest -m slow tests/test_benchmarks.py``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "ppo_throughput.py"


@pytest.mark.slow
def test_ppo_throughput_quick_prints_its_table(tmp_path):
    out = tmp_path / "quick.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for text in ("PPO throughput benchmark (quick run)", "CPU cores", "OVERHEAD RATIO", "samples/s",
                 "peak RSS", "memory, LoRA", "RLOOTrainer"):
        assert text in proc.stdout, text
    results = json.loads(out.read_text())["results"]
    ppo = results["ppo/tiny"]
    assert ppo["measured_steps"] >= 1 and ppo["overhead_ratio_cpu"] > 0 and ppo["peak_rss_mb"] > 0
    assert {"ppo-lora/tiny", "sft-lora/tiny", "rloo/tiny"} <= set(results)
    # TRL either ran or the table says why it could not.
    assert "samples_per_s" in results["rloo/tiny"] or "could not run" in proc.stdout


def test_sharded_generation_benchmark_runs_and_counts_gathers():
    """Tiny settings (about 15 s): the table prints; full_weights gathers once per unit, per_token per token."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sharded_generation.py"), "--preset", "tiny",
                           "--batch", "2", "--new-tokens", "6", "--repeats", "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "RATIO per_token / full_weights" in proc.stdout
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["world"] == 2 and r["unsharded_all_gathers"] == 0
    assert r["per_token_all_gathers"] >= 6 * r["full_weights_all_gathers"] > 0
