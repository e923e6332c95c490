"""The DPO stage on TRL's DPOTrainer: the implicit-reward accuracy rises on the
quickstart pairs, nothing is silently dropped, LoRA uses adapters-off as the
reference, losses by name, resume, and the pure pieces on hand-made numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import QUICKSTART, run_in_process, write_recipe

from rlhf.dpo import fit_pair, implicit_reward_accuracy, tokenize_dpo
from rlhf.rewards import PairStats
from rlhf.tracking import read_metrics


def _recipe(tmp_path: Path, **stage) -> Path:
    dpo = {"type": "dpo", "model": "tiny",
           "data": {"path": str(QUICKSTART / "prefs_train.jsonl"), "eval_path": str(QUICKSTART / "prefs_test.jsonl"),
                    "max_samples": 480, "max_eval_samples": 100},
           "max_length": 96, "beta": 0.1,
           "train": {"epochs": 1, "batch_size": 16, "learning_rate": 1e-3, "logging_steps": 5}}
    for key, value in stage.items():
        if isinstance(value, dict) and isinstance(dpo.get(key), dict):
            dpo[key] = {**dpo[key], **value}
        else:
            dpo[key] = value
    return write_recipe(tmp_path / "dpo.yaml", {"output_dir": str(tmp_path / "out"), "seed": 3,
                                                "stages": {"dpo": dpo}})


def _summary(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / "dpo" / "metrics.json").read_text())


def test_dpo_raises_held_out_accuracy_and_gold(tmp_path):
    # Every held-out pair: the first 100 happened to be easy (0.69), a random 100 scored 0.50 and all
    # 500 score 0.61; better than chance is what the 95% interval over all of them can show.
    recipe = _recipe(tmp_path, generation={"max_new_tokens": 16}, data={"max_eval_samples": None},
                     eval={"prompts": str(QUICKSTART / "prompts_test.jsonl"), "gold": "rlhf.gold:vader_sentiment",
                           "max_prompts": 32})
    assert run_in_process("run", recipe) == 0
    s = _summary(tmp_path)
    assert s["eval/accuracy_before"] == 0.5  # the policy is its own reference: every margin is 0
    assert s["eval/accuracy_ci_low"] > 0.5, s  # seen: 0.5 -> 0.61 [0.567, 0.652]
    assert s["eval/pairs"] == s["eval/pairs_available"] == 500 and s["train/pairs"] == 480
    assert s["eval/subset"] is False
    assert {"gold/sft", "gold/dpo", "kl/dpo", "response_length/dpo"} <= set(s)
    assert s["kl/dpo"] > 0
    rows = read_metrics(tmp_path / "out" / "dpo" / "metrics.jsonl")
    assert any("rewards/accuracies" in r for r in rows)  # TRL's training metrics reach metrics.jsonl
    final = tmp_path / "out" / "dpo" / "final"
    assert (final / "model.safetensors").exists() and (final / "tokenizer.json").exists()


def test_lora_reference_is_adapters_off_and_final_is_merged(tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = _recipe(tmp_path, model={"name": "tiny", "lora": {"r": 4, "alpha": 8}},
                     train={"max_steps": 4, "epochs": 1})
    assert run_in_process("run", recipe) == 0
    s = _summary(tmp_path)
    assert s["eval/accuracy_before"] == 0.5 and s["train/steps"] == 4
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "dpo" / "final")
    assert not any("lora" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("loss", ["ipo", "hinge"])
def test_losses_by_name(tmp_path, loss):
    assert run_in_process("run", _recipe(tmp_path, loss_type=[loss], train={"max_steps": 3})) == 0
    assert _summary(tmp_path)["dpo/loss_type"] == loss


def test_unknown_loss_is_a_recipe_error(tmp_path, capsys):
    assert run_in_process("validate", _recipe(tmp_path, loss_type=["sigmoidd"])) == 2
    err = capsys.readouterr().err
    assert "loss_type" in err and "sigmoidd" in err and "ipo" in err and "Traceback" not in err


def test_resume_after_a_crash_finishes_the_same_steps(tmp_path):
    recipe = _recipe(tmp_path, train={"max_steps": 6, "save_steps": 3, "save_total_limit": 3})
    assert run_in_process("run", recipe) == 0
    stage = tmp_path / "out" / "dpo"
    complete = _summary(tmp_path)
    shutil.rmtree(stage / "final")
    shutil.rmtree(stage / "checkpoints" / "checkpoint-6")
    (stage / "metrics.json").unlink()
    assert run_in_process("run", recipe) == 0
    resumed = _summary(tmp_path)
    assert resumed["train/steps"] == 6
    assert resumed["eval/accuracy"] == pytest.approx(complete["eval/accuracy"], abs=1e-6)
    assert resumed["eval/margin"] == pytest.approx(complete["eval/margin"], rel=1e-4)
    steps = [r["step"] for r in read_metrics(stage / "metrics.jsonl") if "train/loss" in r]
    assert steps == [5]  # logging_steps 5: the row of step 5, logged before the crash, replaced, not duplicated


# --- pure pieces -----------------------------------------------------------------------------------------------------


def test_fit_pair_drops_prompt_tokens_from_the_left_only():
    st = PairStats()
    assert fit_pair([1, 2, 3], [4, 5], [6], 6, st) == ([1, 2, 3], [4, 5], [6])  # fits
    assert fit_pair([1, 2, 3, 4], [5, 6], [7], 4, st) == ([3, 4], [5, 6], [7])  # room for the longer response
    assert st.prompt_truncated == 1 and st.response_truncated == 0
    # A response that alone does not fit keeps one prompt token; both responses lose their end.
    assert fit_pair([1, 2], [3, 4, 5, 6], [7, 8], 3, st) == ([2], [3, 4], [7, 8])
    assert st.response_truncated == 1


def test_tokenize_dpo_keeps_every_pair_and_counts_truncation():
    from rlhf.models import ModelConfig, load_tokenizer

    tok = load_tokenizer(ModelConfig("tiny"))
    rows = [{"prompt": "A film about " * 60, "chosen": " great fun", "rejected": " a dull mess"},
            {"prompt": "Short", "chosen": " yes", "rejected": " no"}]
    pairs, st = tokenize_dpo(rows, tok, 32)
    assert len(pairs) == 2 and st.pairs == 2 and st.prompt_truncated == 1
    for p in pairs:
        assert len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) <= 32
        assert p["chosen_ids"][-1] == tok.eos_token_id  # responses end as the policy's do
    assert tok.decode(pairs[0]["chosen_ids"]).startswith(" great fun")


def test_implicit_reward_accuracy_by_hand():
    ref = {"chosen_ids": torch.tensor([-5.0, -5.0, -5.0]), "rejected_ids": torch.tensor([-5.0, -5.0, -5.0])}
    pol = {"chosen_ids": torch.tensor([-4.0, -6.0, -5.0]), "rejected_ids": torch.tensor([-5.0, -5.0, -5.0])}
    got = implicit_reward_accuracy(pol, ref, beta=0.5)
    # margins 0.5, -0.5, 0 -> right, wrong, tie (half)
    assert got == {"accuracy": pytest.approx(0.5), "margin": pytest.approx(0.0), "pairs": 3}
    assert implicit_reward_accuracy(ref, ref, 0.1)["accuracy"] == 0.5
