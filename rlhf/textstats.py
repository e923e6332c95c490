"""Model-independent statistics of sampled text (whitespace words, lowercased),
shared by evaluation and PPO's reward-hacking watch."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / all n-grams over every text [Distinct].

    Words are whitespace-separated, lowercased: model-independent, so
    checkpoints with different tokenizers compare. No n-grams gives 0.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        words = text.lower().split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0


def top_ending_share(texts: Sequence[str], words: int = 4) -> float:
    """Share of texts ending with the most common last ``words`` words: a
    policy that found one phrase the reward model loves ends most responses
    with it. Texts with no words are left out; none at all gives 0."""
    endings = Counter(tuple(t.lower().split()[-words:]) for t in texts if t.split())
    return max(endings.values()) / sum(endings.values()) if endings else 0.0
