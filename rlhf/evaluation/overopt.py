"""Over-optimisation curves: gold and proxy reward against sqrt(KL) for a PPO
run and for best-of-n sampling, with Gao et al.'s functional forms fitted.

Gao, Schulman & Hilton 2022, "Scaling laws for reward model
overoptimization": with d = sqrt(KL(pi || pi_init)) and the gold score
measured from the initial policy's (R(0) = 0),

  RL          R(d) = d (alpha - beta log d)     peak at d* = exp(alpha / beta - 1)
  best-of-n   R(d) = d (alpha - beta d)         peak at d* = alpha / (2 beta)

and best-of-n has an analytic KL: KL_bon(n) = log n - (n - 1) / n.

Both forms are linear in (alpha, beta), so the fits are ordinary least
squares (numpy's lstsq); no optimiser is needed.

The RL points come from the PPO stage's reward-hacking watch
(``watch/kl``, ``watch/heldout``, ``watch/proxy`` in its metrics.jsonl: the
same held-out prompts and sampling seed at every watch point).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from rlhf.config import opt


@dataclass
class OveroptConfig:
    """The over-optimisation section of an eval report."""

    stage: str = opt("ppo", "PPO stage (in run_dir) whose watch rows give the RL curve; it needs watch.every > 0")
    best_of_n: list[int] = opt([1, 2, 4, 8, 16, 32, 64], "best-of-n points (n samples of `policy`, the one the "
                                                         "proxy scores highest kept)")
    policy: str | None = opt(None, "checkpoint name (in `checkpoints`) to sample best-of-n from; null = the KL "
                                   "reference")
    reward: str | None = opt(None, "name in `rewards` that picks the best of n (the proxy); null = the first")
    max_prompts: int = opt(64, "prompts for best-of-n (n = max(best_of_n) samples each)")

    def check(self, fail):
        if not self.best_of_n or any(n < 1 for n in self.best_of_n):
            raise fail("best_of_n", f"expected a list of positive integers, got {self.best_of_n}")
        if self.max_prompts < 1:
            raise fail("max_prompts", f"expected >= 1, got {self.max_prompts}")


def bon_kl(n: int) -> float:
    """KL(best-of-n || base) = log n - (n - 1) / n (Stiennon et al. 2020; Gao et al. 2022)."""
    return math.log(n) - (n - 1) / n


def fit_rl(d: Sequence[float], r: Sequence[float]) -> tuple[float, float]:
    """(alpha, beta) of R(d) = d (alpha - beta log d), least squares; d = 0 points carry no information."""
    d, r = np.asarray(d, float), np.asarray(r, float)
    keep = d > 0
    d, r = d[keep], r[keep]
    if d.size < 2:
        raise ValueError("need at least two points with d > 0")
    (alpha, beta), *_ = np.linalg.lstsq(np.stack([d, -d * np.log(d)], axis=1), r, rcond=None)
    return float(alpha), float(beta)


def fit_bon(d: Sequence[float], r: Sequence[float]) -> tuple[float, float]:
    """(alpha, beta) of R(d) = d (alpha - beta d), least squares."""
    d, r = np.asarray(d, float), np.asarray(r, float)
    if (d > 0).sum() < 2:
        raise ValueError("need at least two points with d > 0")
    (alpha, beta), *_ = np.linalg.lstsq(np.stack([d, -d * d], axis=1), r, rcond=None)
    return float(alpha), float(beta)


def rl_curve(d, alpha: float, beta: float) -> np.ndarray:
    d = np.asarray(d, float)
    return np.where(d > 0, d * (alpha - beta * np.log(np.where(d > 0, d, 1.0))), 0.0)


def rl_peak(alpha: float, beta: float) -> float | None:
    """d at the RL form's maximum (None when beta <= 0: no peak, still rising)."""
    return math.exp(alpha / beta - 1) if beta > 0 else None


