"""Evaluation metric functions (rlhf.evaluation.metrics) against hand-computed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rlhf.evaluation import metrics as M
from rlhf.sampling import sequence_kl

# ---------------------------------------------------------------- bootstrap


def test_bootstrap_ci_covers_the_true_mean_about_95_percent_of_the_time():
    """Over 400 normal samples (n=60), the 95% interval holds the true mean ~95% of the time."""
    rng = np.random.default_rng(0)
    mu, sigma, n, trials = 1.5, 2.0, 60, 400
    hits = 0
    for t in range(trials):
        ci = M.bootstrap_ci(rng.normal(mu, sigma, n), 0.95, n_resamples=1000, seed=t)
        hits += ci.low <= mu <= ci.high
    coverage = hits / trials
    # The percentile interval slightly under-covers at small n; 400 trials: sd ~ 0.011.
    assert 0.91 <= coverage <= 0.98, coverage


def test_bootstrap_ci_width_matches_the_normal_theory_interval():
    x = np.random.default_rng(1).normal(0.0, 1.0, 2000)
    ci = M.bootstrap_ci(x, 0.95, n_resamples=2000, seed=0)
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert ci.mean == pytest.approx(x.mean())
    assert (ci.high - ci.low) / 2 == pytest.approx(half, rel=0.1)
    assert ci.low < ci.mean < ci.high and ci.n == 2000


def test_bootstrap_ci_is_deterministic_and_handles_edge_cases():
    x = np.random.default_rng(2).normal(size=50).tolist()
    assert M.bootstrap_ci(x, seed=3) == M.bootstrap_ci(x, seed=3)
    assert M.bootstrap_ci(x, seed=3) != M.bootstrap_ci(x, seed=4)
    assert M.bootstrap_ci([2.0] * 10) == M.Interval(2.0, 2.0, 2.0, 10)  # no spread, no width
    empty = M.bootstrap_ci([])
    assert empty.n == 0 and math.isnan(empty.mean)
    assert empty.to_json() == {"mean": None, "ci_low": None, "ci_high": None, "n": 0}


# ---------------------------------------------------------------- distinct-n


def test_distinct_n_hand_computed():
    texts = ["The cat sat", "the cat ran"]
    # unigrams: the cat sat the cat ran -> 4 distinct of 6
    assert M.distinct_n(texts, 1) == pytest.approx(4 / 6)
    # bigrams: (the cat) (cat sat) (the cat) (cat ran) -> 3 distinct of 4
    assert M.distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert M.distinct_n(["a b c d"], 2) == 1.0
    assert M.distinct_n(["a a a a"], 1) == 0.25


def test_distinct_n_with_no_ngrams_is_zero():
    assert M.distinct_n([], 1) == 0.0
    assert M.distinct_n(["", "one"], 2) == 0.0
    with pytest.raises(ValueError):
        M.distinct_n(["a"], 0)


# ---------------------------------------------------------------- win rate


def test_win_rate_counts_ties_as_half():
    a = [1.0, 2.0, 3.0, 4.0]
    b = [0.0, 2.0, 5.0, 4.0]  # win, tie, loss, tie
    assert M.win_outcomes(a, b).tolist() == [1.0, 0.5, 0.0, 0.5]
    assert M.win_rate(a, b) == 0.5
    assert M.win_rate([3, 3, 3], [1, 3, 2]) == pytest.approx(2.5 / 3)
    assert M.win_rate([1, 2], [1, 2]) == 0.5  # against itself: all ties
    assert M.win_rate(a, b) + M.win_rate(b, a) == 1.0


def test_win_rate_needs_paired_scores():
    with pytest.raises(ValueError):
        M.win_outcomes([1, 2], [1])
    assert math.isnan(M.win_rate([], []))


# ---------------------------------------------------------------- KL


def test_sequence_kl_hand_computed():
    lp = [[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]]
    ref = [[-1.5, -2.0, -2.0], [-1.0, -1.0, -9.0]]
    mask = [[1, 1, 0], [1, 1, 1]]
    # row 0: 0.5 + 0 (third token masked); row 1: 0.5 + 0.5 + 8.5
    assert sequence_kl(lp, ref, mask).tolist() == pytest.approx([0.5, 9.5])


def test_sequence_kl_estimates_kl_between_two_known_categoricals():
    """Tokens sampled from p: the mean per-sequence estimate -> t * KL(p || q)."""
    p = np.array([0.5, 0.3, 0.2])
    q = np.array([0.2, 0.5, 0.3])
    exact = float((p * np.log(p / q)).sum())  # 0.2243 nats per token
    rng = np.random.default_rng(0)
    b, t = 20000, 4
    tokens = rng.choice(3, size=(b, t), p=p)
    lp, ref = np.log(p)[tokens], np.log(q)[tokens]
    per_seq = sequence_kl(lp, ref, np.ones((b, t)))
    stderr = per_seq.std() / math.sqrt(b)
    assert abs(per_seq.mean() - t * exact) < 4 * stderr
    assert per_seq.mean() == pytest.approx(t * exact, rel=0.03)
    # Identical distributions: exactly zero for every sequence.
    assert np.all(sequence_kl(lp, lp, np.ones((b, t))) == 0)


# ---------------------------------------------------------------- perplexity


def test_perplexity_hand_computed():
    assert M.perplexity(3 * math.log(4.0), 3) == pytest.approx(4.0)  # uniform over 4 tokens
    assert M.perplexity(0.0, 5) == 1.0
    assert math.isnan(M.perplexity(0.0, 0))
