"""PPO under faults and the guarantees the loop is built on: non-finite
rewards, resume/interrupt bookkeeping, stop strings, seeds, precision,
micro-batching, and one reward-model reading for every consumer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import ppo_rewards
from conftest import OFFLINE_ENV, REPO
from rlhf import recipe as recipe_mod
from rlhf.errors import RunFailed

PROMPTS = REPO / "data" / "quickstart" / "prompts_train.jsonl"


def _recipe(out: Path, seed: int = 7, **ppo) -> Path:
    stage = {
        "type": "ppo", "model": "tiny", "reward": "ppo_rewards:count_letter_e", "value_model": "policy_head",
        "data": {"path": str(PROMPTS)}, "steps": 4, "rollout_batch_size": 8, "num_minibatches": 2,
        "micro_batch_size": 4, "ppo_epochs": 2, "learning_rate": 1e-3, "generation": {"max_new_tokens": 8},
        "sample_every": 1, "save_every": 0,
    }
    stage.update(ppo)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(out), "seed": seed, "stages": {"ppo": stage}}))
    return path


def _run(path: Path, *overrides: str):
    return recipe_mod.run(recipe_mod.load_recipe(path, list(overrides)))


def _rows(out: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(x) for x in (out / "ppo" / name).read_text().splitlines()]


def _weights_finite(final: Path) -> bool:
    from safetensors.torch import load_file

    return all(torch.isfinite(t).all() for t in load_file(final / "model.safetensors").values())


# ---------------------------------------------------------------- non-finite rewards


def test_one_nan_reward_skips_that_step_and_the_run_finishes_finite(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(ppo_rewards, "NAN_CALLS", {2})
    monkeypatch.setitem(ppo_rewards.CALLS, "n", 0)
    out = tmp_path / "run"
    _run(_recipe(out, reward="ppo_rewards:nan_on_some_calls", save_every=1))
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["ppo/skipped_steps"] for r in rows] == [0, 1, 1, 1]
    assert "ppo/policy_loss" not in rows[1] and "ppo/policy_loss" in rows[2]  # no update at step 2
    assert all(v == v for r in rows for k, v in r.items()
               if isinstance(v, float) and k != "ppo/explained_variance")  # no NaN logged (NaN != NaN)
    assert json.loads((out / "ppo" / "metrics.json").read_text())["ppo/skipped_steps"] == 1
    assert _weights_finite(out / "ppo" / "final")
    assert any("nan_on_some_calls" in m and "step 2" in m for m in caplog.messages), caplog.messages


def test_consecutive_nan_rewards_stop_the_run_and_the_last_good_checkpoint_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(ppo_rewards, "NAN_CALLS", {3, 4})
    monkeypatch.setitem(ppo_rewards.CALLS, "n", 0)
    out = tmp_path / "run"
    path = _recipe(out, reward="ppo_rewards:nan_on_some_calls", save_every=1, max_consecutive_skips=2, steps=5)
    with pytest.raises(RunFailed, match="2 consecutive steps skipped.*nan_on_some_calls"):
        _run(path)
    ckpts = sorted(p.name for p in (out / "ppo" / "checkpoints").glob("step-*"))
    assert ckpts == ["step-3"]  # saved after the skipped step 3 (weights unchanged, finite); none after 4
    assert not (out / "ppo" / "final").exists()
    monkeypatch.setattr(ppo_rewards, "NAN_CALLS", set())
    _run(path)  # resumes at step 3
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4, 5]
    assert _weights_finite(out / "ppo" / "final")


def test_cli_exit_code_1_and_one_line_for_a_diverged_run(tmp_path):
    out = tmp_path / "run"
    path = _recipe(out, reward="ppo_rewards:always_nan", max_consecutive_skips=1, steps=2)
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run([sys.executable, "-m", "rlhf", "run", str(path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "always_nan" in proc.stderr and "non-finite" in proc.stderr


# ---------------------------------------------------------------- resume and interrupt bookkeeping


def test_crash_before_any_checkpoint_restarts_logs_instead_of_duplicating(tmp_path, monkeypatch):
    from rlhf.ppo import trainer

    out = tmp_path / "run"
    path = _recipe(out)
    real_log = trainer.log_step

    def crash_at_step_3(run, step, *a, **kw):
        if step == 2:
            raise RuntimeError("simulated crash")
        return real_log(run, step, *a, **kw)

    monkeypatch.setattr(trainer, "log_step", crash_at_step_3)
    with pytest.raises(RuntimeError):
        _run(path)
    assert [r["step"] for r in _rows(out)] == [1, 2]
    monkeypatch.setattr(trainer, "log_step", real_log)
    _run(path)
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4]
    assert [r["step"] for r in _rows(out, "samples.jsonl")] == sorted(r["step"] for r in _rows(out, "samples.jsonl"))
    assert len({(r["step"], r["prompt"], r["response"]) for r in _rows(out, "samples.jsonl")}) == \
        len(_rows(out, "samples.jsonl"))


def test_sigint_saves_a_checkpoint_and_the_rerun_resumes(tmp_path):
    out = tmp_path / "run"
    path = _recipe(out, steps=400, rollout_batch_size=4, num_minibatches=1, micro_batch_size=4, ppo_epochs=1,
                   sample_every=1000)
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.Popen([sys.executable, "-m", "rlhf", "run", str(path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = out / "ppo" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 130, stderr[-2000:]
    saved = [int(p.name.split("-")[1]) for p in (out / "ppo" / "checkpoints").glob("step-*")]
    assert len(saved) == 1 and saved[0] == len(_rows(out)) >= 3
    _run(path, "stages.ppo.steps=" + str(saved[0] + 2))
    assert [r["step"] for r in _rows(out)] == list(range(1, saved[0] + 3))


# ---------------------------------------------------------------- stop strings, seeds, precision


def test_stop_string_spanning_several_tokens_ends_the_mask():
    from rlhf.models import ModelConfig, load_tokenizer
    from rlhf.sampling import end_responses

    tok = load_tokenizer(ModelConfig(name="tiny"))
    stop = " the end"
    assert len(tok(stop, add_special_tokens=False)["input_ids"]) > 1  # several tokens
    body = tok("a fine film, the end", add_special_tokens=False)["input_ids"]
    tail = tok(" and more words", add_special_tokens=False)["input_ids"]
    pads = [tok.pad_token_id] * 3
    unfinished = tok("no stop here at all", add_special_tokens=False)["input_ids"]
    width = max(len(body + pads), len(body + tail), len(unfinished))
    rows = [body + pads, body + tail, unfinished]
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    out, mask, finished = end_responses(tok, ids, [stop])
    assert mask.sum(1).tolist() == [len(body), len(body), width]
    assert finished.tolist() == [True, True, False]
    assert (out[0, len(body):] == tok.pad_token_id).all() and (out[1, len(body):] == tok.pad_token_id).all()
    assert tok.decode(out[1][mask[1]]).endswith("the end")


def _tiny_reward_checkpoint(path: Path) -> Path:
    from rlhf.models import ModelConfig, load_sequence_classifier, load_tokenizer, save_checkpoint

    tok = load_tokenizer(ModelConfig(name="tiny"))
    save_checkpoint(load_sequence_classifier(ModelConfig(name="tiny"), tok, seed=3), tok, path)
    return path


def test_loading_a_model_does_not_touch_the_global_rng():
    from rlhf.models import ModelConfig, load_causal_lm, load_sequence_classifier, load_tokenizer

    tok = load_tokenizer(ModelConfig(name="tiny"))
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    load_causal_lm(ModelConfig(name="tiny"), tok, seed=0)
    load_sequence_classifier(ModelConfig(name="tiny"), tok)
    assert torch.equal(torch.rand(3), expected)


def test_the_recipe_seed_decides_ppo_samples_with_a_reward_model(tmp_path):
    reward = _tiny_reward_checkpoint(tmp_path / "rm")
    texts = {}
    for seed in (42, 1234):
        out = tmp_path / f"s{seed}"
        _run(_recipe(out, seed=seed, reward=str(reward), steps=1, value_model="reward"))
        texts[seed] = [r["response"] for r in _rows(out, "samples.jsonl")]
    assert texts[42] != texts[1234]


def test_bf16_autocast_kl_is_zero_when_policy_equals_reference(tmp_path):
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no CPU bf16 autocast")
    out = tmp_path / "run"
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(Path(__file__).parent)}
    # A fresh process: Accelerate's precision is fixed for the life of a process.
    proc = subprocess.run([sys.executable, "-m", "rlhf", "run", str(_recipe(out, steps=1, precision="bf16",
                                                                             value_model="reward"))],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _rows(out)[0]["objective/kl"] == 0.0


def test_precision_auto_is_bf16_on_cpus_with_bf16_instructions_for_ppo_only(monkeypatch):
    from rlhf import precision

    intel = "processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni\n"
    assert precision.has_bf16_flag(intel)
    assert precision.has_bf16_flag(intel.replace("avx512_bf16", "amx_bf16 amx_tile"))
    assert not precision.has_bf16_flag(intel.replace("avx512_bf16", "avx512bw"))
    assert not precision.has_bf16_flag("processor\t: 0\nFeatures\t: fp asimd\n")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for has, want in ((True, True), (False, False)):
        monkeypatch.setattr(precision, "cpu_has_bf16", lambda has=has: has)
        assert precision.precision_flags("auto", cpu_bf16=True) == {"bf16": want, "fp16": False}
        # The TRL stages (SFT, reward, DPO) do not opt in: fp32 on every CPU.
        assert precision.precision_flags("auto") == {"bf16": False, "fp16": False}
        assert precision.precision_flags("fp32", cpu_bf16=True) == {"bf16": False, "fp16": False}
        assert precision.precision_flags("bf16") == {"bf16": True, "fp16": False}


def _sdpa_kernels(tokens: int, dtype: torch.dtype, bf16_run: bool) -> set[str]:
    from torch.profiler import profile

    from rlhf.precision import training_attention

    q = torch.randn(2, 2, tokens, 8, dtype=dtype, requires_grad=True)
    with training_attention(torch.device("cpu"), bf16_run, tokens), profile() as prof:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    return {e.key for e in prof.key_averages() if "attention" in e.key or e.key == "aten::bmm"}


def test_short_bf16_cpu_training_uses_the_math_attention_kernel():
    short = _sdpa_kernels(48, torch.bfloat16, bf16_run=True)
    assert "aten::bmm" in short and not any("flash" in k for k in short), short
    # Long sequences and fp32 runs keep torch's own (fused) choice.
    assert any("flash" in k for k in _sdpa_kernels(300, torch.bfloat16, bf16_run=True))
    assert any("flash" in k for k in _sdpa_kernels(48, torch.float32, bf16_run=False))


def test_fused_tanh_gelu_computes_the_models_own_activation():
    from transformers.activations import GELUTanh, NewGELUActivation

    from rlhf.models import ModelConfig, load_causal_lm, load_tokenizer
    from rlhf.precision import fuse_tanh_gelu

    tok = load_tokenizer(ModelConfig(name="tiny"))
    model = load_causal_lm(ModelConfig(name="tiny"), tok, seed=0).eval()
    ids = torch.randint(0, len(tok), (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    count = sum(type(m) is NewGELUActivation for m in model.modules())
    assert count == model.config.n_layer > 0
    assert fuse_tanh_gelu(model) == count
    assert not any(type(m) is NewGELUActivation for m in model.modules())
    assert sum(type(m) is GELUTanh for m in model.modules()) == count
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-5)  # rounding apart, the same function


def test_ppo_stages_in_different_precisions_run_in_one_process(tmp_path):
    # Accelerate keeps one precision per process and refuses a second one;
    # the PPO stage starts its state afresh when the precision changes.
    out = tmp_path / "run"
    path = _recipe(out, steps=1)
    doc = yaml.safe_load(path.read_text())
    first = {**doc["stages"]["ppo"], "precision": "fp32"}
    doc["stages"] = {"fp32": first, "bf16": {**first, "precision": "bf16"}, "again": first}
    path.write_text(yaml.safe_dump(doc))
    _run(path)
    for name in ("fp32", "bf16", "again"):
        assert (out / name / "final" / "model.safetensors").exists()
        assert json.loads((out / name / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1


def test_attention_dropout_is_switched_off():
    from rlhf.ppo.trainer import _disable_dropout

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(attention_dropout=0.1)
            self.attention_dropout = 0.1
            self.drop = torch.nn.Dropout(0.1)

    m = Attn()
    _disable_dropout(m)
    assert m.attention_dropout == 0.0 and m.config.attention_dropout == 0.0 and m.drop.p == 0.0


# ---------------------------------------------------------------- micro-batching is a memory setting only


def test_minibatch_gradient_does_not_depend_on_micro_batch_size():
    from accelerate import Accelerator

    from rlhf.models import ModelConfig, load_causal_lm, load_tokenizer
    from rlhf.ppo.policy import PolicyAndValue
    from rlhf.ppo.trainer import Config, Rollout, UpdateStats, _minibatch_step

    tok = load_tokenizer(ModelConfig(name="tiny"))
    model = PolicyAndValue(load_causal_lm(ModelConfig(name="tiny"), tok, seed=0), None)
    torch.nn.init.normal_(model.value_head.weight, std=0.1)
    b, q, r = 8, 5, 7
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 100, (b, q + r), generator=g)
    # Unequal response lengths: a per-micro-batch token mean would weight them wrongly.
    lengths = torch.tensor([1, 7, 3, 7, 2, 5, 7, 4])
    response_mask = torch.arange(r).unsqueeze(0) < lengths.unsqueeze(1)
    with torch.no_grad():
        lp, values, _ = model(input_ids, torch.ones_like(input_ids), q, 1.0)
    ro = Rollout([], [], input_ids, torch.ones_like(input_ids), q, response_mask, torch.ones(b, dtype=torch.bool),
                 lp + 0.05 * torch.randn(b, r, generator=g), lp, values, torch.zeros(b), torch.zeros(b), {},
                 advantages=torch.randn(b, r, generator=g) * response_mask,
                 returns=torch.randn(b, r, generator=g) * response_mask)
    grads = {}
    for micro in (8, 2):
        cfg = Config(reward="x:y", rollout_batch_size=8, num_minibatches=1, micro_batch_size=micro,
                     max_grad_norm=0.0, entropy_coef=0.01)
        acc = Accelerator(cpu=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        run = SimpleNamespace(cfg=cfg, accelerator=acc, model=model, optimizer=opt,
                              scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0))
        _minibatch_step(run, ro, torch.arange(b), UpdateStats())
        grads[micro] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    rel = (grads[8] - grads[2]).norm() / grads[8].norm()
    assert rel < 1e-6, rel


# ---------------------------------------------------------------- one reading of the reward model


def test_every_consumer_scores_a_long_response_as_the_reward_stage_did(tmp_path):
    """The reward stage's held-out evaluation, PPO's reward source and eval's
    pairwise scoring read a (prompt, response) longer than the stage's
    max_length identically: the reading settings travel with the checkpoint."""
    from conftest import tiny_recipe_dict, write_recipe

    from rlhf.evaluation.runner import pairwise_scores
    from rlhf.models import ModelConfig, load_sequence_classifier, load_tokenizer
    from rlhf.rewards import CombinedReward, RewardSpec, read_settings, score_ids, tokenize_pairs

    out = tmp_path / "run"
    cfg = tiny_recipe_dict(out, stages=("reward",))
    cfg["stages"]["reward"].update(model="tiny", max_length=24)
    cfg["stages"]["reward"]["train"].update(max_steps=1)
    _run(write_recipe(tmp_path / "r.yaml", cfg))
    final = out / "reward" / "final"
    assert read_settings(final).max_length == 24

    prompt = "This movie is " + "very " * 40
    row = {"prompt": prompt, "chosen": "a wonderful film, " * 5, "rejected": "dull " * 12}
    tok = load_tokenizer(ModelConfig(name=str(final)))
    model = load_sequence_classifier(ModelConfig(name=str(final)), tok).eval()
    pairs, stats = tokenize_pairs([row], tok, 24)  # exactly the stage's own held-out path
    assert stats.prompt_truncated == 2
    stage = score_ids(model, [pairs[0]["chosen_ids"], pairs[0]["rejected_ids"]], tok.pad_token_id).tolist()

    source = CombinedReward([RewardSpec(source=str(final))])  # PPO's and eval's reward source
    assert source([prompt, prompt], [row["chosen"], row["rejected"]]) == pytest.approx(stage, abs=1e-6)
    chosen, rejected, trunc = pairwise_scores(source, [row])  # eval's pairwise accuracy
    assert [chosen[0], rejected[0]] == pytest.approx(stage, abs=1e-6) and trunc["prompt_truncated"] == 2
