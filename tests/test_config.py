"""The strict config builder (rlhf.config): unknown keys, types, shorthands, defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from rlhf.config import build, describe, opt, required, to_dict
from rlhf.errors import BadInput
from rlhf.models import LoraSpec, ModelConfig


@dataclass
class Inner:
    """A nested section."""

    size: int = opt(3, "a size")
    names: list[str] = opt(["a"], "some names")


@dataclass
class Outer:
    """A config exercising every supported type."""

    path: str = required("where the data is")
    steps: int = opt(10, "steps")
    lr: float = opt(1e-3, "learning rate")
    flag: bool = opt(False, "a switch")
    mode: Literal["fast", "slow"] = opt("fast", "speed")
    tags: list[str] = opt([], "labels")
    mapping: dict[str, str] = opt({}, "renames")
    limit: int | None = opt(None, "optional cap")
    inner: Inner = opt(Inner(), "nested")
    model: str | ModelConfig = opt("tiny", "a model name or mapping")

    def check(self, fail):
        if self.steps < 0:
            raise fail("steps", f"expected >= 0, got {self.steps}")


def where(path: str) -> str:
    return f"recipe.yaml:{len(path)}: "  # any deterministic prefix: build must use it


def test_builds_with_defaults_and_values():
    cfg = build(Outer, {"path": "x.jsonl", "steps": 5, "lr": 2, "flag": True, "mode": "slow",
                        "tags": ["a", "b"], "mapping": {"prompt": "q"}, "limit": 4, "inner": {"size": 9}})
    assert cfg.path == "x.jsonl" and cfg.steps == 5 and cfg.flag is True and cfg.mode == "slow"
    assert cfg.lr == 2.0 and isinstance(cfg.lr, float)  # an integer is a valid float
    assert cfg.tags == ["a", "b"] and cfg.mapping == {"prompt": "q"} and cfg.limit == 4
    assert cfg.inner == Inner(size=9, names=["a"])
    assert cfg.model == "tiny"


def test_unknown_key_names_dotted_path_and_known_keys():
    with pytest.raises(BadInput) as e:
        build(Outer, {"path": "x", "inner": {"sise": 1}}, "stages.sft", where)
    msg = str(e.value)
    assert "'stages.sft.inner.sise'" in msg and "unknown key" in msg
    assert msg.startswith(where("stages.sft.inner.sise"))
    assert "size" in msg and "names" in msg  # what was expected


def test_unknown_key_error_carries_recipe_line(tmp_path):
    from rlhf.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("output_dir: out\nstages:\n  sft:\n    type: sft\n    train:\n      max_stepz: 3\n")
    with pytest.raises(BadInput) as e:
        load_recipe(recipe)
    assert str(e.value).startswith(f"{recipe}:6: key 'stages.sft.train.max_stepz': unknown key")


@pytest.mark.parametrize("key, value, expected", [
    ("steps", "3", "expected an integer"),
    ("steps", 3.0, "expected an integer"),
    ("steps", True, "expected an integer"),  # bool is an int subclass in Python: refuse it
    ("lr", "1e-3", "expected a number"),
    ("lr", False, "expected a number"),
    ("flag", "yes", "expected true or false"),
    ("flag", 1, "expected true or false"),
    ("path", 5, "expected a string"),
    ("tags", "a", "expected a list"),
    ("tags", [1], "expected a string"),
    ("mapping", ["a"], "expected a mapping"),
    ("mode", "medium", "expected one of 'fast' | 'slow'"),
    ("limit", "4", "expected int or null"),
    ("inner", 3, "expected a mapping"),
    ("model", 3, "expected str or mapping"),
])
def test_wrong_types_are_errors(key, value, expected):
    data = {"path": "x", key: value}
    with pytest.raises(BadInput) as e:
        build(Outer, data, "cfg", where)
    msg = str(e.value)
    assert expected in msg
    bad_path = "cfg.tags.0" if value == [1] else f"cfg.{key}"
    assert f"key '{bad_path}'" in msg


def test_null_only_where_optional():
    assert build(Outer, {"path": "x", "limit": None}).limit is None
    with pytest.raises(BadInput, match="'steps': expected an integer, got None"):
        build(Outer, {"path": "x", "steps": None})


def test_required_key_missing():
    with pytest.raises(BadInput) as e:
        build(Outer, {}, "stages.sft", where)
    assert "key 'stages.sft.path': required (where the data is)" in str(e.value)


def test_check_hook_reports_key_path():
    with pytest.raises(BadInput, match=r"key 'cfg\.steps': expected >= 0, got -1"):
        build(Outer, {"path": "x", "steps": -1}, "cfg")


def test_model_shorthand_and_mapping():
    short = build(Outer, {"path": "x", "model": "runs/a/sft/final"})
    assert short.model == "runs/a/sft/final"
    full = build(Outer, {"path": "x", "model": {"name": "tiny", "dtype": "bfloat16", "lora": {"r": 4}}})
    assert isinstance(full.model, ModelConfig)
    assert full.model.name == "tiny" and full.model.dtype == "bfloat16"
    assert full.model.lora == LoraSpec(r=4)
    # A mapping goes to ModelConfig, so its own errors name the inner key.
    with pytest.raises(BadInput, match=r"key 'm\.model\.lora\.rank': unknown key"):
        build(Outer, {"path": "x", "model": {"name": "tiny", "lora": {"rank": 4}}}, "m")
    with pytest.raises(BadInput, match=r"key 'm\.model\.dtype': expected one of"):
        build(Outer, {"path": "x", "model": {"dtype": "fp8"}}, "m")


def test_mutable_defaults_are_copied_not_shared():
    a, b = build(Outer, {"path": "x"}), build(Outer, {"path": "y"})
    a.tags.append("t")
    a.mapping["k"] = "v"
    a.inner.names.append("b")
    assert b.tags == [] and b.mapping == {} and b.inner.names == ["a"]
    # The real stage configs too: a nested default section shares nothing.
    from rlhf import reward_model, sft

    s1, s2 = sft.Config(), sft.Config()
    assert s1.data is not s2.data and s1.data.columns is not s2.data.columns
    s1.data.columns["prompt"] = "question"
    assert s2.data.columns == {} and reward_model.Config().data.columns == {}


def test_to_dict_round_trips_through_build():
    cfg = build(Outer, {"path": "x", "model": {"name": "tiny", "lora": {"r": 2}}, "inner": {"size": 1}})
    assert build(Outer, to_dict(cfg)) == cfg


def test_describe_lists_every_field_with_type_and_help():
    text = describe(Outer)
    assert "path: REQUIRED  # (str) where the data is" in text
    assert "mode: fast  # ('fast' | 'slow') speed" in text
    assert "limit: null  # (int or null) optional cap" in text
    assert "inner:  # nested" in text and "  size: 3  # (int) a size" in text
