"""Offline stand-ins for real recipes: hub models -> the tiny preset, hub datasets
-> local fixtures in the same record format, hub reward models -> a local
classifier (used by tests/test_recipe.py and tests/test_real_recipes.py)."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from rlhf.data import DataConfig, is_local
from rlhf.evaluation.runner import EvalData
from rlhf.models import PRESETS, ModelConfig, is_preset
from rlhf.rewards import RewardSpec, as_specs, is_hub_id

REPO = Path(__file__).resolve().parents[2]
# A hub dataset named by a real recipe is swapped for a local file in the same
# record format: tests/fixtures/hub/<owner>__<name>.jsonl.
HUB_FIXTURES = REPO / "tests" / "fixtures" / "hub"
# The tiny preset's context: longer `max_length`s of real recipes are clamped to it.
TINY_CONTEXT = PRESETS["tiny"]["n_positions"]


def _is_hub_id(name: str, output_dir: Path) -> bool:
    """A model name that would be downloaded (not a preset, local dir or earlier stage's output)."""
    if is_preset(name) or name.startswith((".", "/", "~")) or Path(name).exists():
        return False
    return not Path(name).resolve().is_relative_to(output_dir.resolve())


def _hub_fixture(name: str) -> str:
    fixture = HUB_FIXTURES / (name.replace("/", "__") + ".jsonl")
    if not fixture.is_file():
        pytest.fail(f"recipe names hub dataset {name!r}: add a local fixture in the same record format "
                    f"at {fixture.relative_to(REPO)}")
    return str(fixture)


def _mentions(tp, cls) -> bool:
    """Whether type hint ``tp`` is, or contains (in unions, lists, dicts), ``cls``."""
    return tp is cls or any(_mentions(a, cls) for a in typing.get_args(tp))


def _swap_model(value, output_dir: Path):
    if isinstance(value, ModelConfig) and (_is_hub_id(value.name, output_dir) or value.gguf_file):
        return dataclasses.replace(value, name="tiny", gguf_file=None, revision=None)
    if isinstance(value, str) and _is_hub_id(value, output_dir):
        return "tiny"
    return value


def _swap_rewards(value, reward_stand_in: str):
    """Hub reward models (e.g. a sentiment classifier) -> the stand-in checkpoint, keeping `label`."""
    if isinstance(value, str):
        return reward_stand_in if is_hub_id(value) else value
    return [dataclasses.replace(s, source=reward_stand_in, revision=None) if is_hub_id(s.source) else s
            for s in as_specs(value)]


def swap_offline(obj, output_dir: Path, reward_stand_in: str | None = None) -> None:
    """Swap hub models for the tiny preset and hub datasets for local fixtures, in place.

    Also clamps `max_length` to the tiny preset's context, and, given
    ``reward_stand_in`` (a local classifier checkpoint), swaps hub reward
    models for it (validation alone accepts hub reward ids unchecked).
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        tp = hints[f.name]
        if isinstance(value, (ModelConfig, str)) and _mentions(tp, ModelConfig):
            setattr(obj, f.name, _swap_model(value, output_dir))
        elif isinstance(value, dict) and _mentions(tp, ModelConfig):  # eval checkpoints: name -> model
            setattr(obj, f.name, {k: _swap_model(v, output_dir) for k, v in value.items()})
        elif isinstance(value, str) and _mentions(tp, EvalData) and not is_local(value):
            setattr(obj, f.name, _hub_fixture(value))
        elif isinstance(value, (DataConfig, EvalData)):
            if not is_local(value.path):
                value.path = _hub_fixture(value.path)
            if getattr(value, "eval_path", None) and not is_local(value.eval_path):
                value.eval_path = _hub_fixture(value.eval_path)
        elif reward_stand_in and value and _mentions(tp, RewardSpec):
            if isinstance(value, dict):  # eval rewards: name -> source(s)
                setattr(obj, f.name, {k: _swap_rewards(v, reward_stand_in) for k, v in value.items()})
            else:
                setattr(obj, f.name, _swap_rewards(value, reward_stand_in))
        elif f.name == "max_length" and isinstance(value, int) and value > TINY_CONTEXT:
            setattr(obj, f.name, TINY_CONTEXT)
        elif dataclasses.is_dataclass(value):
            swap_offline(value, output_dir, reward_stand_in)
