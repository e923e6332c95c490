"""Several processes on CPU: a shortened quickstart chain (SFT, reward, PPO) under
`torchrun --nproc_per_node 2 -m rlhf run`, compared with one process at the same
global batch and seed; PPO prompt sharding and metric reduction across ranks.

Tolerance of the loss comparison: 1e-3 relative (1e-4 absolute), for the loss
and gradient norm of each of the first two steps of SFT and of the reward model.
With the same global batch the two ranks see exactly the examples one process
sees and DDP averages their gradients, so the numbers agree up to float32
summation order (seen: ~1e-7 relative). A sharding error, or ranks training
without gradient all-reduce, shows up as a difference of 1-20% (seen: a 0.5%
loss and 20% gradient-norm gap when `trainer.evaluate()` before `train()` kept
the model out of DDP).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import OFFLINE_ENV, QUICKSTART, REPO, tiny_recipe_dict, write_recipe
from helpers.distributed import free_port

from rlhf import recipe as recipe_mod
from rlhf.ppo.trainer import _step_prompts

TESTS = Path(__file__).resolve().parent
GLOBAL_BATCH = 8  # SFT examples / reward pairs / PPO prompts per optimiser step, over all processes


def test_step_prompts_shard_without_overlap():
    prompts = [f"p{i}" for i in range(37)]  # not a multiple of the batch: steps cross epochs
    for step in range(12):
        one = _step_prompts(prompts, step, GLOBAL_BATCH, rank=0, world=1, seed=3)
        ranks = [_step_prompts(prompts, step, GLOBAL_BATCH // 4, rank=r, world=4, seed=3) for r in range(4)]
        # The ranks take consecutive, disjoint slices of the one-process batch, in rank order.
        assert sum(ranks, []) == one
    seen = [p for s in range(5) for p in _step_prompts(prompts, s, GLOBAL_BATCH, 0, 1, 3)]
    assert len(set(seen[:37])) == 37  # every prompt once per epoch, then a new permutation


def _chain(out: Path, per_device: int) -> dict:
    """SFT -> reward -> PPO on the tiny preset, plus `probe`: one PPO step whose reward is the rank."""
    cfg = tiny_recipe_dict(out)
    for name in ("sft", "reward"):
        train = cfg["stages"][name]["train"]
        train.update(max_steps=2, batch_size=per_device, logging_steps=1, save_steps=100)
    ppo = {
        "type": "ppo", "model": "${output_dir}/sft/final", "reward": "${output_dir}/reward/final",
        "data": {"path": str(QUICKSTART / "prompts_train.jsonl")},
        "steps": 2, "rollout_batch_size": per_device, "num_minibatches": 1, "micro_batch_size": per_device,
        "ppo_epochs": 1, "learning_rate": 1e-4, "generation": {"max_new_tokens": 8}, "sample_every": 100,
    }
    probe = dict(ppo, reward="dist_rewards:rank_and_log", value_model="policy_head", steps=1)
    cfg["stages"].update(ppo=ppo, probe=probe)
    return cfg


def _first(path: Path, key: str) -> float:
    return _all(path, key)[0]


def _all(path: Path, key: str) -> list[float]:
    return [r[key] for r in map(json.loads, path.read_text().splitlines()) if key in r]


def _summary(out: Path, stage: str) -> dict:
    return json.loads((out / stage / "metrics.json").read_text())


def _logged_prompts(log_dir: Path, rank: int) -> list[str]:
    path = log_dir / f"rank{rank}.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_two_process_chain_matches_one_process(tmp_path, monkeypatch):
    one, two = tmp_path / "one", tmp_path / "two"
    logs_one, logs_two = tmp_path / "prompts1", tmp_path / "prompts2"
    logs_one.mkdir(), logs_two.mkdir()

    recipe = write_recipe(tmp_path / "two.yaml", _chain(two / "out", GLOBAL_BATCH // 2))
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1", "RLHF_TEST_PROMPT_LOG": str(logs_two),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "rlhf", "run", str(recipe)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # Meanwhile, the same chain in this process at the same global batch.
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setenv("RLHF_TEST_PROMPT_LOG", str(logs_one))
    path = write_recipe(tmp_path / "one.yaml", _chain(one / "out", GLOBAL_BATCH))
    recipe_mod.run(recipe_mod.load_recipe(path))

    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-4000:]

    one, two = one / "out", two / "out"
    for stage in ("sft", "reward", "ppo", "probe"):
        assert _summary(two, stage)["dist/world_size"] == 2, stage  # two ranks really ran
        assert _summary(one, stage)["dist/world_size"] == 1, stage
        assert (two / stage / "final").is_dir()
    # Only the main process logs: one row per step.
    assert len((two / "ppo" / "metrics.jsonl").read_text().splitlines()) == 2

    # Same global batch, same seed: the same losses and gradient norms, step by step (SFT, reward model).
    for stage in ("sft", "reward"):
        for key in ("train/loss", "train/grad_norm"):
            a, b = _all(one / stage / "metrics.jsonl", key), _all(two / stage / "metrics.jsonl", key)
            assert len(a) == len(b) == 2, (stage, key)
            assert b == pytest.approx(a, rel=1e-3, abs=1e-4), (stage, key, a, b)
    assert _summary(two, "ppo")["train/episodes"] == _summary(one, "ppo")["train/episodes"] == 2 * GLOBAL_BATCH

    # PPO metrics are reduced over ranks before logging: the mean of rank ids 0 and 1.
    assert _first(two / "probe" / "metrics.jsonl", "objective/scores") == pytest.approx(0.5)
    assert _first(one / "probe" / "metrics.jsonl", "objective/scores") == pytest.approx(0.0)
    # ... and the ranks' prompts are disjoint halves of the one-process batch.
    rank0, rank1 = _logged_prompts(logs_two, 0), _logged_prompts(logs_two, 1)
    single = _logged_prompts(logs_one, 0)
    assert len(rank0) == len(rank1) == GLOBAL_BATCH // 2 and len(single) == GLOBAL_BATCH
    assert rank0 + rank1 == single
