"""Preference tuning of the diffusion baseline (``type: diffusion_dpo``): the
Diffusion-DPO loss on hand-computed numbers, pair selection, intervals, the
reward guards, a tiny end-to-end run that must raise the reward on held-out
sampling seeds, bad recipes (exit 2, earlier outputs kept), and image pairs
through the labeling app: sample -> store -> page/API -> label -> export ->
the stage trains on them."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rlhf import recipe as recipe_mod
from rlhf.baselines import diffusion_pref as P
from rlhf.errors import BadInput
from rlhf.labeling.images import decode_image, encode_image

DATA = {"source": "digits", "max_images": 1000, "eval_fraction": 0.2}  # 800 train / 200 held-out
TARGET = 3


def _metrics(d: Path) -> dict:
    return {"classifier_epochs": 40, "classifier_nets": 1, "classifier_cache": str(d / "cache"), "sampling_seeds": 1,
            "kid_subsets": 5}


def _stages(d: Path) -> dict:
    return {
        "diffusion": {"type": "diffusion", "data": DATA, "metrics": _metrics(d), "sampling_steps": 10,
                      "unet": {"block_out_channels": [16, 32]}, "restoration": {"num_images": 0},
                      "train": {"steps": 500, "batch_size": 64, "learning_rate": 3e-3, "log_every": 50}},
        "dpo": {"type": "diffusion_dpo", "model": "${output_dir}/diffusion/final", "data": DATA,
                "metrics": _metrics(d), "reward": {"target_class": TARGET}, "sampling_steps": 10,
                "pairs": {"per_round": 64, "group_size": 4, "refresh_every": 20},
                "eval": {"seeds": 3},
                "train": {"steps": 100, "batch_size": 32, "learning_rate": 1e-4, "log_every": 10}},
    }


def _write(d: Path, stages: dict, seed: int = 0) -> Path:
    path = d / "recipe.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(d / "out"), "seed": seed, "stages": stages}, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> Path:
    """A tiny DDPM on 800 digits, then 100 Diffusion-DPO steps toward digit 3 (about 30 s on one thread)."""
    d = tmp_path_factory.mktemp("dpo")
    recipe = recipe_mod.load_recipe(_write(d, _stages(d)))
    recipe_mod.validate(recipe)
    recipe_mod.run(recipe)
    return d / "out"


# ---------------------------------------------------------------- pure math


def test_dpo_loss_on_hand_computed_numbers():
    # Pair 1: the model lowered its error on the winner by 0.1 (vs the reference), loser unchanged:
    #   z = -beta/2 * ((0.1 - 0.2) - (0.3 - 0.3)) = -5 * -0.1 = 0.5, loss = log(1 + e^-0.5) = 0.474077
    # Pair 2: the model got worse on the winner by 0.2 and better on the loser by 0.1:
    #   z = -5 * ((0.4 - 0.2) - (0.2 - 0.3)) = -5 * 0.3 = -1.5, loss = log(1 + e^1.5) = 1.701413
    loss, z = P.dpo_loss(torch.tensor([0.1, 0.4]), torch.tensor([0.3, 0.2]), torch.tensor([0.2, 0.2]),
                         torch.tensor([0.3, 0.3]), beta=10.0)
    assert z.tolist() == pytest.approx([0.5, -1.5])
    assert loss.item() == pytest.approx((0.474077 + 1.701413) / 2, abs=1e-5)
    # A model equal to the reference: z = 0, loss = log 2, whatever beta.
    same = torch.tensor([0.7])
    loss, z = P.dpo_loss(same, same * 2, same, same * 2, beta=5000.0)
    assert z.item() == 0 and loss.item() == pytest.approx(math.log(2))


def test_dpo_loss_gradient_lowers_the_winners_error():
    model_w = torch.tensor([0.5], requires_grad=True)
    model_l = torch.tensor([0.5], requires_grad=True)
    loss, _ = P.dpo_loss(model_w, model_l, torch.tensor([0.5]), torch.tensor([0.5]), beta=4.0)
    loss.backward()
    # d loss / d model_w = beta/2 * sigmoid(-z) = 2 * 0.5 = 1 at z = 0; the loser's is -1.
    assert model_w.grad.item() == pytest.approx(1.0) and model_l.grad.item() == pytest.approx(-1.0)


def test_best_worst_pairs():
    rewards = torch.tensor([1.0, 3.0, 2.0, 0.0,   5.0, 5.0, 5.0, 5.0,   0.0, -1.0, 4.0, 2.0,   9.0])
    win, lose = P.best_worst_pairs(rewards, 4)
    assert win.tolist() == [1, 10] and lose.tolist() == [3, 9]  # the tied group and the partial one dropped


# ---------------------------------------------------------------- rewards and images


def test_reward_function_guards():
    images = torch.rand(4, 1, 8, 8)
    ok = P.checked_reward(lambda x: x.mean((1, 2, 3)), "m:ok")
    assert ok(images).shape == (4,)
    cases = {
        "m:nan": (lambda x: torch.tensor([0.0, math.nan, 1.0, 2.0]), "returned 1 non-finite value(s) of 4"),
        "m:inf": (lambda x: torch.full((4,), -math.inf), "returned 4 non-finite value(s)"),
        "m:shape": (lambda x: torch.zeros(4, 2), "expected a float tensor of shape (4,), got shape (4, 2)"),
        "m:list": (lambda x: [0.0] * 4, "got list"),
        "m:raises": (lambda x: 1 / 0, "raised ZeroDivisionError"),
    }
    for name, (fn, message) in cases.items():
        with pytest.raises(BadInput, match=f"reward function '{name}'.*{message}".replace("(", r"\(").replace(
                ")", r"\)")):
            P.checked_reward(fn, name)(images)


def test_png_data_uri_round_trip():
    img = torch.rand(1, 8, 8)
    uri = encode_image(img)
    assert uri.startswith("data:image/png;base64,") and len(uri) < 400
    back = decode_image(uri, "x")
    assert back.shape == (1, 8, 8)
    assert (back - img).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit quantisation only
    rgb = decode_image(encode_image(torch.rand(3, 4, 4)), "x", channels=1)
    assert rgb.shape == (1, 4, 4)
    for bad, message in (("hello", "expected a PNG data URI"), ("data:image/png;base64,@@@", "not a readable PNG"),
                         ("data:image/png;base64,aGVsbG8=", "not a readable PNG")):
        with pytest.raises(BadInput, match=f"where: {message}"):
            decode_image(bad, "where")


# ---------------------------------------------------------------- the stage


def test_tuning_raises_the_reward_on_held_out_seeds(tuned):
    m = json.loads((tuned / "dpo" / "metrics.json").read_text())
    assert m["eval/held_out_seeds"] == "100000..100002" and m["eval/images_per_seed"] == 200
    assert m["reward/after"] > m["reward/before"]
    # The 95% interval of the per-seed gain excludes zero: a real improvement, not seed noise.
    assert m["reward/gain_low"] > 0, (m["reward/before"], m["reward/after"], m["reward/gain_low"])
    assert m["target_share/after"] > m["target_share/before"]
    for key in ("before/fd", "after/fd", "cost/fd", "cost/fd_low", "cost/fd_high", "reference/fd_real_at_share_after",
                "train/implicit_accuracy", "train/final_loss", "image/fd"):
        assert math.isfinite(m[key]), key
    assert m["cost/fd"] == pytest.approx(m["after/fd"] - m["before/fd"])
    assert m["train/implicit_accuracy"] > 0.5 and m["train/source"] == "reward"
    rows = [json.loads(line) for line in (tuned / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert sum("pairs/reward_mean" in r for r in rows) == 5  # 100 steps, fresh pairs every 20
    assert (tuned / "dpo" / "before_after.png").is_file()


def test_tuned_checkpoint_loads_like_the_diffusion_stage(tuned):
    from diffusers import DDPMPipeline

    from rlhf.baselines.diffusion import sample

    pipe = DDPMPipeline.from_pretrained(tuned / "dpo" / "final")
    a = sample(pipe.unet, pipe.scheduler.config, 4, seed=5, steps=3)
    base = DDPMPipeline.from_pretrained(tuned / "diffusion" / "final")
    b = sample(base.unet, base.scheduler.config, 4, seed=5, steps=3)
    assert a.shape == (4, 1, 8, 8) and not torch.equal(a, b)  # tuned weights, same format


def _cli(*args: str) -> int:
    from rlhf.cli import main

    return main(list(args))


@pytest.mark.parametrize("override,message", [
    ("stages.dpo.reward={}", "stages.dpo.reward: set reward.target_class or reward.function"),
    ("stages.dpo.reward={function: 'no_such_module_xyz:f'}", "stages.dpo.reward.function: reward function "
                                                              "'no_such_module_xyz:f': cannot import module"),
    ("stages.dpo.reward.function=m:f", "key 'stages.dpo.reward.function': give target_class or function, not both"),
    ("stages.dpo.reward.classifier_seed=0", "stages.dpo.reward.classifier_seed: 0 overlaps"),
    ("stages.dpo.model=/nonexistent/ckpt", "stages.dpo.model: '/nonexistent/ckpt' is neither"),
    ("stages.dpo.preferences=/nonexistent/prefs.jsonl", "stages.dpo.preferences: no such file"),
    ("stages.dpo.beta=0", "beta"),
    ("stages.dpo.pairs.group_size=1", "group_size"),
    ("stages.dpo.train.save_every=5", "key 'stages.dpo.train.save_every': not supported by diffusion_dpo"),
])
def test_bad_recipes_exit_2_naming_the_key(tmp_path, capsys, override, message):
    path = _write(tmp_path, _stages(tmp_path))
    assert _cli("validate", str(path), override) == 2
    assert message in capsys.readouterr().err


def test_a_misbehaving_reward_function_stops_the_run_and_keeps_earlier_outputs(tuned, tmp_path, capsys,
                                                                                monkeypatch):
    # Reuse the tuned run's diffusion checkpoint: a stage that fails must not touch it.
    (tmp_path / "bad_reward_mod.py").write_text(
        "import torch\n\ndef reward(images):\n    out = images.mean((1, 2, 3))\n    out[1] = float('nan')\n"
        "    return out\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    stages = _stages(tuned.parent)
    stages["dpo"]["model"] = str(tuned / "diffusion" / "final")
    stages["dpo"]["reward"] = {"function": "bad_reward_mod:reward"}
    before = sorted(p.name for p in (tuned / "diffusion" / "final").rglob("*"))
    path = _write(tmp_path, {"dpo": stages["dpo"]})
    assert _cli("run", str(path)) == 2
    err = capsys.readouterr().err
    assert "reward function 'bad_reward_mod:reward' returned 1 non-finite value(s)" in err
    assert sorted(p.name for p in (tuned / "diffusion" / "final").rglob("*")) == before
    assert not (tmp_path / "out" / "dpo" / "final").exists()
    # The same stage with a well-behaved function: it is the reward, measured before and after.
    (tmp_path / "good_reward_mod.py").write_text("def ink(images):\n    return images.mean((1, 2, 3))\n")
    stages["dpo"].update(reward={"function": "good_reward_mod:ink"}, eval={"seeds": 2},
                         train={"steps": 10, "batch_size": 16, "log_every": 5})
    assert _cli("run", str(_write(tmp_path, {"dpo": stages["dpo"]}))) == 0
    m = json.loads((tmp_path / "out" / "dpo" / "metrics.json").read_text())
    assert m["reward/name"] == "good_reward_mod:ink" and 0 < m["reward/before"] < 1 and "target_share/before" not in m
    assert math.isfinite(m["reward/gain"]) and m["train/source"] == "reward"


# ---------------------------------------------------------------- image pairs through the labeling app


def test_image_pairs_sampled_labeled_exported_and_trained_on(tuned, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from rlhf.baselines import image_metrics as M
    from rlhf.baselines import image_stage as S
    from rlhf.baselines.images import ImageDataConfig
    from rlhf.labeling.server import create_app
    from rlhf.labeling.store import Store

    db = f"sqlite:///{tmp_path / 'labels.db'}"
    ckpt = tuned / "diffusion" / "final"
    # 1. sample: 12 pairs of images from the diffusion checkpoint into a project.
    assert _cli("-q", "label", "pairs", "--db", db, "--project", "digits", "--diffusion", str(ckpt), "--count", "12",
                "--question", "Which image looks more like a 3?", "--sampling-steps", "5", "--seed", "1") == 0
    assert "12 added to project digits" in capsys.readouterr().out
    # 2. store + serve: the API hands out image pairs, marked as such, whose sides are PNG images.
    store = Store.open(db)
    project = store.project("digits")
    store.add_labeler(project, "ann", "tok-ann-" + "a" * 30)
    client = TestClient(create_app(store, project, allowed_hosts=["testserver"]))
    headers = {"Authorization": "Bearer tok-ann-" + "a" * 30}
    assert "renderImage" in client.get("/static/app.js").text  # the page can draw them
    # 3. label: a simulated person prefers the side the reward classifier finds more 3-like.
    metrics = M.ImageMetricsConfig(**{**_metrics(tuned.parent), "classifier_cache": str(tuned.parent / "cache")})
    reward, _ = P.load_reward(P.RewardConfig(target_class=TARGET), S.load_data(ImageDataConfig(**DATA), 0), metrics)
    pair, labeled = client.get("/api/next", headers=headers).json()["pair"], 0
    while pair is not None:
        assert pair["kind"] == "image" and pair["prompt"] == "Which image looks more like a 3?"
        a, b = (decode_image(pair[k], k) for k in ("response_a", "response_b"))
        assert a.shape == b.shape == (1, 8, 8)
        r = reward(torch.stack([a, b]))
        body = {"client_id": f"client-{pair['id']}", "pair_id": pair["id"], "choice": "A" if r[0] > r[1] else "B"}
        answer = client.post("/api/labels?next=true", headers=headers, json=body)
        assert answer.status_code == 201, answer.text
        pair, labeled = answer.json()["next"]["pair"], labeled + 1
    store.close()
    assert labeled == 12
    # 4. export: {prompt, chosen, rejected} with the images as PNG data URIs.
    prefs = tmp_path / "prefs.jsonl"
    assert _cli("-q", "label", "export", "--db", db, "--out", str(prefs)) == 0
    rows = [json.loads(line) for line in prefs.read_text().splitlines()]
    assert len(rows) == 12 and all(r["chosen"].startswith("data:image/png;base64,") for r in rows)
    chosen = torch.stack([decode_image(r["chosen"], "c") for r in rows])
    rejected = torch.stack([decode_image(r["rejected"], "r") for r in rows])
    assert (reward(chosen) > reward(rejected)).all()  # the labels went through in the right direction
    from_db = P.read_preferences(f"{db}?project=digits", 1, 8)  # or straight from the database
    assert torch.equal(torch.sort(from_db[0].flatten(1), 0).values, torch.sort(chosen.flatten(1), 0).values)
    # 5. the stage trains on people's labels instead of reward-ordered pairs.
    stages = _stages(tuned.parent)
    dpo = {**stages["dpo"], "model": str(ckpt), "preferences": str(prefs), "eval": {"seeds": 2},
           "train": {"steps": 30, "batch_size": 12, "learning_rate": 1e-4, "log_every": 10}}
    recipe = recipe_mod.load_recipe(_write(tmp_path, {"dpo": dpo}))
    recipe_mod.validate(recipe)
    recipe_mod.run(recipe)
    m = json.loads((tmp_path / "out" / "dpo" / "metrics.json").read_text())
    assert m["train/source"] == "preferences" and m["train/pairs"] == 12
    assert m["train/implicit_accuracy"] > 0.5  # it fitted the labeled pairs' direction
    assert math.isfinite(m["reward/gain"]) and math.isfinite(m["cost/fd"])


def test_bad_preference_files_name_the_record(tuned, tmp_path):
    for text, message in (('{"chosen": "hello", "rejected": "x"}', "prefs.jsonl:1: chosen: expected a PNG data URI"),
                          ('{"prompt": "q"}', "prefs.jsonl:1: expected 'chosen', a PNG data URI"),
                          (json.dumps({"chosen": encode_image(torch.rand(1, 4, 4)),
                                       "rejected": encode_image(torch.rand(1, 4, 4))}), "chosen is 4x4")):
        (tmp_path / "prefs.jsonl").write_text(text + "\n")
        with pytest.raises(BadInput, match=re.escape(message)):
            P.read_preferences(str(tmp_path / "prefs.jsonl"), 1, 8)


def test_image_pair_cli_bad_input(tuned, tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'labels.db'}"
    base = ["-q", "label", "pairs", "--db", db, "--project", "p"]
    for extra, message in ((["--diffusion", str(tmp_path)], ": not a diffusion checkpoint"),
                           (["--diffusion", str(tuned / "diffusion" / "final"), "--count", "0"], "--count 0"),
                           (["--diffusion", str(tuned / "diffusion" / "final"), "--responses", "3"],
                            "--responses 3: image items are pairs"),
                           (["--diffusion", str(tuned / "diffusion" / "final"), "--model", "tiny"],
                            "--model: not used with --diffusion")):
        assert _cli(*base, *extra) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "labels.db").exists()  # nothing was written


def test_a_class_the_classifier_does_not_have_exits_2(tuned, tmp_path, capsys):
    stages = _stages(tuned.parent)
    dpo = {**stages["dpo"], "model": str(tuned / "diffusion" / "final"), "reward": {"target_class": 10}}
    assert _cli("run", str(_write(tmp_path, {"dpo": dpo}))) == 2
    assert ("stages.dpo.reward.target_class: 10, but the classifier of this data has 10 classes (labels: 0..9)"
            in capsys.readouterr().err)
    assert not (tmp_path / "out" / "dpo" / "final").exists()


def test_training_seeds_avoid_the_held_out_ones():
    gen = torch.Generator().manual_seed(0)
    first = P.training_seed(gen, range(0))
    gen = torch.Generator().manual_seed(0)
    assert P.training_seed(gen, range(first, first + 1)) != first  # redrawn, never a held-out seed


def test_schema_describes_the_stage(capsys):
    assert _cli("schema", "diffusion_dpo") == 0
    out = capsys.readouterr().out
    for key in ("model:", "reward:", "target_class:", "function:", "preferences:", "beta:", "refresh_every:",
                "seeds:"):
        assert key in out, key


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
