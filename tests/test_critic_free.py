"""RLOO and GRPO in our on-policy trainer: the math on hand-computed numbers,
one loss checked against TRL's own GRPOTrainer, and trainer runs (no value
model, learning, resume step for step)."""

import json
import math
import types
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from rlhf.ppo.core import (aggregate_loss, clipped_surrogate, group_normalized_advantages, kl_penalty,
                           policy_loss, rloo_advantages)

ROOT = Path(__file__).resolve().parents[1]


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual).float(), torch.as_tensor(expected).float(), atol=atol, rtol=0)


# --- advantages ------------------------------------------------------------------------------------------------------


def test_rloo_leave_one_out_baseline():
    # Groups (1, 2) and (3, 6): each sample's baseline is the other one.
    close(rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), 2), [-1.0, 1.0, -3.0, 3.0])
    # k = 3: baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5.
    close(rloo_advantages(torch.tensor([1.0, 2.0, 6.0]), 3), [-3.0, -1.5, 4.5])


def test_grpo_group_batch_and_unscaled():
    s = torch.tensor([1.0, 2.0, 6.0])  # mean 3, sample std sqrt(7)
    close(group_normalized_advantages(s, 3, "none"), [-2.0, -1.0, 3.0])
    close(group_normalized_advantages(s, 3, "group"), torch.tensor([-2.0, -1.0, 3.0]) / (math.sqrt(7) + 1e-4))
    s = torch.tensor([1.0, 3.0, 2.0, 2.0])  # groups (1, 3) and (2, 2)
    # A group whose samples scored alike carries no signal: advantage 0, not NaN.
    close(group_normalized_advantages(s, 2, "group"), [-1 / (math.sqrt(2) + 1e-4), 1 / (math.sqrt(2) + 1e-4), 0, 0])
    batch_std = math.sqrt(2 / 3)  # std of (1, 3, 2, 2)
    close(group_normalized_advantages(s, 2, "batch"), [-1 / (batch_std + 1e-4), 1 / (batch_std + 1e-4), 0, 0])


@pytest.mark.parametrize("fn", [rloo_advantages, group_normalized_advantages])
def test_group_advantages_refuse_ragged_groups(fn):
    with pytest.raises(ValueError, match="k >= 2"):
        fn(torch.tensor([1.0, 2.0, 3.0]), 2)
    with pytest.raises(ValueError, match="k >= 2"):
        fn(torch.tensor([1.0, 2.0]), 1)


# --- loss aggregation ------------------------------------------------------------------------------------------------

PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)


def test_aggregations_by_hand():
    close(aggregate_loss(PER_TOKEN, MASK, "token_mean"), 10 / 4)  # every token alike
    close(aggregate_loss(PER_TOKEN, MASK, "sequence_mean"), (2 + 4) / 2)  # each sequence's mean, then the mean
    close(aggregate_loss(PER_TOKEN, MASK, "constant", max_len=4), 10 / (2 * 4))  # Dr. GRPO
    with pytest.raises(ValueError, match="max_len"):
        aggregate_loss(PER_TOKEN, MASK, "constant")


@pytest.mark.parametrize("how", ["token_mean", "sequence_mean", "constant"])
def test_micro_batches_add_up_to_the_minibatch(how):
    """The trainer aggregates each micro-batch with the minibatch's counts: the
    pieces must sum to the whole, so micro_batch_size never changes the gradient."""
    counts = {"tokens": MASK.sum(), "sequences": 2}
    whole = aggregate_loss(PER_TOKEN, MASK, how, max_len=4)
    parts = sum(aggregate_loss(PER_TOKEN[i:i + 1], MASK[i:i + 1], how, max_len=4, **counts) for i in range(2))
    close(parts, whole)


def test_clipped_surrogate_broadcasts_a_sequence_advantage():
    lp = torch.tensor([[math.log(1.5), 0.0], [0.0, 0.0]])
    old = torch.zeros(2, 2)
    adv = torch.tensor([[2.0], [-1.0]])  # one advantage per sequence
    per_token, stats = clipped_surrogate(lp, old, adv, torch.ones(2, 2, dtype=torch.bool), 0.2)
    # ratio 1.5 with A = 2 is clipped to 1.2: max(-3, -2.4) = -2.4.
    close(per_token, [[-2.4, -2.0], [1.0, 1.0]])
    close(stats.clipfrac, 0.25)
    # policy_loss is its token mean (PPO's choice).
    loss, _ = policy_loss(lp, old, adv.expand(2, 2), torch.ones(2, 2), 0.2)
    close(loss, per_token.mean())


