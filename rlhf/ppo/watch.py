"""The reward-hacking watch: its settings and the alarm rule, pure and tested.

Every ``every`` PPO steps the trainer samples a fixed set of held-out
prompts with a fixed seed and records, per watch point,

  proxy     mean training reward (the reward PPO optimises) of those samples
  heldout   mean held-out signal: a gold scorer, or a reward model PPO does
            not optimise (e.g. one trained on other labels)
  kl        mean KL(policy || reference) per sequence
  length    mean response length (tokens)
  distinct_2, top_ending_share   diversity of the samples

Over-optimisation (Gao et al. 2022) shows as the proxy still rising while the
held-out signal falls. The rule (``alarm``): at watch point i, let p be the
point where the held-out signal peaked so far. It fires when

  1. the held-out signal has been below its peak for ``patience``
     consecutive watch points (so one noisy dip does not fire), and
  2. it has fallen by at least ``threshold`` from the peak
     (``heldout[p] - heldout[i] >= threshold``, in the held-out signal's
     units), and
  3. the proxy has risen since the peak (``proxy[i] > proxy[p]``).

It fires once per run (the first point that meets it); the best checkpoint by
the held-out signal is kept in ``best/`` either way.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.config import opt


@dataclass
class WatchConfig:
    """Reward-hacking watch during PPO (off unless ``every`` > 0)."""

    every: int = opt(0, "watch every N steps (0 = off)")
    prompts: str | None = opt(None, "held-out prompts (JSONL with `prompt`); null = eval.prompts")
    max_prompts: int = opt(64, "watch at most this many prompts (the same ones every time)")
    heldout: str | None = opt(None, "held-out signal: a gold module:function or a reward model PPO does not "
                                    "optimise; null = eval.gold")
    patience: int = opt(2, "alarm: watch points in a row below the held-out peak")
    threshold: float = opt(0.05, "alarm: drop from the held-out peak, in the held-out signal's units")
    keep_best: bool = opt(True, "keep the policy with the best held-out signal in <stage>/best/")
    stop_on_hacking: bool = opt(False, "stop the run at the alarm; final/ is then the best checkpoint")

    def check(self, fail):
        if self.every < 0:
            raise fail("every", f"expected >= 0 (0 = off), got {self.every}")
        if self.max_prompts < 1:
            raise fail("max_prompts", f"expected >= 1, got {self.max_prompts}")
        if self.patience < 1:
            raise fail("patience", f"expected >= 1, got {self.patience}")
        if not 0 <= self.threshold < float("inf"):
            raise fail("threshold", f"expected a finite number >= 0, got {self.threshold}")


def alarm(proxy: list[float], heldout: list[float], patience: int, threshold: float) -> bool:
    """Whether the rule in the module docstring fires at the last watch point."""
    if len(heldout) != len(proxy) or len(heldout) < patience + 1:
        return False
    peak = max(range(len(heldout)), key=lambda i: (heldout[i], -i))  # earliest maximum
    below = len(heldout) - 1 - peak  # points since the peak, all below it by construction
    return below >= patience and heldout[peak] - heldout[-1] >= threshold and proxy[-1] > proxy[peak]


def first_alarm(proxy: list[float], heldout: list[float], patience: int, threshold: float) -> int | None:
    """Index of the first watch point at which ``alarm`` fires, or None."""
    for i in range(len(heldout)):
        if alarm(proxy[:i + 1], heldout[:i + 1], patience, threshold):
            return i
    return None
