"""PPO stage smoke tests on the tiny preset: learning, invariants, resume, LoRA, two processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf import recipe as recipe_mod

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def _recipe(tmp_path: Path, **ppo) -> Path:
    stage = {
        "type": "ppo", "model": "tiny", "reward": "ppo_rewards:count_letter_e", "value_model": "policy_head",
        "data": {"path": str(ROOT / "data/quickstart/prompts_train.jsonl")},
        "steps": 4, "rollout_batch_size": 16, "num_minibatches": 2, "micro_batch_size": 4, "ppo_epochs": 2,
        "learning_rate": 1e-3, "generation": {"max_new_tokens": 12}, "sample_every": 2,
    }
    stage.update(ppo)
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "seed": 7, "stages": {"ppo": stage}}))
    return path


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]


def _run(path: Path, *overrides: str):
    return recipe_mod.run(recipe_mod.load_recipe(path, list(overrides)))


def test_trivial_reward_rises_and_first_minibatch_ratio_is_one(tmp_path):
    _run(_recipe(tmp_path, steps=25, learning_rate=3e-3))
    rows = _rows(tmp_path / "run")
    assert len(rows) == 25
    # docs/ppo.md invariant: the first minibatch of the first epoch sees the policy
    # that sampled the data, so ratio == 1, approx_kl == 0, clipfrac == 0.
    for r in rows:
        assert r["ppo/first_minibatch_ratio"] == pytest.approx(1.0, abs=1e-5)
        assert r["ppo/first_minibatch_approx_kl"] == pytest.approx(0.0, abs=1e-8)
        assert r["ppo/first_minibatch_clipfrac"] == 0.0
    first = sum(r["objective/scores"] for r in rows[:3]) / 3
    last = sum(r["objective/scores"] for r in rows[-3:]) / 3
    assert last > first + 0.5, (first, last)  # seen: 1.26 -> 2.9
    for key in ("ppo/policy_loss", "ppo/value_loss", "ppo/approx_kl", "ppo/clipfrac", "ppo/value_clipfrac",
                "ppo/entropy", "objective/kl", "objective/kl_coef", "objective/scores", "objective/rlhf_reward",
                "rollout/response_length", "rollout/eos_rate", "perf/generation_s", "perf/samples_per_s",
                "train/learning_rate"):
        assert key in rows[0], key
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at step 1
    assert rows[-1]["train/learning_rate"] < rows[0]["train/learning_rate"]  # linear annealing
    final = tmp_path / "run" / "ppo" / "final"
    assert (final / "model.safetensors").exists() and (final / "tokenizer.json").exists()
    assert (tmp_path / "run" / "ppo" / "samples.jsonl").exists()


def assert_resume_matches(tmp_path, monkeypatch, **settings) -> None:
    """A run crashed right after its step-2 checkpoint and resumed logs the
    same rows, step for step, as one that ran through (the timings aside)."""
    from rlhf.ppo import trainer

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    full.mkdir(), resumed.mkdir()
    _run(_recipe(full, steps=4, save_every=2, **settings))
    real_save = trainer._save_state

    def crash_after_save(run, step):
        real_save(run, step)
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(trainer, "_save_state", crash_after_save)
    path = _recipe(resumed, steps=4, save_every=2, **settings)
    with pytest.raises(KeyboardInterrupt):
        _run(path)
    assert not (resumed / "run" / "ppo" / "final").exists()
    assert (resumed / "run" / "ppo" / "checkpoints" / "step-2").is_dir()
    monkeypatch.setattr(trainer, "_save_state", real_save)
    _run(path)

    a, b = _rows(full / "run"), _rows(resumed / "run")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key, va in ra.items():
            if key.startswith("perf/") or key == "time":
                continue
            assert rb[key] == pytest.approx(va, rel=1e-5, abs=1e-6), (ra["step"], key)


def test_resume_matches_uninterrupted_run(tmp_path, monkeypatch):
    assert_resume_matches(tmp_path, monkeypatch, kl={"adaptive": True, "target": 1.0, "horizon": 100})


def test_lora_policy_uses_adapters_off_reference(tmp_path):
    _run(_recipe(tmp_path, steps=2, model={"name": "tiny", "lora": {"r": 4, "alpha": 8}},
                 eval={"prompts": str(ROOT / "data/quickstart/prompts_test.jsonl"),
                       "gold": "rlhf.gold:vader_sentiment", "max_prompts": 8}))
    rows = _rows(tmp_path / "run")
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    summary = json.loads((tmp_path / "run" / "ppo" / "metrics.json").read_text())
    assert {"gold/sft", "gold/ppo", "kl/ppo"} <= set(summary)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "ppo" / "final")
    assert not any("lora" in n for n, _ in model.named_parameters())  # merged


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_torchrun(tmp_path):
    path = _recipe(tmp_path, steps=2, rollout_batch_size=8, micro_batch_size=4)
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "rlhf", "run", str(path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "ppo" / "metrics.json").read_text())
    assert summary["dist/world_size"] == 2  # two ranks really ran
    assert summary["train/episodes"] == 2 * 8 * 2
    rows = _rows(tmp_path / "run")
    assert len(rows) == 2  # only the main process logged
    assert (tmp_path / "run" / "ppo" / "final" / "model.safetensors").exists()


