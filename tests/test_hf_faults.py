"""SFT and reward stages (HF Trainer) under a non-finite loss: the run stops
with one clear line (exit 1), no final/ and no checkpoint from NaN weights."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import run_in_process, tiny_recipe_dict, write_recipe


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_nan_loss_stops_the_stage_and_keeps_only_finite_checkpoints(tmp_path, monkeypatch, capsys, stage):
    import trl

    trainer_cls = trl.SFTTrainer if stage == "sft" else trl.RewardTrainer
    real = trainer_cls.compute_loss
    calls = {"n": 0}

    def poisoned(self, model, inputs, *a, **kw):
        out = real(self, model, inputs, *a, **kw)
        calls["n"] += 1
        if calls["n"] >= 3 and self.model.training:  # from the third training step on
            loss = out[0] if isinstance(out, tuple) else out
            loss = loss * float("nan")
            return (loss, *out[1:]) if isinstance(out, tuple) else loss
        return out

    monkeypatch.setattr(trainer_cls, "compute_loss", poisoned)
    cfg = tiny_recipe_dict(tmp_path / "out", ("sft", "reward"))
    cfg["stages"][stage]["train"].update(max_steps=6, logging_steps=1, save_steps=1)
    path = write_recipe(tmp_path / "r.yaml", cfg)
    if stage == "reward":  # SFT first, unpoisoned
        monkeypatch.setattr(trainer_cls, "compute_loss", real)
        from rlhf import recipe as recipe_mod

        recipe_mod.run(recipe_mod.load_recipe(path), only=["sft"])
        monkeypatch.setattr(trainer_cls, "compute_loss", poisoned)
    assert run_in_process("run", path) == 1
    err = capsys.readouterr().err
    assert re.search(rf"{stage}: training diverged: (the training loss is nan|weight \S+ is non-finite) at step [23] ",
                     err), err[-700:]
    assert err.strip().splitlines()[-1].startswith("error: ")  # one line, last, for the user
    out = tmp_path / "out" / stage
    assert not (out / "final").exists()
    from safetensors.torch import load_file

    saved = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert saved and max(int(p.name.split("-")[1]) for p in saved) <= 2
    for ckpt in saved:
        weights = load_file(ckpt / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values())


def test_reward_stage_reports_data_problems_per_split(tmp_path, caplog):
    """Invalid pairs dropped, pairs made identical by truncation and responses
    cut before their EOS: counted per split, in metrics.json and the log."""
    import json

    from conftest import QUICKSTART
    from rlhf import recipe as recipe_mod

    base = [json.loads(x) for x in (QUICKSTART / "prefs_train.jsonl").read_text().splitlines()[:24]]
    long = " ".join(["wonderful"] * 80)
    same_start = {"prompt": "Review:", "chosen": long + " and great", "rejected": long + " but awful"}
    invalid = {"prompt": "Review:", "chosen": "same", "rejected": "same"}
    train, held = base[:16] + [same_start, invalid, invalid], base[16:] + [same_start, invalid]
    for name, rows in (("train.jsonl", train), ("held.jsonl", held)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_recipe_dict(tmp_path / "out", ("sft", "reward"))
    cfg["stages"]["reward"]["data"] = {"path": str(tmp_path / "train.jsonl"), "eval_path": str(tmp_path / "held.jsonl"),
                                       "on_invalid": "drop"}
    cfg["stages"]["reward"]["max_length"] = 32
    recipe_mod.run(recipe_mod.load_recipe(write_recipe(tmp_path / "r.yaml", cfg)))
    m = json.loads((tmp_path / "out" / "reward" / "metrics.json").read_text())
    assert (m["data/train_dropped_invalid"], m["data/eval_dropped_invalid"]) == (2, 1)
    assert (m["data/train_identical_after_truncation"], m["data/eval_identical_after_truncation"]) == (1, 1)
    assert m["data/train_response_truncated"] >= 2 and m["data/eval_response_truncated"] >= 2
    assert m["eval/pairs"] == 9  # 8 valid + the forced tie: every kept pair is scored
    assert "held-out: 9 pairs kept, 1 invalid dropped" in caplog.text
    assert "1 pairs became identical after truncation" in caplog.text


def test_added_tokens_get_the_same_rows_on_every_load(tmp_path):
    """A token the checkpoint lacks (SmolLM2's GGUF gets a pad token) gets a
    seeded new embedding row: a resumed LoRA stage, whose checkpoints hold the
    adapters only, rebuilds the row the interrupted run trained with, whatever
    the caller's RNG state, and loading does not move that RNG."""
    from rlhf.models import ModelConfig, load_causal_lm, load_tokenizer, save_checkpoint

    tok = load_tokenizer(ModelConfig("tiny"))
    save_checkpoint(load_causal_lm(ModelConfig("tiny"), tok, seed=0), tok, tmp_path / "base")
    tok.add_special_tokens({"additional_special_tokens": ["<|new|>"]})
    rows = []
    for noise in (1, 2):
        torch.manual_seed(noise)
        before = torch.get_rng_state()
        model = load_causal_lm(ModelConfig(str(tmp_path / "base")), tok, seed=5)
        assert torch.equal(torch.get_rng_state(), before)
        assert model.get_input_embeddings().num_embeddings == len(tok)
        rows.append(model.get_input_embeddings().weight[-1].detach().clone())
    assert torch.equal(rows[0], rows[1])
