"""RNN LM baseline: padding and state invariants, the transformers contract
(save_pretrained/from_pretrained through safetensors, AutoModelForCausalLM,
generate), the rnn_lm stage (its held-out loss falls), and the RNN as a PPO
policy followed by an eval stage that scores it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import QUICKSTART

from rlhf import recipe as recipe_mod
from rlhf.baselines.rnn import RnnArchitecture, RnnForCausalLM, build_model
from rlhf.models import ModelConfig, load_tokenizer

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig("tiny"))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_padding_and_state_do_not_change_the_outputs(tok, cell):
    model = build_model(RnnArchitecture(cell=cell, hidden_size=32, num_layers=2), tok, 64, seed=0).eval()
    ids = torch.randint(0, len(tok), (3, 7))
    full = model(input_ids=ids).logits  # (3, 7, vocab)
    pad = torch.full((3, 3), tok.pad_token_id)
    zeros, ones = torch.zeros(3, 3, dtype=torch.long), torch.ones(3, 7, dtype=torch.long)
    # Left padding (PPO prompts) and left + right padding (prompt + finished response).
    left = model(input_ids=torch.cat([pad, ids], 1), attention_mask=torch.cat([zeros, ones], 1))
    both = model(input_ids=torch.cat([pad, ids, pad], 1), attention_mask=torch.cat([zeros, ones, zeros], 1),
                 position_ids=torch.arange(13).expand(3, -1))  # accepted and ignored
    torch.testing.assert_close(left.logits[:, 3:], full)
    torch.testing.assert_close(both.logits[:, 3:10], full)
    # Continuing from the recurrent state equals one pass over the whole sequence.
    first = model(input_ids=ids[:, :4], use_cache=True)
    rest = model(input_ids=ids[:, 4:], rnn_state=first.rnn_state)
    torch.testing.assert_close(rest.logits, full[:, 4:])
    # What PPO reads: per-layer hidden states and logits_to_keep.
    out = model(input_ids=ids, output_hidden_states=True, logits_to_keep=2)
    assert len(out.hidden_states) == 3 and out.hidden_states[-1].shape == (3, 7, 32)
    torch.testing.assert_close(out.logits, full[:, -2:])


def test_save_pretrained_round_trip_and_generate(tok, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    model = build_model(RnnArchitecture(hidden_size=32, num_layers=1), tok, 64, seed=1).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "rlhf_rnn"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, use_safetensors=True).eval()
    assert isinstance(loaded, RnnForCausalLM)
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight  # tied, as saved
    ids = torch.randint(0, len(tok), (2, 5))
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)

    # generate: left-padded prompts; the recurrent state as cache gives the same tokens as no cache.
    prompts = [tok("Quick review of Falling Harbor:")["input_ids"], tok("I watched it")["input_ids"]]
    width = max(map(len, prompts))
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kwargs = dict(input_ids=input_ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                  pad_token_id=tok.pad_token_id)
    cached, uncached = loaded.generate(**kwargs), loaded.generate(**kwargs, use_cache=False)
    assert cached.shape == (2, width + 6) and torch.equal(cached, uncached)
    torch.manual_seed(0)
    sampled = loaded.generate(**{**kwargs, "do_sample": True, "top_k": 0})
    assert sampled.shape[0] == 2

    # The same checkpoint as a reward/value model: the trunk is reused, a score head added.
    clf = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1)
    assert clf(input_ids=input_ids, attention_mask=mask).logits.shape == (2, 1)


def test_entry_points_register_the_architecture_models_does_not_import_it():
    """rlhf.models (a low layer) imports no baseline; every entry point registers the RNN
    with transformers' Auto classes (rlhf.recipe.load_plugins), so a later stage or another
    `rlhf` command loads an RNN checkpoint without the rnn_lm stage in the same run."""
    import subprocess
    import sys

    code = ("import sys, rlhf.models\n"
            "assert 'rlhf.baselines.rnn_model' not in sys.modules\n"
            "from rlhf.recipe import load_plugins\n"
            "load_plugins()\n"
            "from transformers import AutoConfig\n"
            "assert type(AutoConfig.for_model('rlhf_rnn')).__name__ == 'RnnConfig'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _recipe(tmp_path: Path) -> Path:
    data = {"path": str(QUICKSTART / "sft_train.jsonl"), "eval_path": str(QUICKSTART / "sft_test.jsonl"),
            "max_samples": 96, "max_eval_samples": 32}
    stages = {
        "rnn": {"type": "rnn_lm", "tokenizer": "tiny", "rnn": {"hidden_size": 64, "num_layers": 1},
                "data": data, "max_length": 64,
                "train": {"max_steps": 12, "batch_size": 8, "learning_rate": 5e-3, "warmup": 0.0,
                          "logging_steps": 1, "save_steps": 100}},
        "rnn_ppo": {"type": "ppo", "model": "${output_dir}/rnn/final", "reward": "ppo_rewards:count_letter_e",
                    "value_model": "policy_head", "data": {"path": str(QUICKSTART / "prompts_train.jsonl")},
                    "steps": 2, "rollout_batch_size": 8, "num_minibatches": 2, "micro_batch_size": 4,
                    "ppo_epochs": 2, "learning_rate": 1e-3, "generation": {"max_new_tokens": 8}},
        "eval": {"type": "eval", "prompts": {"path": str(QUICKSTART / "prompts_test.jsonl"), "max_samples": 8},
                 "checkpoints": {"rnn": "${output_dir}/rnn/final", "rnn_ppo": "${output_dir}/rnn_ppo/final"},
                 "rewards": {"e": "ppo_rewards:count_letter_e"}, "reference": "rnn",
                 "text": {"path": str(QUICKSTART / "sft_test.jsonl"), "max_samples": 16},
                 "generation": {"max_new_tokens": 8, "batch_size": 8}, "bootstrap_samples": 100, "run_dir": ""},
        "report": {"type": "baseline_report", "text_eval": ["eval"]},
    }
    path = tmp_path / "rnn.yaml"
    recipe = {"output_dir": str(tmp_path / "out"), "seed": 3, "stages": stages}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_rnn_lm_stage_learns_then_ppo_trains_it_and_eval_scores_it(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))  # ppo_rewards
    recipe = recipe_mod.load_recipe(_recipe(tmp_path))
    recipe_mod.validate(recipe)
    recipe_mod.run(recipe)
    out = tmp_path / "out"

    # rnn_lm: held-out loss falls, training loss falls, the checkpoint is safetensors-only.
    summary = json.loads((out / "rnn" / "metrics.json").read_text())
    assert summary["eval/loss"] < summary["eval/loss_before"] - 0.5
    losses = [r["train/loss"] for r in map(json.loads, (out / "rnn" / "metrics.jsonl").read_text().splitlines())
              if "train/loss" in r]
    assert len(losses) >= 10 and sum(losses[-3:]) < sum(losses[:3])
    assert (out / "rnn" / "final" / "model.safetensors").is_file()

    # PPO with the RNN as policy: the first minibatch sees the sampling policy (ratio 1), and the
    # policy's weights moved.
    rows = [json.loads(x) for x in (out / "rnn_ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert r["ppo/first_minibatch_ratio"] == pytest.approx(1.0, abs=1e-5)
    from safetensors.torch import load_file

    before = load_file(out / "rnn" / "final" / "model.safetensors")
    after = load_file(out / "rnn_ppo" / "final" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)

    # eval scores both (perplexity, reward, KL to the SFT-trained RNN).
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["rnn"]["perplexity"] == pytest.approx(summary["eval/perplexity"], rel=0.05)
    assert metrics["rnn"]["kl"]["mean"] == pytest.approx(0.0, abs=1e-5)
    # The policies differ, so the KL is measured; after 2 small steps its 8-sample Monte-Carlo
    # estimate is noise around a tiny true value and can have either sign.
    assert metrics["rnn_ppo"]["kl"]["mean"] != 0.0 and abs(metrics["rnn_ppo"]["kl"]["mean"]) < 5
    assert (out / "eval" / "report.html").is_file()

    # The budget is steps (reproducible), stated in metrics.json; the report gives each model's
    # budget (steps, tokens, FLOPs estimate), its KL to its own start and the intervals.
    assert summary["train/budget"] == "steps" and summary["train/steps"] == 12
    text = {r["model"]: r for r in json.loads((out / "report" / "metrics.json").read_text())["text"]}
    assert text["rnn"]["steps"] == 12 and text["rnn"]["samples"] == 96 and text["rnn"]["flops"] > 0
    assert text["rnn"]["tokens"] > 96 and text["rnn_ppo"]["samples"] == 16  # 2 PPO steps x 8 responses
    assert text["rnn_ppo"]["kl"] == pytest.approx(metrics["rnn_ppo"]["kl"]["mean"])
    lo, hi = text["rnn_ppo"]["reward_ci"]
    assert lo <= text["rnn_ppo"]["reward"] <= hi and lo < hi
    md = (out / "report" / "report.md").read_text()
    assert "KL to own start" in md and "On the gold score" not in md  # no gold scorer here: no gold verdicts


def test_text_verdicts_rank_only_disjoint_intervals():
    from rlhf.baselines.report import distinguishable, text_cell, text_verdicts

    a = {"model": "a", "gold": 0.30, "gold_ci": [0.25, 0.35]}
    b = {"model": "b", "gold": 0.10, "gold_ci": [0.05, 0.15]}
    c = {"model": "c", "gold": 0.27, "gold_ci": [0.20, 0.33]}
    assert distinguishable(a, b) and not distinguishable(a, c) and distinguishable(a, {"model": "d"}) is None
    assert text_verdicts([a, b, c]) == [
        "a > b on gold (95% intervals disjoint)",
        "a and c: not distinguishable on gold (95% intervals overlap)",
        "c > b on gold (95% intervals disjoint)"]
    assert text_cell(a, "gold") == "0.300 [0.250, 0.350]"
