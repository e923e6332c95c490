"""Smoke test for benchmarks/ppo_throughput.py: the quick run finishes and prints its table.

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
