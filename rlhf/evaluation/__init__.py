"""Evaluation: ``rlhf eval`` and the ``type: eval`` recipe stage.

- ``metrics``: pure metric functions (bootstrap intervals, distinct-n, win rate, KL, perplexity)
- ``runner``:  the stage's ``Config``, ``validate``, ``train`` and ``evaluate`` (models, sampling, scoring)
- ``report``:  PNG plots and the self-contained ``report.html``
- ``cli``:     the ``rlhf eval`` subcommand

``Config``, ``validate`` and ``train`` are imported on first use (PEP 562), so
building the CLI parser does not import torch.
"""

from __future__ import annotations

__all__ = ["Config", "evaluate", "train", "validate"]


def __getattr__(name: str):
    if name in __all__:
        from rlhf.evaluation import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
