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

import shutil
from pathlib import Path

import pytest
from conftest import write_recipe
from helpers.distributed import TESTS, torchrun
from helpers.sharded import assert_chain_matches, chain, check_ppo_resume

pytest.importorskip("deepspeed")
if not (shutil.which("c++") or shutil.which("g++")):
    pytest.skip("DeepSpeed JIT-builds its CPU collective op: no C++ compiler", allow_module_level=True)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "run"
    proc = torchrun("-m", "rlhf", "run", str(write_recipe(out.parent / "ddp.yaml", chain(out))))
    assert proc.returncode == 0, ("ddp", proc.stderr[-4000:])
    return out


@pytest.mark.parametrize("zero_stage", [3, 2])
def test_zero_chain_matches_ddp(tmp_path, ddp_run, zero_stage):
    """ZeRO-3 (partitioned weights: the gathering paths) and ZeRO-2 (replicated
    weights; the engine still owns gradient accumulation and clipping)."""
    out = tmp_path / f"zero{zero_stage}"
    proc = torchrun(str(TESTS / "deepspeed_cpu.py"), "run", str(write_recipe(tmp_path / "zero.yaml", chain(out))),
                     extra_env={"RLHF_TEST_ZERO_STAGE": str(zero_stage)})
    assert proc.returncode == 0, (zero_stage, proc.stderr[-4000:])
    assert_chain_matches(ddp_run, out)


def test_zero3_ppo_resumes_from_partitioned_checkpoint(tmp_path):
    """DeepSpeed's partitioned engine state (seen: identical metrics)."""
    check_ppo_resume(tmp_path, str(TESTS / "deepspeed_cpu.py"))
