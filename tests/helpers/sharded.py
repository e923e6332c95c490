"""The SFT -> reward -> PPO chain that the sharded tests (FSDP2: tests/test_sharded_ppo.py;
ZeRO-2/3: tests/test_zero3_ppo.py) run under DDP and sharded, and the comparisons
between the runs (tolerances: see tests/test_sharded_ppo.py's docstring)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import QUICKSTART, tiny_recipe_dict, write_recipe
from helpers.distributed import torchrun


def chain(out: Path) -> dict:
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
        # fp32: these runs compare sharding step for step, at tolerances bf16's
        # rounding (precision: auto on a CPU with bf16 instructions) exceeds.
        "precision": "fp32",
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
    of -0.0108), 1e-6 absolute below. A sharding bug is a learning-rate-sized
    step: percent-level differences.

    Clip fractions count discrete events: a token whose ratio (or value) sits
    on the clip boundary within float noise flips, which moves its
    micro-batch's fraction by 1/len and the logged mean (over 2 ranks x 8
    micro-batches of one sequence in ``chain``) by 1/(16 len) <= 1/16; seen:
    0.0078, one token of 8. The losses and weights compared beside it pin the
    numerics."""
    if key.endswith("clipfrac"):
        return abs(a - b) <= 1 / 16
    scale = abs(a)
    operands = _OPERAND_SCALE.get(key)
    if isinstance(operands, float):
        scale = max(scale, operands)
    elif operands and row:
        scale = max([scale] + [abs(row[k]) for k in operands if isinstance(row.get(k), float)])
    return abs(a - b) <= 1e-4 * scale + 1e-6


def assert_logs_match(ddp: Path, other: Path, stage: str) -> None:
    """Every float ``stage`` logged in the two runs agrees step for step (``_close``),
    timings aside."""
    rows_ddp, rows_other = _rows(ddp / stage / "metrics.jsonl"), _rows(other / stage / "metrics.jsonl")
    assert len(rows_ddp) == len(rows_other) >= 2, stage
    for a, b in zip(rows_ddp, rows_other):
        for key, value in a.items():
            if isinstance(value, float) and not key.startswith("perf/") \
                    and not key.endswith(("runtime", "per_second")) and key != "time":
                assert _close(value, b[key], a, key), (stage, a.get("step"), key, value, b[key])


def assert_chain_matches(ddp: Path, other: Path) -> None:
    """``other`` (a sharded run of ``chain``) agrees with the DDP run: every
    logged float step for step, the summaries, and the final weights."""
    from safetensors.torch import load_file

    for stage in ("sft", "reward", "ppo", "ppo_lora"):
        assert_logs_match(ddp, other, stage)
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
    proc = torchrun(launcher, "run", str(tmp_path / "full.yaml"), extra_env=extra_env)
    assert proc.returncode == 0, proc.stderr[-4000:]

    crashed = torchrun(launcher, "run", str(tmp_path / "resumed.yaml"),
                        extra_env={**(extra_env or {}), "RLHF_TEST_CRASH_AFTER_SAVE": "1"})
    assert crashed.returncode != 0
    assert (runs["resumed"] / "ppo" / "checkpoints" / "step-2").is_dir()
    assert not (runs["resumed"] / "ppo" / "final").exists()
    proc = torchrun(launcher, "run", str(tmp_path / "resumed.yaml"), extra_env=extra_env)
    assert proc.returncode == 0, proc.stderr[-4000:]

    a, b = (_rows(runs[k] / "ppo" / "metrics.jsonl") for k in ("full", "resumed"))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key, value in ra.items():
            if isinstance(value, float) and not key.startswith("perf/") and key != "time":
                assert _close(value, rb[key], ra, key), (ra["step"], key, value, rb[key])
