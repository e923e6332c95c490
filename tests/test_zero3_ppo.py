"""PPO under DeepSpeed ZeRO-3 (and ZeRO-2) on two CPU processes (tests/deepspeed_cpu.py).

The ZeRO-3 twin of tests/test_sharded_ppo.py: the policy and value model
partitioned by DeepSpeed's training engine and gathered once per rollout
(GatheredParameters with the engine's hooks removed), reference and reward
models as ZeRO-3 inference engines (TRL's prepare_deepspeed), final/ gathered
from the partitions; SFT and the reward model on HF's Trainer under ZeRO-3.
Same tolerances as the FSDP2 test (see there); seen: 7e-5
relative at most (a policy loss of -0.0047), final weights within 3e-7.

Skipped unless deepspeed is importable (it is in the dev extras, so `make
test` installs it) and a C++ compiler is found: DeepSpeed JIT-builds its CPU
collective op on first use.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_recipe
from test_sharded_ppo import QUICKSTART, TESTS, _chain, _close, _rows, _torchrun

pytest.importorskip("deepspeed")
if not (shutil.which("c++") or shutil.which("g++")):
    pytest.skip("DeepSpeed JIT-builds its CPU collective op: no C++ compiler", allow_module_level=True)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "run"
    proc = _torchrun("-m", "rlhf", "run", str(write_recipe(out.parent / "ddp.yaml", _chain(out))))
    assert proc.returncode == 0, ("ddp", proc.stderr[-4000:])
    return out


@pytest.mark.parametrize("zero_stage", [3, 2])
def test_zero_chain_matches_ddp(tmp_path, ddp_run, zero_stage):
    """ZeRO-3 (partitioned weights: the gathering paths) and ZeRO-2 (replicated
    weights; the engine still owns gradient accumulation and clipping)."""
    name = f"zero{zero_stage}"
    runs = {"ddp": ddp_run, name: tmp_path / name}
    proc = _torchrun(str(TESTS / "deepspeed_cpu.py"), "run",
                     str(write_recipe(tmp_path / f"{name}.yaml", _chain(runs[name]))),
                     extra_env={"RLHF_TEST_ZERO_STAGE": str(zero_stage)})
    assert proc.returncode == 0, (name, proc.stderr[-4000:])

    from safetensors.torch import load_file

    for stage in ("sft", "reward", "ppo", "ppo_lora"):
        ddp, zero = (_rows(runs[k] / stage / "metrics.jsonl") for k in ("ddp", name))
        assert len(ddp) == len(zero) >= 2, stage
        for a, b in zip(ddp, zero):
            for key, value in a.items():
                if isinstance(value, float) and not key.startswith("perf/") \
                        and not key.endswith(("runtime", "per_second")) and key != "time":
                    assert _close(value, b[key]), (stage, a.get("step"), key, value, b[key])
        s_ddp, s_zero = (json.loads((runs[k] / stage / "metrics.json").read_text()) for k in ("ddp", name))
        assert s_zero["dist/world_size"] == 2
        for key in ("gold/sft", "gold/ppo", "kl/ppo", "eval/loss", "eval/accuracy", "eval/accuracy_before"):
            if key in s_ddp:
                assert _close(s_ddp[key], s_zero[key]), (stage, key)
        # final/ (gathered from the partitions under ZeRO-3): DDP's weights, LoRA merged.
        w_ddp, w_zero = (load_file(runs[k] / stage / "final" / "model.safetensors") for k in ("ddp", name))
        assert w_ddp.keys() == w_zero.keys() and not any("lora" in k for k in w_zero), stage
        diffs = torch.cat([(w_zero[k].float() - w_ddp[k].float()).abs().flatten() for k in w_ddp])
        assert diffs.max() < 1e-4, (stage, diffs.max())
        assert (diffs > 1e-6).float().mean() < 1e-3, (stage, (diffs > 1e-6).float().mean())
    # PPO moved the policy (so the comparison above compares trained weights).
    sft, ppo = (load_file(runs[name] / s / "final" / "model.safetensors") for s in ("sft", "ppo"))
    assert any(not ppo[k].equal(sft[k]) for k in sft)


def test_zero3_ppo_resumes_from_partitioned_checkpoint(tmp_path):
    """Crash after the step-2 checkpoint (DeepSpeed's partitioned engine
    state), resume: the same metrics as an uninterrupted run (seen: identical)."""
    stage = {
        "type": "ppo", "model": "tiny", "reward": "ppo_rewards:count_letter_e", "value_model": "policy_head",
        "data": {"path": str(QUICKSTART / "prompts_train.jsonl")},
        "steps": 4, "save_every": 2, "rollout_batch_size": 4, "num_minibatches": 2, "micro_batch_size": 2,
        "ppo_epochs": 2, "learning_rate": 1e-3, "generation": {"max_new_tokens": 8}, "sample_every": 100,
        "kl": {"adaptive": True, "target": 1.0, "horizon": 100},
    }
    launcher = str(TESTS / "deepspeed_cpu.py")
    runs = {}
    for name in ("full", "resumed"):
        runs[name] = tmp_path / name
        write_recipe(tmp_path / f"{name}.yaml", {"output_dir": str(runs[name]), "seed": 5, "stages": {"ppo": stage}})
    proc = _torchrun(launcher, "run", str(tmp_path / "full.yaml"))
    assert proc.returncode == 0, proc.stderr[-4000:]

    crashed = _torchrun(launcher, "run", str(tmp_path / "resumed.yaml"),
                        extra_env={"RLHF_TEST_CRASH_AFTER_SAVE": "1"})
    assert crashed.returncode != 0
    assert (runs["resumed"] / "ppo" / "checkpoints" / "step-2").is_dir()
    assert not (runs["resumed"] / "ppo" / "final").exists()
    proc = _torchrun(launcher, "run", str(tmp_path / "resumed.yaml"))
    assert proc.returncode == 0, proc.stderr[-4000:]

    a, b = (_rows(runs[k] / "ppo" / "metrics.jsonl") for k in ("full", "resumed"))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key, value in ra.items():
            if isinstance(value, float) and not key.startswith("perf/") and key != "time":
                assert _close(value, rb[key]), (ra["step"], key, value, rb[key])
