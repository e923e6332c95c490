"""Length bias, measured: the reward model's score-length statistics and the
length-controlled win rate, on constructed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rlhf.evaluation.metrics import length_controlled_win_rate
from rlhf.rewards import length_bias


def test_length_bias_hand_computed():
    # Pairs 1 and 3: the chosen response is longer; pair 2: shorter; pair 4: equal length.
    chosen, rejected = [2.0, 1.0, 3.0, 0.0], [1.0, 2.0, 1.0, 0.0]
    c_len, r_len = [10, 5, 12, 4], [5, 10, 6, 4]
    got = length_bias(chosen, rejected, c_len, r_len)
    assert got["pairs_chosen_longer"] == 2 and got["accuracy_chosen_longer"] == 1.0
    assert got["pairs_chosen_shorter"] == 1 and got["accuracy_chosen_shorter"] == 0.0  # scored the longer higher
    assert got["prefers_longer"] == 1.0  # in all 3 unequal pairs the longer one scores higher
    scores, lengths = np.array(chosen + rejected), np.array(c_len + r_len, float)
    assert got["length_corr"] == pytest.approx(np.corrcoef(scores, lengths)[0, 1])
    flat = length_bias([1.0, 1.0], [1.0, 1.0], [3, 4], [5, 6])
    assert flat["length_corr"] is None and flat["accuracy_chosen_shorter"] == 0.5  # ties count half


def test_length_controlled_win_rate_removes_the_length_effect():
    # 75 pairs where the candidate is longer (wins 80%), 25 where it is shorter (wins 40%):
    # raw win rate 0.7; at equal length the logistic model predicts sigmoid of the mean logit.
    d = np.array([5.0] * 75 + [-5.0] * 25)
    y = np.array([1.0] * 60 + [0.0] * 15 + [1.0] * 10 + [0.0] * 15)
    assert y.mean() == pytest.approx(0.7)
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    expected = 1 / (1 + math.exp(-(logit(0.8) + logit(0.4)) / 2))
    assert length_controlled_win_rate(y, d) == pytest.approx(expected, abs=1e-6)


def test_length_controlled_win_rate_without_length_differences_is_the_raw_rate():
    y = np.array([1.0, 0.5, 0.0, 1.0, 1.0])
    assert length_controlled_win_rate(y, np.zeros(5)) == pytest.approx(y.mean(), abs=1e-6)
    with pytest.raises(ValueError):
        length_controlled_win_rate([], [])


# ---------------------------------------------------------------- reward-model ensembles


def test_aggregate_members_hand_computed():
    import torch

    from rlhf.rewards import aggregate_members

    m = torch.tensor([[1.0, 3.0], [2.0, 2.0], [-1.0, 5.0]])
    assert aggregate_members(m, "mean").tolist() == [2.0, 2.0, 2.0]
    assert aggregate_members(m, "mean_minus_std", 0.5).tolist() == [1.5, 2.0, 0.5]  # std 1, 0, 3
    assert aggregate_members(m, "min").tolist() == [1.0, 2.0, -1.0]
    with pytest.raises(ValueError):
        aggregate_members(m, "median")


def test_ensemble_reward_stage_trains_k_heads_and_scores_as_one_source(tmp_path):
    import json

    import torch

    from conftest import tiny_recipe_dict, write_recipe
    from rlhf import recipe as recipe_mod
    from rlhf.rewards import CombinedReward, RewardModel, RewardSpec

    cfg = tiny_recipe_dict(tmp_path / "out")
    cfg["stages"]["reward"]["ensemble"] = 3
    out = recipe_mod.run(recipe_mod.load_recipe(write_recipe(tmp_path / "r.yaml", cfg)))["reward"]
    summary = json.loads((out.parent / "metrics.json").read_text())
    assert {f"eval/member_{i}_accuracy" for i in range(3)} <= set(summary)
    assert summary["eval/member_disagreement"] > 0  # the heads started apart and stay apart
    assert json.loads((out / "reward_config.json").read_text())["ensemble"] == 3
    prompts, responses = ["A review:"] * 3, [" great fun", " dull and slow", " fine"]
    rm = RewardModel(out)
    members = rm.members(prompts, responses)
    assert members.shape == (3, 3)
    assert rm(prompts, responses) == pytest.approx(members.mean(1).tolist(), abs=1e-6)
    worst = CombinedReward([RewardSpec(source=str(out), aggregate="min")])(prompts, responses)
    assert worst == pytest.approx(members.min(1).values.tolist(), abs=1e-6)
    cautious = CombinedReward([RewardSpec(source=str(out), aggregate="mean_minus_std",
                                          uncertainty_coef=2.0)])(prompts, responses)
    expected = members.mean(1) - 2.0 * members.std(1, unbiased=False)
    assert cautious == pytest.approx(expected.tolist(), abs=1e-6)
    # Held-out preference scoring (rlhf eval, the collect stage) combines the members the same way.
    from rlhf.evaluation.runner import pairwise_scores

    rows = [{"prompt": p, "chosen": r, "rejected": " so-so"} for p, r in zip(prompts, responses)]
    chosen, _, _ = pairwise_scores(CombinedReward([RewardSpec(source=str(out), aggregate="min")]), rows)
    assert chosen.tolist() == pytest.approx(worst, abs=1e-5)
    # A PPO value model started from it gets a fresh one-output head instead of failing to load.
    from rlhf.models import ModelConfig, load_sequence_classifier, load_tokenizer

    value = load_sequence_classifier(ModelConfig(name=str(out)), load_tokenizer(ModelConfig(name=str(out))))
    assert value.score.weight.shape[0] == 1 and torch.isfinite(value.score.weight).all()


# ---------------------------------------------------------------- over-optimisation curves


def test_gao_fits_recover_known_parameters():
    from rlhf.evaluation import overopt

    d = np.linspace(0.2, 4.0, 25)
    r = d * (1.3 - 0.6 * np.log(d))
    a, b = overopt.fit_rl(d, r)
    assert (a, b) == (pytest.approx(1.3, abs=1e-9), pytest.approx(0.6, abs=1e-9))
    assert overopt.rl_peak(a, b) == pytest.approx(math.exp(1.3 / 0.6 - 1))
    rng = np.random.default_rng(0)
    noisy = overopt.fit_rl(d, r + rng.normal(0, 0.01, d.size))
    assert noisy == (pytest.approx(1.3, abs=0.05), pytest.approx(0.6, abs=0.05))
    a, b = overopt.fit_bon(d, d * (0.9 - 0.2 * d))
    assert (a, b) == (pytest.approx(0.9), pytest.approx(0.2))
    assert overopt.rl_peak(1.0, -0.1) is None  # still rising: no peak
    assert overopt.bon_kl(1) == 0.0 and overopt.bon_kl(64) == pytest.approx(math.log(64) - 63 / 64)


def test_best_of_n_keeps_the_proxy_favourite():
    from rlhf.evaluation import overopt

    proxy = np.array([[0.1, 0.9, 0.5, 0.2], [0.3, 0.2, 0.1, 0.8]])
    gold = np.array([[1.0, 0.0, 2.0, 3.0], [5.0, 6.0, 7.0, 8.0]])
    pts = {p["n"]: p for p in overopt.best_of_n(proxy, gold, [1, 2, 4])}
    assert pts[1]["gold"] == 3.0 and pts[2]["gold"] == (0.0 + 5.0) / 2 and pts[4]["gold"] == (0.0 + 8.0) / 2
    assert pts[4]["proxy"] == pytest.approx((0.9 + 0.8) / 2)
    assert pts[2]["kl"] == pytest.approx(math.log(2) - 0.5)
