"""Reward sources, interchangeable wherever a reward is needed (PPO, eval).

A source is a reward-model checkpoint (a directory, or a hub id such as
``OpenAssistant/reward-model-deberta-v3-large-v2`` on machines that can
download) or a Python function given as ``module:function`` with signature
``(prompts, responses) -> list[float]``; several sources combine as a weighted
sum. A trained classifier with several outputs (e.g. the 2-label sentiment
classifier ``lvwerra/distilbert-imdb``) is a source too: ``label`` picks the
logit used as the score.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rlhf.config import opt
from rlhf.errors import BadInput

RewardFn = Callable[[list, list], list[float]]

_FUNCTION = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name


@dataclass
class RewardSpec:
    """One reward source. A plain string in a recipe is `source`."""

    source: str = opt("", "reward-model checkpoint dir, hub id (owner/name), or module:function")
    weight: float = opt(1.0, "weight in the weighted sum of sources")
    label: int | None = opt(None, "classifier output whose logit is the score (e.g. 1 = POSITIVE for "
                                  "lvwerra/distilbert-imdb); null: a one-output reward model")
    revision: str | None = opt(None, "hub revision of a checkpoint source (e.g. refs/pr/5, where a "
                                     "safetensors conversion lives)")

    def check(self, fail):
        if not self.source:
            raise fail("source", "required: a checkpoint dir or module:function")
        if self.label is not None and self.label < 0:
            raise fail("label", f"expected an output index >= 0, got {self.label}")
        if is_function(self.source) and (self.label is not None or self.revision is not None):
            raise fail("label" if self.label is not None else "revision",
                       "applies to checkpoint sources only, not to a module:function")


def as_specs(value: str | RewardSpec | list) -> list[RewardSpec]:
    items = value if isinstance(value, list) else [value]
    return [RewardSpec(source=v) if isinstance(v, str) else v for v in items]


def is_function(source: str) -> bool:
    return bool(_FUNCTION.match(source)) and not Path(source).exists()


def is_hub_id(source: str) -> bool:
    """``owner/name`` that is not a local path: a hub checkpoint, checked when it loads."""
    return bool(_HUB_ID.match(source)) and not Path(source).exists()


def load_function(source: str) -> RewardFn:
    module_name, _, attr = source.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise BadInput(f"reward function '{source}': cannot import module '{module_name}' ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise BadInput(f"reward function '{source}': module '{module_name}' has no function '{attr}'")
    return fn


def check_source(source: str, producible: Callable[[str], bool] = lambda s: False) -> None:
    """Raise BadInput unless ``source`` names an importable function, a
    checkpoint dir (existing, or one an earlier stage will produce) or a hub id
    (``owner/name``: it cannot be checked offline, so it is checked when it loads)."""
    if is_function(source):
        load_function(source)
    elif not Path(source).is_dir() and not producible(source) and not is_hub_id(source):
        raise BadInput(f"reward source '{source}': no such checkpoint directory, not a hub id (owner/name) "
                       "and not a module:function")


class CombinedReward:
    """Weighted sum of reward sources: (prompts, responses) -> list of floats."""

    def __init__(self, specs: list[RewardSpec], device="cpu", dtype: str = "float32"):
        from rlhf.reward_model import RewardModel

        self.parts: list[tuple[float, RewardFn, str]] = []
        for spec in specs:
            if is_function(spec.source):
                fn = load_function(spec.source)
            else:
                fn = RewardModel(spec.source, device=device, dtype=dtype, label=spec.label,
                                 revision=spec.revision)
            self.parts.append((spec.weight, fn, spec.source))

    def checkpoints(self) -> list[str]:
        return [src for _, fn, src in self.parts if not is_function(src)]

    def __call__(self, prompts: list, responses: list) -> list[float]:
        total = [0.0] * len(prompts)
        for weight, fn, source in self.parts:
            scores = list(fn(prompts, responses))
            if len(scores) != len(prompts):
                raise RuntimeError(f"reward source {source} returned {len(scores)} scores for {len(prompts)} inputs")
            total = [t + weight * float(s) for t, s in zip(total, scores)]
        return total
