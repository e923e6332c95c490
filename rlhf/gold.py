"""Gold scorers: the "true" reward the quickstart task is judged by.

`vader_sentiment` is VADER (Hutto & Gilbert, 2014), a rule-based sentiment
model: a hand-built lexicon plus rules for negation ("not good"), boosters
("very"), dampeners ("slightly") and "but". It is the gold scorer because
nobody in this project wrote it: its quirks are not ours, so a policy cannot
be tuned (even unknowingly) to blind spots we put there. The reward model
only ever sees noisy preference labels sampled from it; PPO optimises the
reward model; evaluation measures against VADER itself.

Every scorer here follows the project's reward-function contract:
`fn(prompts: list[str], responses: list[str]) -> list[float]`, referenced
from recipes as e.g. `rlhf.gold:vader_sentiment`.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.config import opt, require_positive


@dataclass
class HeldOutCheck:
    """Held-out check at the end of a policy stage (PPO, DPO): the gold score of
    the initial and the trained policy on held-out prompts, and their KL."""

    prompts: str | None = opt(None, "held-out prompts file (JSONL with `prompt`); null = skip")
    gold: str | None = opt(None, "gold scorer module:function (e.g. rlhf.gold:vader_sentiment)")
    max_prompts: int = opt(256, "evaluate at most this many prompts")
    batch_size: int = opt(64, "generation batch size")

    def check(self, fail):
        require_positive(self, fail, "max_prompts", "batch_size")
        for key in ("prompts", "gold"):
            if getattr(self, key) == "":
                raise fail(key, "expected a file / module:function, or null to skip")


_analyzer = None  # loading the lexicon takes ~50 ms, so build it once, lazily


def _get_analyzer():
    global _analyzer
    if _analyzer is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _analyzer = SentimentIntensityAnalyzer()
    return _analyzer


def vader_sentiment(prompts: list[str], responses: list[str]) -> list[float]:
    """VADER compound score in [-1, 1] of each response (higher = more positive).

    The prompt is ignored on purpose: only what the policy wrote is scored,
    so the prompt's title words can't move the reward.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    analyzer = _get_analyzer()
    return [float(analyzer.polarity_scores(r)["compound"]) for r in responses]
