"""The tiny end-to-end: `rlhf run` trains SFT then the reward model on the tiny
preset (seconds on a CPU), and the run directory keeps its contracts:
loadable safetensors checkpoints, metrics, skip/force/resume, LoRA merged."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import QUICKSTART, run_in_process, tiny_recipe_dict, write_recipe

from rlhf.tracking import read_metrics

STAGES = ("sft", "reward")
WEIGHT_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".ckpt", ".safetensors", ".gguf", ".h5", ".msgpack"}
N_HELD_OUT = 23  # reward held-out pairs, 3 of them longer than max_length


def _held_out_pairs(path: Path) -> Path:
    rows = [json.loads(line) for line in (QUICKSTART / "prefs_test.jsonl").read_text().splitlines()[:N_HELD_OUT]]
    for row in rows[:3]:  # TRL would silently drop these; every pair must still count
        row["prompt"] = "A very long preamble about films. " * 20 + row["prompt"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """One tiny SFT -> reward run shared by the read-only tests: (recipe, output_dir)."""
    d = tmp_path_factory.mktemp("tiny_run")
    cfg = tiny_recipe_dict(d / "out")
    reward_data = cfg["stages"]["reward"]["data"]
    reward_data["eval_path"] = str(_held_out_pairs(d / "held_out.jsonl"))
    del reward_data["max_eval_samples"]
    recipe = write_recipe(d / "recipe.yaml", cfg)
    assert run_in_process("run", recipe) == 0
    return recipe, d / "out"


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def _untrained_tiny(seed: int):
    from rlhf.models import ModelConfig, load_causal_lm, load_tokenizer

    cfg = ModelConfig("tiny")
    return load_causal_lm(cfg, load_tokenizer(cfg), seed=seed)


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in before if k in after and not torch.equal(before[k], after[k])]


def test_stage_dirs_have_the_contracted_files(tiny_run):
    recipe, out = tiny_run
    for stage in STAGES:
        d = out / stage
        for name in ("final", "metrics.jsonl", "metrics.json", "config.yaml"):
            assert (d / name).exists(), f"{stage}/{name} missing"
        config = yaml.safe_load((d / "config.yaml").read_text())
        assert config["type"] == stage and config["max_length"] == 64
        rows = read_metrics(d / "metrics.jsonl")
        assert rows and all(isinstance(r["step"], int) for r in rows)
        keys = {k for r in rows for k in r} - {"step", "time"}
        assert keys and all("/" in k for k in keys), f"keys not namespaced: {keys}"
        assert any("train/loss" in r for r in rows)
        summary = json.loads((d / "metrics.json").read_text())
        assert summary["train/steps"] == 4
    assert yaml.safe_load((out / "recipe.yaml").read_text())["stages"]["reward"]["model"] == str(out / "sft" / "final")


@pytest.mark.parametrize("stage", STAGES)
def test_final_is_a_plain_safetensors_checkpoint(tiny_run, stage):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    final = tiny_run[1] / stage / "final"
    weights = [p.name for p in final.iterdir() if p.suffix in WEIGHT_SUFFIXES]
    assert weights and all(name.endswith(".safetensors") for name in weights), weights
    assert not (final / "adapter_config.json").exists()
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    auto = AutoModelForCausalLM if stage == "sft" else AutoModelForSequenceClassification
    model = auto.from_pretrained(final).eval()
    ids = tok(["Review of Sky: great", "Just saw Harbor."], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**ids).logits
    if stage == "sft":
        assert logits.shape[:2] == ids["input_ids"].shape and logits.shape[-1] >= len(tok)
    else:
        assert logits.shape == (2, 1) and model.config.pad_token_id == tok.pad_token_id
    assert torch.isfinite(logits).all()


def test_sft_lowers_held_out_loss_and_changes_parameters(tiny_run):
    from transformers import AutoModelForCausalLM

    recipe, out = tiny_run
    summary = json.loads((out / "sft" / "metrics.json").read_text())
    assert summary["eval/loss"] < summary["eval/loss_before"]
    assert summary["eval/examples"] == 16 and summary["train/examples"] == 64
    seed = yaml.safe_load(recipe.read_text())["seed"]
    before = _untrained_tiny(seed).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out / "sft" / "final").state_dict()
    params = [k for k in before if k in after and before[k].is_floating_point() and "attn.bias" not in k]
    unchanged = [k for k in params if torch.equal(before[k], after[k])]
    assert not unchanged, f"not trained: {unchanged}"


def test_reward_accuracy_covers_every_held_out_pair(tiny_run):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    out = tiny_run[1]
    summary = json.loads((out / "reward" / "metrics.json").read_text())
    assert summary["eval/pairs"] == N_HELD_OUT
    assert summary["data/eval_prompt_truncated"] == 6  # chosen and rejected of the 3 long pairs
    assert summary["data/eval_response_truncated"] == 0
    assert 0.0 <= summary["eval/accuracy"] <= 1.0 and 0.0 <= summary["eval/accuracy_before"] <= 1.0
    assert summary["eval/subset"] is False and summary["eval/pairs_available"] == N_HELD_OUT
    assert summary["eval/accuracy_ci_low"] <= summary["eval/accuracy"] <= summary["eval/accuracy_ci_high"]
    assert 0.0 <= summary["baseline/accuracy"] <= 1.0 and 0.0 <= summary["baseline/longer_wins"] <= 1.0
    assert summary["train/pairs"] == 64 and summary["data/dropped_invalid"] == 0
    # The reward model starts from the SFT trunk and trains it.
    sft = AutoModelForCausalLM.from_pretrained(out / "sft" / "final").state_dict()
    reward = AutoModelForSequenceClassification.from_pretrained(out / "reward" / "final").state_dict()
    trunk = [k for k in reward if k in sft and sft[k].is_floating_point() and "attn.bias" not in k]
    assert trunk and _changed({k: sft[k] for k in trunk}, reward)
    assert "score.weight" in reward


def test_rerun_skips_finished_stages_and_force_redoes_only_reward(tiny_run, tmp_path, caplog):
    recipe, out = tiny_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)  # keep the shared run untouched for the other tests
    caplog.set_level(logging.INFO, logger="rlhf")
    before = _mtimes(copy)

    assert run_in_process("run", recipe, f"output_dir={copy}") == 0
    log = caplog.text
    assert "stage sft: " in log and "stage reward: " in log and log.count("exists, skipping") == 2
    assert "starting" not in log
    after = _mtimes(copy)
    assert {k: v for k, v in after.items() if k != "recipe.yaml"} == {k: v for k, v in before.items()
                                                                     if k != "recipe.yaml"}

    caplog.clear()
    assert run_in_process("run", recipe, f"output_dir={copy}", "--force", "--only", "reward") == 0
    assert "stage reward (reward): starting" in caplog.text and "stage sft (sft): starting" not in caplog.text
    assert "resuming" not in caplog.text  # a forced stage starts from scratch
    forced = _mtimes(copy)
    sft_files = [k for k in before if k.startswith("sft/")]
    assert all(forced[k] == before[k] for k in sft_files)
    assert forced["reward/final/model.safetensors"] != before["reward/final/model.safetensors"]
    steps = [r["step"] for r in read_metrics(copy / "reward" / "metrics.jsonl") if "train/loss" in r]
    assert steps == [1, 2, 3, 4]  # a fresh metrics.jsonl, not appended to the old one
    assert json.loads((copy / "reward" / "metrics.json").read_text())["train/steps"] == 4


def test_lora_trains_and_final_is_merged(make_recipe, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    def edit(cfg):
        cfg["stages"]["sft"]["model"] = {"name": "tiny", "lora": {"r": 4}}
        cfg["stages"]["reward"]["model"] = {"name": "${output_dir}/sft/final", "lora": {"r": 4}}
        for stage in STAGES:
            cfg["stages"][stage]["train"].update(max_steps=3, learning_rate=1.0e-2)

    recipe = make_recipe(edit)
    assert run_in_process("run", recipe) == 0
    out = tmp_path / "out"
    for stage, auto in (("sft", AutoModelForCausalLM), ("reward", AutoModelForSequenceClassification)):
        final = out / stage / "final"
        assert not (final / "adapter_config.json").exists() and (final / "model.safetensors").exists()
        state = auto.from_pretrained(final).state_dict()
        assert not [k for k in state if "lora" in k]
    before = _untrained_tiny(yaml.safe_load(recipe.read_text())["seed"]).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out / "sft" / "final").state_dict()
    changed = _changed(before, after)
    # LoRA adapts the linear layers (GPT-2's Conv1D c_attn, c_proj, c_fc); the embeddings stay frozen.
    assert any("attn.c_attn.weight" in k for k in changed) and any("mlp.c_fc.weight" in k for k in changed)
    assert "transformer.wte.weight" not in changed
    summary = json.loads((out / "sft" / "metrics.json").read_text())
    assert summary["train/steps"] == 3 and summary["eval/loss"] < summary["eval/loss_before"]


def test_interrupted_stage_resumes_from_last_checkpoint(make_recipe, tmp_path, caplog):
    def edit(cfg):
        cfg["stages"]["sft"]["train"].update(max_steps=6, save_steps=2, save_total_limit=3)

    recipe = make_recipe(edit, stages=("sft",))
    stage = tmp_path / "out" / "sft"
    assert run_in_process("run", recipe) == 0
    complete = json.loads((stage / "metrics.json").read_text())
    assert sorted(p.name for p in (stage / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-2", "checkpoint-4", "checkpoint-6"]

    # Simulate a crash after step 4's checkpoint: no final/, no summary, no
    # later checkpoint, but metrics.jsonl already holds rows for steps 5 and 6.
    shutil.rmtree(stage / "final")
    shutil.rmtree(stage / "checkpoints" / "checkpoint-6")
    (stage / "metrics.json").unlink()

    caplog.set_level(logging.INFO, logger="rlhf")
    assert run_in_process("run", recipe) == 0
    assert f"resuming from {stage / 'checkpoints' / 'checkpoint-4'}" in caplog.text
    resumed = json.loads((stage / "metrics.json").read_text())
    assert resumed["train/steps"] == 6
    assert resumed["eval/loss_before"] == complete["eval/loss_before"]  # the untrained baseline is kept
    steps = [r["step"] for r in read_metrics(stage / "metrics.jsonl") if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # rows past the checkpoint were replaced, not duplicated
    assert (stage / "final" / "model.safetensors").exists()


@pytest.mark.parametrize("stage_name", ["sft", "reward"])
def test_crash_after_last_checkpoint_loads_it_without_training_on(make_recipe, tmp_path, stage_name):
    """A crash between the last step's checkpoint and final/: the rerun loads
    that checkpoint. transformers would resume it by training a step past
    max_steps (seen: train/steps 5 of 4)."""
    from safetensors.torch import load_file

    def edit(cfg):
        cfg["stages"][stage_name]["train"].update(max_steps=4, save_steps=2, save_total_limit=3)
        if stage_name == "reward":  # LoRA: the checkpoint holds adapters, final/ the merged model
            cfg["stages"]["reward"]["model"] = {"name": "${output_dir}/sft/final", "lora": {"r": 4, "alpha": 8}}

    recipe = make_recipe(edit)
    stage = tmp_path / "out" / stage_name
    assert run_in_process("run", recipe) == 0
    complete = load_file(stage / "final" / "model.safetensors")
    shutil.rmtree(stage / "final")
    (stage / "metrics.json").unlink()

    assert run_in_process("run", recipe) == 0
    summary = json.loads((stage / "metrics.json").read_text())
    assert summary["train/steps"] == 4
    assert not (stage / "checkpoints" / "checkpoint-5").exists()
    assert max(r["step"] for r in read_metrics(stage / "metrics.jsonl")) == 4
    reloaded = load_file(stage / "final" / "model.safetensors")
    assert reloaded.keys() == complete.keys()
    assert all(reloaded[k].equal(complete[k]) for k in complete)


def test_best_step_survives_an_interruption(make_recipe, tmp_path):
    """eval_every keeps the best evaluated step as final/; a crash after a later
    checkpoint must not forget it: the resumed run keeps the same step and weights."""
    from safetensors.torch import load_file

    def edit(cfg):
        cfg["stages"]["reward"].update(eval_every=2, model="tiny")
        # A learning rate high enough that held-out accuracy peaks early, then falls.
        cfg["stages"]["reward"]["train"].update(max_steps=8, save_steps=2, save_total_limit=4, learning_rate=0.05,
                                                lr_scheduler="constant", warmup=0.0)

    recipe = make_recipe(edit, stages=("reward",))
    stage = tmp_path / "out" / "reward"
    assert run_in_process("run", recipe) == 0
    complete = json.loads((stage / "metrics.json").read_text())
    weights = load_file(stage / "final" / "model.safetensors")
    assert complete["eval/best_step"] < 6, complete  # else the crash below would lose nothing
    assert (stage / "checkpoints" / "checkpoint-6" / "best_step.pt").is_file()

    shutil.rmtree(stage / "final")
    shutil.rmtree(stage / "checkpoints" / "checkpoint-8")
    (stage / "metrics.json").unlink()
    assert run_in_process("run", recipe) == 0
    resumed = json.loads((stage / "metrics.json").read_text())
    assert resumed["eval/best_step"] == complete["eval/best_step"]
    assert resumed["eval/accuracy"] == pytest.approx(complete["eval/accuracy"])
    again = load_file(stage / "final" / "model.safetensors")
    assert all(torch.equal(weights[k], again[k]) for k in weights)