# --- against TRL's GRPOTrainer ---------------------------------------------------------------------------------------


def _trl_grpo_loss(loss_type: str, logps, old_logps, ref_logps, advantages, mask, beta, max_len):
    """TRL 1.x GRPOTrainer._compute_loss on given log-probs: its own code, with
    the model forward replaced by the numbers (a stand-in ``self`` holds the
    settings it reads)."""
    from trl import GRPOTrainer

    class Acc:
        gather = gather_for_metrics = staticmethod(lambda x: x)
        reduce = staticmethod(lambda x, reduction="sum": x)
        num_processes, sync_gradients = 1, True

    fake = types.SimpleNamespace(
        loss_type=loss_type, beta=beta, epsilon_low=0.2, epsilon_high=0.2, importance_sampling_level="token",
        max_completion_length=max_len, current_gradient_accumulation_steps=1, top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, use_vllm=False, vllm_importance_sampling_correction=False,
        aux_loss_enabled=False, _entropy_bonus_enabled=False, use_adaptive_entropy=False, accelerator=Acc(),
        args=types.SimpleNamespace(delta=None, use_bias_correction_kl=False), model=types.SimpleNamespace(training=True),
        _metrics={"train": defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None))
    b, t = logps.shape
    inputs = {"prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
              "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": advantages, "old_per_token_logps": old_logps, "ref_per_token_logps": ref_logps,
              "num_items_in_batch": mask.sum()}
    return GRPOTrainer._compute_loss(fake, None, inputs)


@pytest.mark.parametrize("ours,theirs", [("sequence_mean", "grpo"), ("token_mean", "bnpo"), ("constant", "dr_grpo")])
def test_grpo_loss_matches_trl(ours, theirs):
    g = torch.Generator().manual_seed(0)
    b, t, k = 6, 5, 3
    old = -torch.rand(b, t, generator=g) * 3
    logps = old + torch.randn(b, t, generator=g) * 0.3  # after some updates: ratios off 1, some clipped
    ref = old + torch.randn(b, t, generator=g) * 0.5
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 3:] = mask[4, 1:] = False
    adv = group_normalized_advantages(torch.randn(b, generator=g), k, "group")
    beta = 0.04
    per_token, _ = clipped_surrogate(logps, old, adv.unsqueeze(1), mask, 0.2)
    agg = lambda x: aggregate_loss(x, mask, ours, max_len=t)  # noqa: E731
    mine = agg(per_token) + beta * agg(kl_penalty(logps, ref, "k3"))
    close(mine, _trl_grpo_loss(theirs, logps, old, ref, adv, mask, beta, t), atol=1e-6)


# --- the trainer ---------------------------------------------------------------------------------------------------


def _capture_setup(monkeypatch) -> list:
    from rlhf.ppo import trainer

    runs, real = [], trainer._setup
    monkeypatch.setattr(trainer, "_setup", lambda cfg, ctx: runs.append(real(cfg, ctx)) or runs[-1])
    return runs


def _transformer_trunks(model) -> int:
    from transformers import PreTrainedModel

    return sum(isinstance(m, PreTrainedModel) and m.base_model is m for m in model.modules())


@pytest.mark.parametrize("advantage", ["rloo", "grpo"])
def test_critic_free_loads_no_value_model_and_learns(tmp_path, monkeypatch, advantage):
    from test_ppo_trainer import _recipe, _rows, _run

    runs = _capture_setup(monkeypatch)
    # value_model: reward (the default) must not matter: rloo/grpo need no value.
    _run(_recipe(tmp_path, steps=40, learning_rate=3e-3, advantage=advantage, samples_per_prompt=4,
                 rollout_batch_size=4, value_model="reward"))
    model = runs[0].accelerator.unwrap_model(runs[0].model)
    assert model.value_model is None and model.value_head is None
    assert _transformer_trunks(model) == 1
    rows = _rows(tmp_path / "run")
    assert rows[0]["train/episodes"] == 16  # 4 prompts x 4 samples
    assert "ppo/value_loss" not in rows[0] and rows[0]["ppo/first_minibatch_ratio"] == pytest.approx(1.0, abs=1e-5)
    first = sum(r["objective/scores"] for r in rows[:5]) / 5
    last = sum(r["objective/scores"] for r in rows[-5:]) / 5
    assert last > first + 0.3, (first, last)  # seen: 1.16 -> 3.56 (rloo), 1.12 -> 4.93 (grpo)


