"""Real-model recipes run end to end offline: hub models swapped for the tiny preset, hub
datasets for the local fixtures in tests/fixtures/hub/, hub reward classifiers for a
tiny 2-label encoder classifier; every stage runs a couple of steps.

Also: the pieces those recipes need (a classifier reward with its own tokenizer,
HH prompts taken from `chosen`, hub reward ids in validation, pkg:// model names).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from conftest import REPO
from helpers.offline import swap_offline
from tiny_classifier import make_tiny_classifier

from rlhf import recipe as recipe_mod
from rlhf.data import Record, normalize_prompts
from rlhf.errors import BadInput
from rlhf.evaluation.runner import EvalData, as_data
from rlhf.models import ModelConfig, load_tokenizer, resolve_name
from rlhf.rewards import RewardSpec, check_source

REAL_RECIPES = ["gpt2-imdb.yaml", "smollm2-hh.yaml", "tldr-1b.yaml"]


@pytest.fixture(scope="module")
def sentiment_classifier(tmp_path_factory) -> str:
    """Stand-in for lvwerra/distilbert-imdb: 2 labels, WordPiece tokenizer without EOS."""
    return str(make_tiny_classifier(tmp_path_factory.mktemp("classifier")))


def shrink(stage) -> None:
    """Cut a stage to a couple of steps on a handful of records, in place."""
    cfg = stage.config
    if stage.type in ("sft", "reward"):
        cfg.train = dataclasses.replace(cfg.train, max_steps=2, batch_size=2, grad_accum=1, eval_batch_size=4,
                                        logging_steps=1, save_steps=100, warmup=0.0)
        cfg.data.max_samples, cfg.data.max_eval_samples = 8, 4
    elif stage.type == "ppo":
        for key, value in dict(steps=2, rollout_batch_size=4, num_minibatches=1, micro_batch_size=2,
                               forward_batch_size=4, ppo_epochs=1, save_every=0, sample_every=1).items():
            setattr(cfg, key, value)
        cfg.data.max_samples = 8
        cfg.generation.max_new_tokens = 8
        cfg.eval.max_prompts, cfg.eval.batch_size = 4, 4
    elif stage.type == "eval":
        cfg.generation = dataclasses.replace(cfg.generation, max_new_tokens=8, samples_per_prompt=1, batch_size=4)
        cfg.bootstrap_samples = 100
        for key in ("prompts", "text", "preferences"):
            if getattr(cfg, key) is not None:
                setattr(cfg, key, dataclasses.replace(as_data(getattr(cfg, key)), max_samples=4))


@pytest.mark.parametrize("name", REAL_RECIPES)
def test_real_recipe_runs_offline(name, tmp_path, monkeypatch, sentiment_classifier):
    monkeypatch.chdir(REPO)  # recipes name bundled data relative to the repo root
    out = tmp_path / "out"
    recipe = recipe_mod.load_recipe(REPO / "recipes" / name, [f"output_dir={out}"])
    for stage in recipe.stages:
        swap_offline(stage.config, out, reward_stand_in=sentiment_classifier)
        shrink(stage)
    results = recipe_mod.run(recipe)

    assert list(results) == [s.name for s in recipe.stages]
    for stage in recipe.stages:
        assert (out / stage.name / "final").is_dir(), stage.name
    ppo = json.loads((out / "ppo" / "metrics.json").read_text())
    assert ppo["train/steps"] == 2 and ppo["dist/world_size"] == 1
    rows = [json.loads(x) for x in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["objective/scores"] == r["objective/scores"] for r in rows)  # not NaN
    evaluated = json.loads((out / "eval" / "metrics.json").read_text())
    assert {"sft", "ppo"} <= set(evaluated)
    if name == "gpt2-imdb.yaml":  # the classifier reward, through PPO and eval
        assert "reward/sentiment" in evaluated["ppo"] and "gold" in evaluated["ppo"]
    else:
        assert evaluated["rm"]["kind"] == "reward_source" and evaluated["rm"]["pairs"] == 4


@pytest.mark.parametrize("name", ["smollm2-hh.yaml", "tldr-1b.yaml"])
def test_encoder_reward_variant_runs_offline(name, tmp_path, monkeypatch):
    """The encoder-RM variant each recipe's header gives (stages.reward.model=<a
    DeBERTa-v3 id>), with a tiny BERT standing in: the reward model reads
    (prompt, response) pairs with its own tokenizer, PPO puts the value head on
    the policy (an encoder cannot be the value model), and eval scores through it."""
    from tiny_bert import make_tiny_bert

    header = (REPO / "recipes" / name).read_text().split("\noutput_dir:")[0]
    assert "stages.reward.model=microsoft/deberta-v3" in header
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    bert = make_tiny_bert(tmp_path / "bert")
    recipe = recipe_mod.load_recipe(REPO / "recipes" / name, [f"output_dir={out}", f"stages.reward.model={bert}",
                                                              "stages.reward.max_length=128"])
    for stage in recipe.stages:
        swap_offline(stage.config, out)
        shrink(stage)
    recipe_mod.run(recipe)
    reading = json.loads((out / "reward" / "final" / "reward_config.json").read_text())
    assert reading["text_pair"] is True
    evaluated = json.loads((out / "eval" / "metrics.json").read_text())
    assert evaluated["rm"]["kind"] == "reward_source" and evaluated["rm"]["pairs"] == 4
    assert "reward/rm" in evaluated["ppo"]


# ------------------------------------------------------------ classifier rewards


def test_classifier_reward_uses_its_label_and_own_tokenizer(sentiment_classifier):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.rewards import RewardModel

    rm = RewardModel(sentiment_classifier, label=1)
    assert rm.tokenizer.eos_token is None and rm.model.config.num_labels == 2  # kept as trained
    ids = rm.encode("This movie", " was great fun")
    assert rm.tokenizer.convert_ids_to_tokens([ids[0], ids[-1]]) == ["[CLS]", "[SEP]"]
    # The score is exactly the classifier's logit of output 1 on prompt + response.
    tok = AutoTokenizer.from_pretrained(sentiment_classifier)
    model = AutoModelForSequenceClassification.from_pretrained(sentiment_classifier).eval()
    texts = ["This movie was great fun", "I watched it and it was awful"]
    with torch.no_grad():
        expected = model(**tok(texts, return_tensors="pt", padding=True)).logits[:, 1]
    got = rm(["This movie", "I watched it"], [" was great fun", " and it was awful"])
    assert got == pytest.approx(expected.tolist(), abs=1e-5)
    negative = RewardModel(sentiment_classifier, label=0)(["This movie"], [" was great fun"])
    assert negative[0] != pytest.approx(got[0])


def test_classifier_label_out_of_range(sentiment_classifier):
    from rlhf.rewards import RewardModel

    with pytest.raises(BadInput, match="label 2 out of range"):
        RewardModel(sentiment_classifier, label=2)


def test_reward_spec_label_rules():
    from rlhf.config import build

    spec = build(RewardSpec, {"source": "lvwerra/distilbert-imdb", "label": 1, "revision": "refs/pr/5"})
    assert spec.label == 1 and spec.revision == "refs/pr/5"
    with pytest.raises(BadInput, match="label.*applies to checkpoint sources only"):
        build(RewardSpec, {"source": "rlhf.gold:vader_sentiment", "label": 1})
    with pytest.raises(BadInput, match="expected an output index >= 0"):
        build(RewardSpec, {"source": "a/b", "label": -1})


def test_hub_reward_ids_pass_validation_local_paths_do_not():
    check_source("lvwerra/distilbert-imdb")  # checked when it loads (users' machines download it)
    for bad in ("/no/such/rm", "./rm", "runs/x/reward/final"):
        with pytest.raises(BadInput, match="no such checkpoint directory"):
            check_source(bad)


# ------------------------------------------------------------ data, model names


def test_hh_prompts_come_from_chosen():
    transcript = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Name a color.\n\nAssistant: Blue."
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    prompts = normalize_prompts([Record({"chosen": transcript, "rejected": "x"}, "f:1"),
                                 Record({"chosen": chat, "rejected": chat}, "f:2"),
                                 Record({"prompt": "p", "chosen": transcript}, "f:3")])
    assert prompts == ["\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Name a color.\n\nAssistant:",
                       chat[:1], "p"]
    with pytest.raises(BadInput, match="f:4: without a 'prompt' field, 'chosen' must be an Anthropic-HH"):
        normalize_prompts([Record({"chosen": "no turns here"}, "f:4")])


def test_hh_fixture_feeds_every_stage():
    from rlhf.data import normalize_preferences, normalize_sft, read_records

    path = str(REPO / "tests/fixtures/hub/Anthropic__hh-rlhf.jsonl")
    prompts = normalize_prompts(read_records(path))
    pairs, _ = normalize_preferences(read_records(path))
    assert [p["prompt"] for p in pairs] == prompts
    assert all(p.endswith("\n\nAssistant:") for p in prompts)
    assert all("text" in r for r in normalize_sft(read_records(path, columns={"text": "chosen"})))
    assert as_data("x").path == "x" and isinstance(as_data("x"), EvalData)


def test_package_model_names_resolve_without_import(tmp_path, monkeypatch):
    import sys

    pkg = tmp_path / "fake_weights_pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_name("pkg://fake_weights_pkg") == str(pkg)
    assert resolve_name("pkg://fake_weights_pkg/sub") == str(pkg / "sub")
    assert "fake_weights_pkg" not in sys.modules
    assert resolve_name("gpt2") == "gpt2" and resolve_name("runs/x") == "runs/x"
    with pytest.raises(BadInput, match="Python package 'no_such_pkg_xyz' is not installed"):
        resolve_name("pkg://no_such_pkg_xyz")
    with pytest.raises(BadInput, match="no directory"):
        resolve_name("pkg://fake_weights_pkg/missing")
    with pytest.raises(BadInput, match="GGUF file 'nope.gguf' not found"):
        load_tokenizer(ModelConfig(name="pkg://fake_weights_pkg", gguf_file="nope.gguf"))


def test_real_recipes_have_sizing_comments():
    for name in REAL_RECIPES + ["smollm2-135m-quickstart.yaml"]:
        head = (REPO / "recipes" / name).read_text().split("\noutput_dir:")[0].lower()
        for word in ("hardware", "memory", "time", "rlhf run"):
            assert word in head, f"{name}: comment block lacks {word!r}"
