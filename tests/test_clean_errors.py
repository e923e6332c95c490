"""Clean errors (issue 12): inputs that used to end in a traceback (exit 1)
now end in one `error:` line naming the file/line, key or function (exit 2).

- data files that are not UTF-8, non-numeric preference margins;
- model names that are neither a preset, a directory nor reachable (offline:
  at once, without hub retries);
- reward functions that raise or return something other than one finite
  number per response;
- config values outside their valid range, reported by `rlhf validate`
  before any model is loaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import QUICKSTART, run_in_process, tiny_recipe_dict, write_recipe

from rlhf.errors import BadInput

DEMO = {"prompt": "Review of Sky:", "completion": " Loved it."}
PAIR = {"prompt": "Review of Sky:", "chosen": " Loved it.", "rejected": " Hated it."}


def _error_line(rc: int, err: str) -> str:
    assert "Traceback" not in err, err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------ data files


def _bad_utf8_file(path: Path) -> Path:
    """A file of DEMO records whose line 3 holds a Latin-1 byte (0xe9)."""
    bad = " Caf\xe9!".encode("latin-1")
    if path.suffix == ".jsonl":
        lines = [json.dumps(DEMO).encode()] * 4
        lines[2] = b'{"prompt": "Review:", "completion": "' + bad + b'"}'
    elif path.suffix == ".json":
        lines = [b"["] + [json.dumps(DEMO).encode() + b","] * 3 + [json.dumps(DEMO).encode(), b"]"]
        lines[2] = b'{"prompt": "Review:", "completion": "' + bad + b'"},'
    else:
        lines = [b"prompt,completion", b"Review of Sky:,Loved it.", b"Review:," + bad, b"Review:,Fine."]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_data_file_not_utf8(suffix, tmp_path, capsys):
    f = _bad_utf8_file(tmp_path / f"latin1{suffix}")
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe_dict(tmp_path / "out", ("sft",)))
    line = _error_line(run_in_process("validate", recipe, f"stages.sft.data.path={f}"), capsys.readouterr().err)
    assert f"{f}:3: not valid UTF-8 (byte 0xe9 at byte offset" in line, line
    assert not (tmp_path / "out").exists()


def test_utf8_with_bom_and_crlf_reads(tmp_path):
    from rlhf.data import read_records

    f = tmp_path / "bom.csv"
    f.write_bytes("\ufeffprompt,completion\r\nCafé:,Loved it.\r\n".encode("utf-8"))
    (rec,) = read_records(str(f))
    assert rec.data == {"prompt": "Café:", "completion": "Loved it."} and rec.where == f"{f}:2"
    f = tmp_path / "crlf.jsonl"
    f.write_bytes(b"\r\n".join(json.dumps(DEMO).encode() for _ in range(3)) + b"\r\n")
    assert [r.where for r in read_records(str(f))] == [f"{f}:{i}" for i in (1, 2, 3)]


@pytest.mark.parametrize("margin", ["big", [1, 2], None, True, math.nan])
def test_margin_not_a_number(margin, tmp_path, capsys):
    f = tmp_path / "prefs.jsonl"
    rows = [PAIR, {**PAIR, "margin": margin}, PAIR]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")  # NaN is written as the literal NaN
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe_dict(tmp_path / "out", ("reward",)))
    line = _error_line(run_in_process("validate", recipe, "stages.reward.model=tiny",
                                      f"stages.reward.data.path={f}"), capsys.readouterr().err)
    assert f"{f}:2: 'margin' must be a finite number, got" in line, line


def test_margin_numeric_text_and_numbers_are_kept():
    from rlhf.data import Record, normalize_preferences

    rows, dropped = normalize_preferences([Record({**PAIR, "margin": "1.5"}, "a.csv:2"),
                                           Record({**PAIR, "margin": 2}, "a.jsonl:1")])
    assert [r["margin"] for r in rows] == [1.5, 2.0] and dropped == 0
    rows, dropped = normalize_preferences([Record(PAIR, "x:1"), Record({**PAIR, "margin": "big"}, "x:2")],
                                          on_invalid="drop")
    assert len(rows) == 1 and dropped == 1


# ------------------------------------------------------------ model names


def _validate_model(tmp_path, capsys, name: str) -> str:
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe_dict(tmp_path / "out", ("sft",)))
    return _error_line(run_in_process("validate", recipe, f"stages.sft.model={name}"), capsys.readouterr().err)


def test_unknown_hub_id_offline_fails_at_once(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = _validate_model(tmp_path, capsys, "nosuch-owner/nosuch-model")
    assert "model 'nosuch-owner/nosuch-model': not a preset (tiny, tiny-large, mini-30m)" in line, line
    assert f"no directory {tmp_path / 'nosuch-owner' / 'nosuch-model'}" in line, line
    assert "not in the local hub cache" in line, line


def test_model_path_is_a_file(tmp_path, capsys):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    line = _validate_model(tmp_path, capsys, str(f))
    assert f"{f} is a file, not a checkpoint directory" in line and "not found" not in line, line


@pytest.mark.parametrize("name", ["./no_such_dir", "runs/x/sft/final", "~/no_such_rlhf_dir"])
def test_missing_local_dir(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = _validate_model(tmp_path, capsys, name)
    assert f"model '{name}': directory not found: {Path(name).expanduser().resolve()}" in line, line
    assert "tiny, tiny-large, mini-30m" in line, line


def test_local_looking_names_never_reach_the_hub(tmp_path, monkeypatch):
    from rlhf import models

    def no_hub(*args):
        raise AssertionError(f"asked the hub about {args}")

    monkeypatch.setattr(models, "_offline", lambda: False)
    monkeypatch.setattr(models, "_hub_problem", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    for name in ["./x", "/no/such/dir", "~/x", "a/b/c", "afile", ".hidden"]:
        with pytest.raises(BadInput, match="directory not found|is a file"):
            models.check_model(models.ModelConfig(name=name))
    # A hub id online: one quick question to the hub, reported as BadInput.
    monkeypatch.setattr(models, "_hub_problem", lambda name, rev: "no such model on the hub")
    with pytest.raises(BadInput, match="'owner/name': not a preset .* as a hub id: no such model on the hub"):
        models.check_model(models.ModelConfig(name="owner/name"))


def test_every_loader_checks_the_name():
    from rlhf import models

    cfg = models.ModelConfig(name="nosuch-owner/nosuch-model")
    tok = models.load_tokenizer(models.ModelConfig(name="tiny"))
    for load in (lambda: models.load_tokenizer(cfg), lambda: models.load_causal_lm(cfg, tok),
                 lambda: models.load_sequence_classifier(cfg, tok)):
        with pytest.raises(BadInput, match="not in the local hub cache"):
            load()
    assert models.load_config(cfg) is None and models.context_length(cfg) is None


# ------------------------------------------------------------ reward functions


def _score(name: str, n: int = 4):
    from rlhf.rewards import CombinedReward, RewardSpec

    reward = CombinedReward([RewardSpec(source="bad_rewards:fine"), RewardSpec(source=f"bad_rewards:{name}")])
    return reward(["p"] * n, ["a", "bb", "ccc", "dddd"][:n])


@pytest.mark.parametrize("name, expected", [
    ("returns_none", "reward function 'bad_rewards:returns_none' returned NoneType None; "
                     "expected a list of 4 numbers, one per response"),
    ("returns_scalar", "reward function 'bad_rewards:returns_scalar' returned float 1.0; expected a list of 4"),
    ("too_few", "reward function 'bad_rewards:too_few' returned 3 scores for 4 responses"),
    ("non_number", "reward function 'bad_rewards:non_number' returned a non-number at index 1: str 'high'"),
    ("none_inside", "reward function 'bad_rewards:none_inside' returned a non-number at index 1: NoneType None"),
])
def test_reward_function_returns_garbage(name, expected):
    with pytest.raises(BadInput) as e:
        _score(name)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_reward_function_raises():
    with pytest.raises(BadInput) as e:
        _score("raises")
    assert str(e.value) == "reward function 'bad_rewards:raises' raised ValueError: scorer exploded"
    assert isinstance(e.value.__cause__, ValueError)


@pytest.mark.parametrize("name, count, first", [("nan_scores", 2, "nan at index 1"), ("inf_score", 1, "inf at index 0")])
def test_reward_function_non_finite(name, count, first):
    from rlhf.rewards import NonFiniteReward

    with pytest.raises(NonFiniteReward) as e:
        _score(name)
    assert isinstance(e.value, RuntimeError) and not isinstance(e.value, BadInput)
    assert str(e.value) == f"reward source 'bad_rewards:{name}' returned {count} non-finite score(s) of 4 (first: {first})"
    assert e.value.source == f"bad_rewards:{name}" and len(e.value.indices) == count


def test_reward_scores_accept_numpy_and_tensors():
    import numpy as np
    import torch

    from rlhf.rewards import check_scores

    assert check_scores("m:f", np.array([1.0, 2.0]), 2) == [1.0, 2.0]
    assert check_scores("m:f", torch.tensor([1.0, 2.0]), 2) == [1.0, 2.0]
    assert check_scores("m:f", (np.float32(0.5), 3), 2) == [0.5, 3.0]
    with pytest.raises(BadInput, match=r"array of shape \(2, 1\)"):
        check_scores("m:f", np.ones((2, 1)), 2)
    assert _score("fine") == [2.0, 4.0, 6.0, 8.0]


# ------------------------------------------------------------ config ranges

PROMPTS = str(QUICKSTART / "prompts_train.jsonl")
STAGES = {
    "sft": None,  # from the tiny recipe
    "reward": None,
    "ppo": {"type": "ppo", "model": "tiny", "reward": "ppo_rewards:count_letter_e", "data": {"path": PROMPTS}},
    "eval": {"type": "eval", "checkpoints": {"base": "tiny"}, "prompts": PROMPTS},
    "rnn_lm": {"type": "rnn_lm", "data": {"path": str(QUICKSTART / "sft_train.jsonl")}},
    "gan": {"type": "gan"},
    "vae": {"type": "vae"},
    "diffusion": {"type": "diffusion"},
}

BAD = [
    # TrainingConfig (sft, reward, rnn_lm)
    ("sft", "train.learning_rate", "0"), ("sft", "train.learning_rate", "-1e-3"), ("sft", "train.learning_rate", ".nan"),
    ("sft", "train.warmup", "-0.1"), ("sft", "train.warmup", "2.5"), ("sft", "train.epochs", ".nan"),
    ("sft", "train.max_steps", "0"), ("sft", "train.max_steps", "-3"), ("sft", "train.weight_decay", "-0.1"),
    ("sft", "train.max_grad_norm", "-1"), ("sft", "train.eval_steps", "-1"), ("sft", "train.save_total_limit", "0"),
    ("sft", "train.lr_scheduler", "cosin"), ("sft", "train.grad_accum", "0"), ("sft", "max_length", "4"),
    ("sft", "data.max_samples", "0"), ("sft", "data.eval_fraction", "1.0"),
    ("sft", "model.lora.r", "0"), ("sft", "model.lora.dropout", "1.0"),
    ("reward", "center_rewards_coefficient", "-1"), ("reward", "train.learning_rate", ".inf"),
    ("rnn_lm", "train.learning_rate", "0"), ("rnn_lm", "rnn.dropout", "1.0"), ("rnn_lm", "max_seconds", ".nan"),
    # PPO
    ("ppo", "learning_rate", "0"), ("ppo", "learning_rate", ".inf"), ("ppo", "kl.coef", "-0.1"),
    ("ppo", "kl.horizon", "0"), ("ppo", "kl.target", "0"), ("ppo", "clip_range", "0"),
    ("ppo", "clip_range_value", "-0.2"), ("ppo", "gamma", "1.5"), ("ppo", "gamma", "-0.1"), ("ppo", "lam", "1.01"),
    ("ppo", "lam", ".nan"), ("ppo", "generation.temperature", "0"), ("ppo", "generation.temperature", ".nan"),
    ("ppo", "generation.top_p", "0"), ("ppo", "generation.top_p", "1.5"), ("ppo", "generation.top_k", "-1"),
    ("ppo", "max_grad_norm", "-1"), ("ppo", "vf_coef", "-1"), ("ppo", "entropy_coef", "-0.1"),
    ("ppo", "weight_decay", "-0.1"), ("ppo", "missing_eos_penalty", "-1"), ("ppo", "reward_clip", "0"),
    ("ppo", "save_every", "-1"), ("ppo", "steps", "0"), ("ppo", "eval.max_prompts", "0"),
    ("ppo", "eval.batch_size", "0"),
    # eval
    ("eval", "generation.temperature", "0"), ("eval", "generation.top_p", "2"), ("eval", "bootstrap_samples", "10"),
    ("eval", "max_length", "2"),
    # image baselines
    ("gan", "beta1", "1.0"), ("gan", "train.learning_rate", ".nan"), ("gan", "ema_decay", "1.0"),
    ("vae", "sigma", "0"), ("vae", "beta", ".nan"), ("diffusion", "eta", "-1"),
    ("diffusion", "restoration.noise_std", ".nan"), ("diffusion", "train.batch_size", "0"),
]


def _stage_recipe(tmp_path: Path, stage: str) -> Path:
    body = STAGES[stage]
    cfg = tiny_recipe_dict(tmp_path / "out", (stage,) if body is None else ())
    if body is not None:
        cfg["stages"] = {stage: body}
    elif stage == "reward":
        cfg["stages"]["reward"]["model"] = "tiny"
    return write_recipe(tmp_path / f"{stage}.yaml", cfg)


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_recipes_build(stage, tmp_path):
    from rlhf.recipe import load_recipe

    assert [s.type for s in load_recipe(_stage_recipe(tmp_path, stage)).stages] == [stage]


@pytest.mark.parametrize("stage, key, value", BAD, ids=[f"{s}.{k}={v}" for s, k, v in BAD])
def test_validate_rejects_out_of_range(stage, key, value, tmp_path, capsys):
    from rlhf.recipe import load_recipe

    recipe, override = _stage_recipe(tmp_path, stage), f"stages.{stage}.{key}={value}"
    line = _error_line(run_in_process("validate", recipe, override), capsys.readouterr().err)
    assert f"key 'stages.{stage}.{key}': expected" in line, line
    # Caught while the recipe is built, before any stage's validation loads a model.
    with pytest.raises(BadInput, match=f"key 'stages.{stage}.{key}': expected"):
        load_recipe(recipe, [override])
    assert not (tmp_path / "out").exists()
