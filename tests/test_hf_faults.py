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