def best_of_n(proxy: np.ndarray, gold: np.ndarray, ns: Sequence[int]) -> list[dict]:
    """Best-of-n points from (prompts, n_max) proxy and gold scores of the same
    samples: for each n, per prompt the sample the proxy ranks first among its
    first n is kept; returns n, KL, d and the mean gold and proxy of the kept ones."""
    out = []
    for n in sorted(set(ns)):
        pick = proxy[:, :n].argmax(1)
        rows = np.arange(proxy.shape[0])
        kl = bon_kl(n)
        out.append({"n": n, "kl": kl, "d": math.sqrt(kl), "gold": float(gold[rows, pick].mean()),
                    "proxy": float(proxy[rows, pick].mean())})
    return out


def rl_points(rows: list[dict]) -> list[dict]:
    """The watch rows of a PPO metrics.jsonl as curve points."""
    return [{"step": r["step"], "kl": r["watch/kl"], "d": math.sqrt(max(r["watch/kl"], 0.0)),
             "gold": r["watch/heldout"], "proxy": r["watch/proxy"]} for r in rows if "watch/heldout" in r]


def summarise(rl: list[dict], bon: list[dict], gold_init: float) -> dict:
    """Fits on gold relative to the initial policy's (``gold_init``), and the peaks."""
    out: dict = {"gold_init": gold_init, "rl": rl, "best_of_n": bon}
    if len(rl) >= 2:
        try:
            a, b = fit_rl([p["d"] for p in rl], [p["gold"] - gold_init for p in rl])
            out["rl_fit"] = {"alpha": a, "beta": b, "peak_d": rl_peak(a, b)}
        except ValueError:
            pass
        best = max(rl, key=lambda p: p["gold"])
        out["rl_best"] = {"step": best["step"], "d": best["d"], "gold": best["gold"]}
    if len(bon) >= 2:
        try:
            a, b = fit_bon([p["d"] for p in bon], [p["gold"] - gold_init for p in bon])
            out["bon_fit"] = {"alpha": a, "beta": b, "peak_d": a / (2 * b) if b > 0 else None}
        except ValueError:
            pass
    return out


def plot(summary: dict, out: Path) -> Path | None:
    """gold and proxy vs sqrt(KL): PPO watch points and best-of-n, with the fits and the RL peak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rl, bon, g0 = summary["rl"], summary["best_of_n"], summary["gold_init"]
    if not rl and not bon:
        return None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for pts, label, color in ((rl, "PPO (watch points)", "tab:blue"), (bon, "best-of-n", "tab:orange")):
        if pts:
            ax.plot([p["d"] for p in pts], [p["gold"] for p in pts], "o", color=color, label=f"{label}: gold")
            ax2.plot([p["d"] for p in pts], [p["proxy"] for p in pts], "o-", color=color, label=label)
    dmax = max([p["d"] for p in rl + bon] + [1e-3])
    grid = np.linspace(0, dmax * 1.05, 200)
    if "rl_fit" in summary:
        f = summary["rl_fit"]
        ax.plot(grid, g0 + rl_curve(grid, f["alpha"], f["beta"]), "-", color="tab:blue", alpha=0.6,
                label=f"fit d(α − β log d): α={f['alpha']:.2f}, β={f['beta']:.2f}")
        if f["peak_d"] is not None and f["peak_d"] <= dmax * 1.5:
            ax.axvline(f["peak_d"], color="tab:blue", ls=":", lw=1)
    if "bon_fit" in summary:
        f = summary["bon_fit"]
        ax.plot(grid, g0 + grid * (f["alpha"] - f["beta"] * grid), "-", color="tab:orange", alpha=0.6,
                label=f"fit d(α − β d): α={f['alpha']:.2f}, β={f['beta']:.2f}")
    ax.set_xlabel("sqrt(KL to the initial policy)")
    ax.set_ylabel("gold score")
    ax.set_title("gold: over-optimisation shows as a peak")
    ax.legend(fontsize=7)
    ax2.set_xlabel("sqrt(KL to the initial policy)")
    ax2.set_ylabel("proxy reward")
    ax2.set_title("proxy (what was optimised)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path = Path(out) / "overoptimisation.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
