"""PPO with sharded weights: FSDP2 on two CPU processes (tests/fsdp_cpu.py).

Accelerate refuses FSDP on CPU, so these tests switch it on through a small
launcher; the code under test is the same as on GPUs: the policy, value,
reference and reward models sharded per transformer block, weights gathered
once per rollout for generation (``rlhf.sharding.full_weights``), the final
checkpoint gathered from the shards.

Tolerance against the DDP run: every logged loss, score and KL within 1e-4
relative (1e-6 absolute). Both runs sample from the same full weights with the
same seeds and average the same gradients; FSDP reduce-scatters where DDP
all-reduces, so the numbers agree up to float32 summation order. Final
weights: all within 1e-4 and fewer than 0.1% of them off by more than 1e-6.
Adam divides each gradient by its own running scale, so an element whose
gradient is ~0 moves by up to the learning rate on float noise (seen: 170 of
692k reward-model weights, at most 5e-5 apart). A sharding bug moves most
weights by a learning-rate-sized step (seen: an untied LM head, 3% loss gap).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import OFFLINE_ENV, QUICKSTART, REPO, tiny_recipe_dict, write_recipe

TESTS = Path(__file__).resolve().parent


def _torchrun(script: str, *args: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1", **(extra_env or {}),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    with socket.socket() as s:  # a free port for the rendezvous, not a fixed one another job may hold
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         script, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_generation_gathers_weights_once_not_per_token(tmp_path):
    proc = _torchrun(str(TESTS / "fsdp_generation_check.py"), str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["world"] == 2 and r["units"] >= 3  # root + one unit per transformer block
        # Plain FSDP2 all-gathers inside every forward, i.e. for every new token ...
        assert r["reference_plain"]["gathers_while_generating"] >= 12
        # ... full_weights gathers on entry and generates with no collective at all.
        for name in ("reference_full_weights", "policy_full_weights"):
            assert r[name]["gathers_while_generating"] == 0, name
            assert r[name]["gathers_at_entry"] >= 1, name
        for name in ("reference_plain", "reference_full_weights", "policy_full_weights"):
            assert r[name]["same_tokens"], name  # greedy tokens == the unsharded model's


def _chain(out: Path) -> dict:
    """SFT -> reward -> PPO (full fine-tuning) and PPO (LoRA) on the tiny preset."""
    cfg = tiny_recipe_dict(out)
    cfg["seed"] = 11
    for name in ("sft", "reward"):
        cfg["stages"][name]["train"].update(max_steps=2, batch_size=4, save_steps=100)
    common = {
        "type": "ppo", "model": "${output_dir}/sft/final", "reward": "${output_dir}/reward/final",
        "data": {"path": str(QUICKSTART / "prompts_train.jsonl")},
        "steps": 2, "rollout_batch_size": 4, "num_minibatches": 2, "micro_batch_size": 1, "ppo_epochs": 2,
        "learning_rate": 1e-3, "generation": {"max_new_tokens": 8}, "sample_every": 100,
        "eval": {"prompts": str(QUICKSTART / "prompts_test.jsonl"), "gold": "rlhf.gold:vader_sentiment",
                 "max_prompts": 7, "batch_size": 2},  # 7: the ranks get unequal shares
    }
    # Full fine-tuning: separate reference, value model from the reward model, all sharded.
    cfg["stages"]["ppo"] = dict(common)
    # LoRA: the reference is the policy with adapters off; value head on the policy.
    cfg["stages"]["ppo_lora"] = dict(common, model={"name": "${output_dir}/sft/final", "lora": {"r": 4, "alpha": 8}},
                                     value_model="policy_head")
    return cfg


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


# Quantities whose float32 rounding error scales with their operands, not with
# their own value: a mean difference or a loss over unit-scale terms can be
# near zero while every term is O(1). Key -> keys of the same row giving the
# operands' magnitude (or a number: whitened advantages have unit scale).
_OPERAND_SCALE: dict[str, tuple | float] = {
    "train/margin": ("train/min_reward", "train/max_reward"),  # r_chosen - r_rejected
    "eval/margin": ("eval/min_reward", "eval/max_reward"),
    "ppo/policy_loss": 1.0,  # -mean(A * ratio), A whitened
}


def _close(a: float, b: float, row: dict | None = None, key: str = "") -> bool:
    """Equal up to float32 summation order: 1e-4 relative to the quantity's
    scale (seen: 7e-5 on a policy loss of -0.0047, 1.5e-4 of a reward margin
    of -0.0108 = 1.6e-6 absolute on rewards of ~0.1), 1e-6 absolute below.
    A sharding bug is a learning-rate-sized step: percent-level differences."""
    scale = abs(a)
    operands = _OPERAND_SCALE.get(key)
    if isinstance(operands, float):
        scale = max(scale, operands)
    elif operands and row:
        scale = max([scale] + [abs(row[k]) for k in operands if isinstance(row.get(k), float)])
    return abs(a - b) <= 1e-4 * scale + 1e-6


def assert_chain_matches(ddp: Path, other: Path) -> None:
    """``other`` (a sharded run of ``_chain``) agrees with the DDP run: every
    logged float step for step, the summaries, and the final weights."""
    from safetensors.torch import load_file

    for stage in ("sft", "reward", "ppo", "ppo_lora"):
        rows_ddp, rows_other = _rows(ddp / stage / "metrics.jsonl"), _rows(other / stage / "metrics.jsonl")
        assert len(rows_ddp) == len(rows_other) >= 2, stage
        for a, b in zip(rows_ddp, rows_other):
            for key, value in a.items():
                if isinstance(value, float) and not key.startswith("perf/") \
                        and not key.endswith(("runtime", "per_second")) and key != "time":
                    assert _close(value, b[key], a, key), (stage, a.get("step"), key, value, b[key])
        s_ddp, s_other = (json.loads((d / stage / "metrics.json").read_text()) for d in (ddp, other))
        assert s_other["dist/world_size"] == 2
        for key in ("gold/sft", "gold/ppo", "kl/ppo", "eval/loss", "eval/accuracy", "eval/accuracy_before"):
            if key in s_ddp:
                assert _close(s_ddp[key], s_other[key]), (stage, key)
        # final/ gathered from the shards: the same weights as DDP's, LoRA merged.
        w_ddp, w_other = (load_file(d / stage / "final" / "model.safetensors") for d in (ddp, other))
        assert w_ddp.keys() == w_other.keys() and not any("lora" in k for k in w_other), stage
        diffs = torch.cat([(w_other[k].float() - w_ddp[k].float()).abs().flatten() for k in w_ddp])
        assert diffs.max() < 1e-4, (stage, diffs.max())
        assert (diffs > 1e-6).float().mean() < 1e-3, (stage, (diffs > 1e-6).float().mean())
    # PPO moved the policy (so the comparison above compares trained weights).
    sft, ppo = (load_file(other / s / "final" / "model.safetensors") for s in ("sft", "ppo"))
    assert any(not ppo[k].equal(sft[k]) for k in sft)


def test_fsdp2_chain_matches_ddp_step_for_step(tmp_path):
    runs = {}
    for name, launch in (("ddp", ("-m", "rlhf")), ("fsdp", (str(TESTS / "fsdp_cpu.py"),))):
        runs[name] = tmp_path / name
        proc = _torchrun(*launch, "run", str(write_recipe(tmp_path / f"{name}.yaml", _chain(runs[name]))))
        assert proc.returncode == 0, (name, proc.stderr[-4000:])
    assert_chain_matches(runs["ddp"], runs["fsdp"])


def check_ppo_resume(tmp_path: Path, launcher: str, extra_env: dict | None = None) -> None:
    """Crash after the step-2 checkpoint, resume: the same metrics as an uninterrupted run."""
    stage = {
        "type": "ppo", "model": "tiny", "reward": "ppo_rewards:count_letter_e", "value_model": "policy_head",
        "data": {"path": str(QUICKSTART / "prompts_train.jsonl")},
        "steps": 4, "save_every": 2, "rollout_batch_size": 4, "num_minibatches": 2, "micro_batch_size": 2,
        "ppo_epochs": 2, "learning_rate": 1e-3, "generation": {"max_new_tokens": 8}, "sample_every": 100,
        "kl": {"adaptive": True, "target": 1.0, "horizon": 100},
    }
    runs = {}
    for name in ("full", "resumed"):
        runs[name] = tmp_path / name
        write_recipe(tmp_path / f"{name}.yaml", {"output_dir": str(runs[name]), "seed": 5, "stages": {"ppo": stage}})
    proc = _torchrun(launcher, "run", str(tmp_path / "full.yaml"), extra_env=extra_env)
    assert proc.returncode == 0, proc.stderr[-4000:]

    crashed = _torchrun(launcher, "run", str(tmp_path / "resumed.yaml"),
                        extra_env={**(extra_env or {}), "RLHF_TEST_CRASH_AFTER_SAVE": "1"})
    assert crashed.returncode != 0
    assert (runs["resumed"] / "ppo" / "checkpoints" / "step-2").is_dir()
    assert not (runs["resumed"] / "ppo" / "final").exists()
    proc = _torchrun(launcher, "run", str(tmp_path / "resumed.yaml"), extra_env=extra_env)
    assert proc.returncode == 0, proc.stderr[-4000:]

    a, b = (_rows(runs[k] / "ppo" / "metrics.jsonl") for k in ("full", "resumed"))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key, value in ra.items():
            if isinstance(value, float) and not key.startswith("perf/") and key != "time":
                assert _close(value, rb[key], ra, key), (ra["step"], key, value, rb[key])


def test_fsdp2_ppo_resumes_from_sharded_checkpoint(tmp_path):
    check_ppo_resume(tmp_path, str(TESTS / "fsdp_cpu.py"))
