"""Gold scorers for the rounds tests' simulated labelers (importable as
``round_helpers:...`` by a recipe run in a subprocess with tests/ on PYTHONPATH)."""

from __future__ import annotations

import time

from rlhf.gold import vader_sentiment


def slow_vader(prompts: list, responses: list) -> list[float]:
    """VADER, slowed to ~25 labels a second, so a test can interrupt a
    collect stage half way through its labels."""
    time.sleep(0.02)
    return vader_sentiment(prompts, responses)


def longer_is_better(prompts: list, responses: list) -> list[float]:
    """A gold score with a spread on untrained models' text: its length in words."""
    return [float(len(r.split())) for r in responses]
