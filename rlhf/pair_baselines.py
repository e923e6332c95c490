"""Cheap baselines for a reward model's held-out pairwise accuracy.

A reward model is only worth its compute if it beats what a bag of words
and response length already get: if a TF-IDF logistic regression ranks the
held-out pairs as well, the model learnt surface words; if "the longer
response wins" does, it may have learnt length.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)


def response_text(response) -> str:
    """A response as plain text (chat messages: their contents)."""
    if isinstance(response, str):
        return response
    return "\n".join(str(m.get("content", "")) for m in response)


def longer_wins(rows: list[dict]) -> float | None:
    """Accuracy of "the response with more words is the chosen one" (equal
    lengths count half, as ties do for a reward model); None without pairs."""
    if not rows:
        return None
    c = np.array([len(response_text(r["chosen"]).split()) for r in rows])
    r = np.array([len(response_text(r["rejected"]).split()) for r in rows])
    return float(np.mean((c > r) + 0.5 * (c == r)))


def tfidf_accuracy(train: list[dict], held: list[dict]) -> float | None:
    """Held-out accuracy of a logistic regression on TF-IDF(chosen) -
    TF-IDF(rejected) (word unigrams and bigrams, fit on the training
    responses), trained on the training pairs; ties count half. None without
    pairs or without a single word in the training responses.

    Each training pair is used both ways round (d, 1) and (-d, 0), with no
    intercept, so the score is antisymmetric: swapping the sides flips it.
    The prompt is left out: it is the same on both sides.
    """
    from scipy import sparse
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    if not train or not held:
        return None
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    try:
        vec.fit([response_text(r[side]) for r in train for side in ("chosen", "rejected")])
    except ValueError:  # empty vocabulary: every response is empty or punctuation
        return None

    def diff(rows):
        return (vec.transform([response_text(r["chosen"]) for r in rows])
                - vec.transform([response_text(r["rejected"]) for r in rows]))

    d = diff(train)
    clf = LogisticRegression(fit_intercept=False, max_iter=1000)
    clf.fit(sparse.vstack([d, -d]), np.r_[np.ones(len(train)), np.zeros(len(train))])
    margin = diff(held) @ clf.coef_[0]
    return float(np.mean((margin > 0) + 0.5 * (margin == 0)))


def pair_baselines(train: list[dict], held: list[dict]) -> dict:
    """``baseline/accuracy`` (TF-IDF logistic regression, ``tfidf_accuracy``)
    and ``baseline/longer_wins`` on the held-out pairs; empty without any."""
    if not held:
        return {}
    return {"baseline/accuracy": tfidf_accuracy(train, held), "baseline/longer_wins": longer_wins(held),
            "baseline/method": "tfidf_logreg"}