def test_function_rewards_get_no_second_trunk_by_default(tmp_path, monkeypatch):
    """value_model: reward (the default) with only function rewards has no
    reward model to start a value model from: a value head on the policy."""
    from test_ppo_trainer import _recipe, _run

    runs = _capture_setup(monkeypatch)
    _run(_recipe(tmp_path, steps=1, value_model="reward"))
    model = runs[0].accelerator.unwrap_model(runs[0].model)
    assert model.value_model is None and model.value_head is not None
    assert _transformer_trunks(model) == 1


@pytest.mark.parametrize("settings", [
    {"advantage": "rloo"},
    {"advantage": "grpo", "kl": {"placement": "loss", "adaptive": True, "target": 1.0, "horizon": 100},
     "loss_aggregation": "sequence_mean"}])
def test_critic_free_resume_matches_uninterrupted_run(tmp_path, monkeypatch, settings):
    from test_ppo_trainer import assert_resume_matches

    assert_resume_matches(tmp_path, monkeypatch, samples_per_prompt=4, rollout_batch_size=4, **settings)


def test_bad_critic_free_settings_are_clear(tmp_path):
    from test_ppo_trainer import _recipe

    from rlhf import recipe as recipe_mod
    from rlhf.errors import BadInput

    for settings, key in (({"advantage": "grpo"}, "samples_per_prompt"),
                          ({"kl": {"placement": "loss"}}, "kl.placement"),
                          ({"advantage": "rloo", "samples_per_prompt": 3, "rollout_batch_size": 5}, "num_minibatches")):
        with pytest.raises(BadInput, match=key.replace(".", r"\.")):
            recipe_mod.load_recipe(_recipe(tmp_path, **settings))


def test_grpo_two_processes(tmp_path):
    import os
    import subprocess
    import sys

    from test_ppo_trainer import TESTS, _free_port, _recipe, _rows

    path = _recipe(tmp_path, steps=2, advantage="grpo", samples_per_prompt=4, rollout_batch_size=2,
                   micro_batch_size=2)
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "rlhf", "run", str(path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "ppo" / "metrics.json").read_text())
    assert summary["dist/world_size"] == 2
    assert summary["train/episodes"] == 2 * 2 * 2 * 4  # steps x ranks x prompts x samples
    rows = _rows(tmp_path / "run")
    assert len(rows) == 2 and "rollout/zero_std_groups" in rows[0]


def test_one_epoch_one_minibatch_reuses_the_update_forward(tmp_path, monkeypatch):
    """GRPO with one epoch of one minibatch and the KL in the loss: the rollout
    skips the policy forward (the update's forward gives the old log-probs,
    ratio exactly 1), and every logged number matches a run that does the
    forward, up to float summation order."""
    from test_ppo_trainer import _recipe, _rows, _run

    from rlhf.ppo import trainer

    settings = dict(steps=3, advantage="grpo", samples_per_prompt=4, rollout_batch_size=4, num_minibatches=1,
                    ppo_epochs=1, micro_batch_size=8, kl={"placement": "loss", "coef": 0.1})
    assert trainer.Config(**{k: v for k, v in settings.items() if k != "kl"},
                          kl=trainer.KLConfig(placement="loss")).old_logprobs_from_update
    assert not trainer.Config(advantage="grpo", samples_per_prompt=4, ppo_epochs=1, num_minibatches=1,
                              kl=trainer.KLConfig(coef=0.1)).old_logprobs_from_update  # KL in the reward
    calls = []
    real = trainer.PolicyAndValue.forward
    monkeypatch.setattr(trainer.PolicyAndValue, "forward",
                        lambda self, *a, **k: calls.append(torch.is_grad_enabled()) or real(self, *a, **k))
    for d in ("reuse", "forward"):
        (tmp_path / d).mkdir()
    _run(_recipe(tmp_path / "reuse", **settings))
    assert calls and all(calls)  # every policy forward is the update's (with grad)
    reused = _rows(tmp_path / "reuse" / "run")
    assert all(r["ppo/first_minibatch_ratio"] == 1.0 for r in reused)

    monkeypatch.setattr(trainer.Config, "old_logprobs_from_update", property(lambda self: False))
    calls.clear()
    _run(_recipe(tmp_path / "forward", **settings))
    assert not all(calls)  # the rollout's no-grad forwards are back
    for a, b in zip(reused, _rows(tmp_path / "forward" / "run"), strict=True):
        for key in ("objective/scores", "objective/kl", "ppo/policy_loss", "ppo/kl_loss", "ppo/entropy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
