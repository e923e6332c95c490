"""Evaluation metrics: small pure functions on numbers and strings (numpy), no models, no I/O.

References:
- [Bootstrap] Efron & Tibshirani 1993, "An Introduction to the Bootstrap", ch. 13
  (the percentile interval).
- [Distinct] Li et al. 2016, "A Diversity-Promoting Objective Function for Neural
  Conversation Models", https://arxiv.org/abs/1510.03055 (distinct-1/2).
- [KL-approx] Schulman 2020, "Approximating KL Divergence",
  http://joschu.net/blog/kl-approx.html
- [AlpacaEval] Dubois et al. 2023, https://arxiv.org/abs/2305.14387 (win rates, ties as half).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np

from rlhf.textstats import distinct_n, top_ending_share  # noqa: F401 (re-exported)

__all__ = [
    "Interval",
    "bootstrap_ci",
    "distinct_n",
    "perplexity",
    "win_outcomes",
    "win_rate",
]


class Interval(NamedTuple):
    """A sample mean and its bootstrap confidence interval."""

    mean: float
    low: float
    high: float
    n: int

    def to_json(self) -> dict:
        nan = lambda v: None if math.isnan(v) else v  # noqa: E731 (JSON has no NaN)
        return {"mean": nan(self.mean), "ci_low": nan(self.low), "ci_high": nan(self.high), "n": self.n}


def bootstrap_ci(values: Sequence[float], confidence: float = 0.95, n_resamples: int = 1000,
                 seed: int = 0) -> Interval:
    """Mean of ``values`` with a percentile bootstrap interval [Bootstrap].

    Resamples ``values`` with replacement ``n_resamples`` times and takes the
    (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of the resampled
    means. Deterministic for a given ``seed``. Empty input gives NaNs.

    Shape: values (n,) -> Interval.
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    chunk = max(1, 4_000_000 // x.size)  # bound the (chunk, n) index matrix to ~32 MB
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        idx = rng.integers(0, x.size, size=(stop - start, x.size))
        means[start:stop] = x[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return Interval(float(x.mean()), float(low), float(high), int(x.size))


def win_outcomes(scores: Sequence[float], baseline_scores: Sequence[float]) -> np.ndarray:
    """Per-pair outcome of a candidate against a baseline on the same prompts:
    1 for a win, 0.5 for a tie, 0 for a loss [AlpacaEval].

    Shape: scores (n,), baseline_scores (n,) -> (n,).
    """
    a = np.asarray(scores, dtype=np.float64)
    b = np.asarray(baseline_scores, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"scores {a.shape} and baseline_scores {b.shape} must pair up one to one")
    return (a > b).astype(np.float64) + 0.5 * (a == b)


def win_rate(scores: Sequence[float], baseline_scores: Sequence[float]) -> float:
    """Fraction of prompts where the candidate beats the baseline; ties count half."""
    outcomes = win_outcomes(scores, baseline_scores)
    return float(outcomes.mean()) if outcomes.size else math.nan


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(mean negative log-likelihood per token); NaN for no tokens."""
    if n_tokens <= 0:
        return math.nan
    return float(math.exp(nll_sum / n_tokens))


def length_controlled_win_rate(outcomes: Sequence[float], length_diff: Sequence[float], iters: int = 50) -> float:
    """The win rate with the length difference regressed out [AlpacaEval LC].

    Fits P(win) = sigmoid(b0 + b1 * tanh(d / s)) by maximum likelihood, with
    ``outcomes`` in {0, 0.5, 1} (ties count half, as fractional targets),
    ``d`` the candidate's minus the baseline's response length and ``s`` the
    standard deviation of ``d``; returns sigmoid(b0), the predicted win rate
    at equal length. Equal lengths everywhere give the raw win rate.

    Hand-written Newton iterations on two parameters (what AlpacaEval's GLM
    fit computes) rather than a scikit-learn/statsmodels dependency for it.
    Shape: outcomes (n,), length_diff (n,) -> float.
    """
    y = np.asarray(outcomes, dtype=np.float64)
    d = np.asarray(length_diff, dtype=np.float64)
    if y.shape != d.shape or y.size == 0:
        raise ValueError(f"outcomes {y.shape} and length_diff {d.shape} must be non-empty and pair up")
    scale = d.std()
    x = np.tanh(d / scale) if scale > 0 else np.zeros_like(d)
    X = np.stack([np.ones_like(x), x], axis=1)
    beta = np.zeros(2)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(X @ beta)))
        grad = X.T @ (y - p)
        hess = (X * (p * (1 - p))[:, None]).T @ X + 1e-6 * np.eye(2)  # tiny ridge: separable data stays finite
        step = np.linalg.solve(hess, grad)
        beta += step
        if np.abs(step).max() < 1e-10:
            break
    return float(1.0 / (1.0 + np.exp(-beta[0])))
