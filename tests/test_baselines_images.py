"""Image baselines: each stage trains a few steps on a tiny slice of the digits and
its loss falls; sampling is deterministic (same seed, same images; DDIM with
eta = 0 is a function of the initial noise); checkpoints reload from
safetensors; the comparison report gathers everything, with the floor and the
trivial baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from rlhf import recipe as recipe_mod
from rlhf.tracking import read_metrics

DATA = {"source": "digits", "max_images": 240, "eval_fraction": 0.25}  # 180 train / 60 held-out


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> Path:
    """gan, vae, diffusion (restoring beside the vae) and the report, a few dozen steps each."""
    d = tmp_path_factory.mktemp("images")
    metrics = {"classifier_epochs": 2, "classifier_cache": str(d / "cache"), "sampling_seeds": 2}
    train = {"steps": 40, "batch_size": 32, "log_every": 1, "eval_every": 20, "threads": 1}
    stages = {
        "gan": {"type": "gan", "data": DATA, "gan": {"width": 16}, "metrics": metrics,
                "train": {**train, "learning_rate": 5e-4}},
        "vae": {"type": "vae", "data": DATA, "metrics": metrics, "train": {**train, "learning_rate": 2e-3}},
        "diffusion": {"type": "diffusion", "data": DATA, "metrics": metrics, "sampling_steps": 4,
                      "unet": {"block_out_channels": [8, 16]}, "train": {**train, "learning_rate": 2e-3},
                      "restoration": {"num_images": 4, "inpaint_steps": 6, "jump_length": 2, "jump_n_sample": 2,
                                      "vae": "${output_dir}/vae/final"}},
        "report": {"type": "baseline_report", "image_stages": ["gan", "vae", "diffusion"]},
    }
    path = d / "recipe.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(d / "out"), "seed": 1, "stages": stages}, sort_keys=False))
    recipe = recipe_mod.load_recipe(path)
    recipe_mod.validate(recipe)
    recipe_mod.run(recipe)
    return d / "out"


def _series(stage_dir: Path, key: str) -> list[float]:
    return [r[key] for r in read_metrics(stage_dir / "metrics.jsonl") if key in r]


def _falls(values: list[float], k: int = 5) -> bool:
    return sum(values[-k:]) / k < sum(values[:k]) / k


@pytest.mark.parametrize("stage,key", [("gan", "train/d_loss"), ("vae", "train/loss"), ("diffusion", "train/loss")])
def test_each_image_baseline_loss_falls(image_run, stage, key):
    values = _series(image_run / stage, key)
    assert len(values) == 40
    assert _falls(values), f"{stage} {key}: {values[:5]} ... {values[-5:]}"
    if stage == "gan":
        assert _series(image_run / stage, "train/g_loss"), "both GAN losses are logged"


@pytest.mark.parametrize("stage", ["gan", "vae", "diffusion"])
def test_stage_outputs_and_shared_metrics(image_run, stage):
    d = image_run / stage
    m = json.loads((d / "metrics.json").read_text())
    assert m["train/budget"] == "steps"  # the step budget, not a wall-clock one
    for prefix in ("image", "floor", "noise"):
        for key in ("fd", "kid", "fd_classifier", "precision", "recall", "class_entropy", "nn_distance",
                    "near_copy_rate", "feature_copy_rate"):
            assert f"{prefix}/{key}" in m, f"{prefix}/{key}"
    assert 0 <= m["image/precision"] <= 1 and 0 <= m["image/recall"] <= 1
    # Every model metric over 2 sampling seeds (fresh sample sets): the mean inside its 95% interval.
    assert m["image/sampling_seeds"] == 2 and len(m["image/fd_seeds"]) == 2
    assert m["image/fd_seeds"][0] != m["image/fd_seeds"][1]
    for prefix in ("image", "noise"):
        assert m[f"{prefix}/fd_low"] <= m[f"{prefix}/fd"] <= m[f"{prefix}/fd_high"]
        assert m[f"{prefix}/fd"] == pytest.approx(sum(m[f"{prefix}/fd_seeds"]) / 2)
    assert "floor/fd_low" not in m  # one fixed set of held-out images: no interval
    assert m["classifier/nets"] == 3
    assert m["floor/near_copy_rate"] == pytest.approx(0.05, abs=0.02)  # calibrated on held-out images
    assert m["model/params"] > 0 and m["perf/train_s"] > 0 and m["data/held_out"] == 60
    for picture in ("samples.png", "nearest_train.png", f"curves_{stage}.png"):
        assert (d / picture).is_file(), picture
    assert _series(d, "eval/fd"), "Fréchet distance logged during training"
    files = [p for p in (d / "final").rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert not any(p.suffix in (".bin", ".pt", ".pth", ".ckpt") for p in files)
    assert not (d / "checkpoints").exists()  # resumable state is dropped once final/ exists


def test_vae_and_diffusion_pictures_and_restoration_scores(image_run):
    for picture in ("reconstructions.png", "interpolations.png", "variations.png"):
        assert (image_run / "vae" / picture).is_file()
    d = image_run / "diffusion"
    assert (d / "restoration_denoise.png").is_file() and (d / "restoration_inpaint.png").is_file()
    m = json.loads((d / "metrics.json").read_text())
    for task in ("denoise", "inpaint"):
        for method in ("input", "diffusion", "vae"):
            assert f"restore/{task}/{method}_psnr" in m and f"restore/{task}/{method}_ssim" in m
    # RePaint keeps every observed pixel: outside the hole the result is the clean image.
    assert m["restore/inpaint/diffusion_psnr"] > m["restore/inpaint/diffusion_hole_psnr"]


def test_report_gathers_tables_floor_and_pictures(image_run):
    d = image_run / "report"
    data = json.loads((d / "metrics.json").read_text())
    kinds = [r["kind"] for r in data["images"]]
    assert kinds == ["model", "model", "model", "floor", "trivial"]
    assert {r["method"] for r in data["restoration"]} == {"corrupted input", "diffusion", "VAE reconstruction"}
    md = (d / "report.md").read_text()
    assert "real held-out images (floor)" in md and "per-pixel Gaussian noise (trivial)" in md
    # Intervals in the table, and the order of the models stated in words, ties named as ties.
    gan = data["images"][0]
    assert gan["fd_low"] <= gan["fd"] <= gan["fd_high"] and set(gan["indistinguishable"]) >= {"fd", "kid"}
    assert " ± " in md and "FD (lower is better), models best first: " in md
    for key, name in (("fd", "FD"), ("kid", "KID")):
        line = next(x for x in md.splitlines() if x.startswith(f"- {name} (lower is better)"))
        ties = [(a["model"], b) for a in data["images"][:3] for b in a["indistinguishable"][key]
                if b in ("gan", "vae", "diffusion") and a["model"] < b]
        for a, b in ties:
            assert f"{a} and {b}" in line or f"{b} and {a}" in line, line
        assert ("Not distinguishable: " in line) == bool(ties) != ("Every pair of models is distinguishable" in line)
    page = (d / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 8 and "Restoration" in page
    assert (d / "comparison.png").is_file() and (d / "final").is_dir()


def test_checkpoints_reload_and_sampling_is_deterministic(image_run):
    from diffusers import DDPMPipeline

    from rlhf.baselines import diffusion
    from rlhf.baselines.gan import Generator
    from rlhf.baselines.vae import ConvVAE

    g = Generator.from_pretrained(image_run / "gan" / "final" / "generator")
    assert torch.equal(g.sample(6, seed=3), g.sample(6, seed=3))
    assert not torch.equal(g.sample(6, seed=3), g.sample(6, seed=4))
    vae = ConvVAE.from_pretrained(image_run / "vae" / "final")
    assert torch.equal(vae.sample(6, seed=3), vae.sample(6, seed=3))

    pipe = DDPMPipeline.from_pretrained(image_run / "diffusion" / "final")
    unet, config = pipe.unet.eval(), pipe.scheduler.config
    a = diffusion.sample(unet, config, 4, seed=3, steps=4)
    assert torch.equal(a, diffusion.sample(unet, config, 4, seed=3, steps=4))
    assert not torch.equal(a, diffusion.sample(unet, config, 4, seed=5, steps=4))
    # DDIM with eta = 0: the initial noise alone decides the image; the step generator is unused.
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x1 = diffusion.ddim_sample(unet, config, noise, 4, eta=0.0, generator=torch.Generator().manual_seed(1))
    x2 = diffusion.ddim_sample(unet, config, noise, 4, eta=0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(x1, x2)
    y1 = diffusion.ddim_sample(unet, config, noise, 4, eta=1.0, generator=torch.Generator().manual_seed(1))
    y2 = diffusion.ddim_sample(unet, config, noise, 4, eta=1.0, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(y1, y2)


def test_interrupted_stage_resumes(tmp_path, monkeypatch):
    """save_every writes resumable state; a re-run continues from it and logs no step twice."""
    import shutil
    from types import SimpleNamespace

    from rlhf.baselines import image_stage as S
    from rlhf.baselines import vae as vae_mod

    metrics = {"classifier_epochs": 1, "classifier_cache": str(tmp_path / "cache")}
    stage = {"type": "vae", "data": DATA, "metrics": metrics,
             "train": {"steps": 6, "batch_size": 16, "log_every": 1, "save_every": 3, "threads": 1}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "seed": 0, "stages": {"vae": stage}}))
    d = tmp_path / "out" / "vae"

    # An interrupted run: 3 steps, state saved at step 3, then it dies before final/ is written.
    recipe = recipe_mod.load_recipe(path, ["stages.vae.train.steps=3"])
    d.mkdir(parents=True)
    with monkeypatch.context() as m:
        m.setattr(S.Resumable, "clear", lambda self: None)
        vae_mod.train(recipe.stages[0].config, SimpleNamespace(stage_dir=d, name="vae", seed=0, is_main=True,
                                                               report_to=[], recipe=recipe))
    shutil.rmtree(d / "final")
    assert S.Resumable(d).path.is_file()

    recipe_mod.run(recipe_mod.load_recipe(path))  # 6 steps: continues at step 4
    steps = [r["step"] for r in read_metrics(d / "metrics.jsonl") if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert json.loads((d / "metrics.json").read_text())["train/steps"] == 6
    assert not S.Resumable(d).path.exists() and (d / "final").is_dir()
