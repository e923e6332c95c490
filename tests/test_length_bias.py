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
