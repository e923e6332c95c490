"""Small helpers the image stages (gan, vae, diffusion) share: the optimisation
settings, a seeded batch stream, resumable state, and the end of a stage
(score samples with the shared metrics, pictures, curves, ``metrics.json``).

Each stage keeps its own training loop, readable top to bottom; these are
only the pieces that would otherwise be copied three times.
"""

from __future__ import annotations

import functools
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from rlhf.baselines import image_metrics as M
from rlhf.baselines.images import ImageData, ImageDataConfig, as_image_data, check_source, load_images, save_grid
from rlhf.config import opt, require_positive
from rlhf.errors import BadInput
from rlhf.tracking import MetricsLogger, read_metrics, write_summary

log = logging.getLogger(__name__)


@dataclass
class ImageTrainConfig:
    """How an image baseline optimises. Each stage subclasses it only to set its own
    defaults for ``steps`` and ``learning_rate`` (a recipe's partial ``train:``
    mapping is built on the class, so per-stage defaults must live there)."""

    steps: int = opt(2000, "optimiser steps")
    batch_size: int = opt(64, "images per step")
    learning_rate: float = opt(2e-4, "Adam learning rate")
    log_every: int = opt(50, "log losses to metrics.jsonl every N steps")
    eval_every: int = opt(0, "score a held-out-sized sample (Fréchet distance etc.) every N steps; 0 = only at the end")
    save_every: int = opt(0, "save resumable state every N steps (0 = never: an interrupted stage restarts)")
    max_seconds: float | None = opt(None, "wall-clock budget: stop after this many seconds (results then depend "
                                          "on the machine; metrics.json says train/budget: wall_clock); null: none")
    # Tiny convolutions gain nothing from more threads, and on a shared machine
    # OpenMP threads that wait for each other make a run several times slower.
    threads: int | None = opt(1, "torch CPU threads for this stage (null: leave torch's setting)")

    def check(self, fail):
        require_positive(self, fail, "steps", "batch_size", "log_every")
        for key in ("eval_every", "save_every"):
            if getattr(self, key) < 0:
                raise fail(key, f"expected 0 or a positive integer, got {getattr(self, key)}")
        # `not (...)`: NaN fails every comparison, so it is rejected too.
        if not 0 < self.learning_rate < float("inf"):
            raise fail("learning_rate", f"expected a finite number > 0, got {self.learning_rate}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise fail("max_seconds", f"expected > 0, got {self.max_seconds}")
        if self.threads is not None and self.threads < 1:
            raise fail("threads", f"expected a positive integer, got {self.threads}")


def budget_kind(train: ImageTrainConfig) -> str:
    """What ended training, for metrics.json: ``steps`` (reproducible), or a
    ``wall_clock`` budget (``max_seconds``: how far it got depends on the machine)."""
    return "steps" if train.max_seconds is None else "wall_clock"


def validate_data(data: str | ImageDataConfig, key: str, size_multiple: int = 1) -> None:
    """Check the image source without loading it; errors name the recipe ``key`` (e.g. stages.gan.data)."""
    cfg = as_image_data(data)
    try:
        check_source(cfg)
    except BadInput as e:
        raise BadInput(f"{key}: {e}") from None
    if cfg.image_size is not None and cfg.image_size % size_multiple:
        raise BadInput(f"{key}.image_size: {cfg.image_size} is not a multiple of {size_multiple}, which this "
                       "model needs")


def load_data(data: str | ImageDataConfig, seed: int, size_multiple: int = 1) -> ImageData:
    d = load_images(as_image_data(data), seed)
    h, w = d.shape[1:]
    if h != w or h % size_multiple:
        raise BadInput(f"image source '{as_image_data(data).source}': images are {h}x{w}; this model needs square "
                       f"images with a side that is a multiple of {size_multiple} (set image_size)")
    return d


def batches(x: torch.Tensor, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled mini-batches (a new permutation each epoch, the last
    partial batch dropped), drawn from ``gen``."""
    size = min(batch_size, len(x))
    while True:
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(order) - size + 1, size):
            yield x[order[i:i + size]]


def param_count(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


class Resumable:
    """Resumable training state in ``<stage>/checkpoints/state.pt``: model and
    optimizer state dicts, the step, the RNG states. Written to a temp file and
    renamed, so a crash mid-save keeps the previous one. (``final/`` is
    safetensors; this file is only ever read back with ``weights_only=True``.)"""

    def __init__(self, stage_dir: Path):
        self.dir = Path(stage_dir) / "checkpoints"
        self.path = self.dir / "state.pt"

    def save(self, step: int, objects: dict, gen: torch.Generator) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        state = {"step": step, "torch_rng": torch.get_rng_state(), "batch_rng": gen.get_state(),
                 **{name: obj.state_dict() for name, obj in objects.items()}}
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.path)

    def load(self, objects: dict, gen: torch.Generator) -> int:
        """Restores ``objects`` in place; returns the step to continue from (0: fresh start)."""
        if not self.path.is_file():
            return 0
        state = torch.load(self.path, weights_only=True)
        for name, obj in objects.items():
            obj.load_state_dict(state[name])
        torch.set_rng_state(state["torch_rng"])
        gen.set_state(state["batch_rng"])
        log.info("resumed from %s (step %d)", self.path, state["step"])
        return int(state["step"])

    def clear(self) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir)


def with_threads(train: Callable) -> Callable:
    """Runs a stage's ``train(cfg, ctx)`` with ``cfg.train.threads`` torch threads,
    restoring the previous count afterwards (later stages keep their setting)."""

    @functools.wraps(train)
    def wrapper(cfg, ctx):
        before = torch.get_num_threads()
        if cfg.train.threads is not None:
            torch.set_num_threads(cfg.train.threads)
        try:
            return train(cfg, ctx)
        finally:
            torch.set_num_threads(before)

    return wrapper


def save_final(stage_dir: Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` fills ``final.tmp``, which then becomes ``final`` (never half written)."""
    final = Path(stage_dir) / "final"
    tmp = final.with_name("final.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


# ---------------------------------------------------------------- the end of a stage


def plot_curves(stage_dir: Path, name: str) -> Path | None:
    """``curves_<name>.png`` from the stage's metrics.jsonl: one panel of losses,
    one of the Fréchet distance if it was scored during training (drawn by
    the eval report's plotter)."""
    from rlhf.evaluation.report import plot_curves as draw

    panels: dict[str, dict[str, list]] = {}
    for row in read_metrics(Path(stage_dir) / "metrics.jsonl"):
        step = row.get("step")
        for key, value in row.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                continue
            if key.startswith("train/") and key.endswith("loss"):
                panels.setdefault("Loss", {}).setdefault(key, []).append((step, float(value)))
            elif key == "eval/fd":
                panels.setdefault("Fréchet distance (lower is better)", {}).setdefault(key, []).append(
                    (step, float(value)))
    panels = {t: {k: v for k, v in s.items() if len(v) >= 2} for t, s in panels.items()}
    panels = {t: s for t, s in panels.items() if s}
    if not panels:
        return None
    return draw({name: panels}, Path(stage_dir))[0][1]


def save_nearest_train(samples: torch.Tensor, data: ImageData, path: Path, n: int = 16) -> Path:
    """Samples (top row of each pair) above their nearest training images: the memorisation check, by eye."""
    _, idx = M.nearest_neighbours(samples[:n], data.train)
    pairs = torch.stack([samples[:n], data.train[idx]], 1)  # (n, 2, c, h, w)
    rows = []
    for start in range(0, len(pairs), 8):
        chunk = pairs[start:start + 8]
        rows += [chunk[:, 0], chunk[:, 1]]
    return save_grid(torch.cat(rows), path, nrow=min(8, n))


def score_seeds(draw: Callable[[int], torch.Tensor], ref: M.RealReference, seed: int,
                seeds: int) -> tuple[torch.Tensor, dict[str, M.Interval], float]:
    """Draw ``seeds`` fresh sample sets (``draw(s)`` for s = seed, seed + 1, ...) and score each.

    Returns the first set (the pictures and ``samples.safetensors``), each
    metric's interval over the sets, and the first set's sampling seconds
    (comparable with one draw of n images)."""
    first, scores, sample_s = None, [], math.nan
    for i in range(seeds):
        t0 = time.time()
        samples = draw(seed + i)
        if i == 0:
            first, sample_s = samples, time.time() - t0
        scores.append(M.score(samples, ref))
    return first, M.summarise(scores), sample_s


def interval_keys(prefix: str, metrics: dict[str, M.Interval]) -> dict:
    """``{prefix}/{metric}`` = mean, ``..._low`` / ``..._high`` = its 95% interval (absent for one
    value), ``..._sd``, ``..._seeds`` = the per-seed values."""
    out = {}
    for key, iv in metrics.items():
        out[f"{prefix}/{key}"] = iv.mean
        if len(iv.values) > 1:
            out.update({f"{prefix}/{key}_low": iv.low, f"{prefix}/{key}_high": iv.high, f"{prefix}/{key}_sd": iv.sd,
                        f"{prefix}/{key}_seeds": list(iv.values)})
    return out


def finish(ctx, logger: MetricsLogger, ref: M.RealReference, draw: Callable[[int], torch.Tensor], step: int,
           summary: dict) -> dict:
    """Score ``ref.cfg.sampling_seeds`` fresh sample sets drawn by ``draw(seed)`` (n = held-out
    count, in [0, 1]), draw the pictures, write ``metrics.json`` and ``samples.safetensors``
    (the first set, for the comparison report).

    Returns the summary as written: ``image/*`` (the model: means and 95% intervals
    over sampling seeds), ``floor/*`` (held-out real images), ``noise/*`` (the
    trivial per-pixel Gaussian generator, same seeds), ``classifier/*`` and
    whatever the stage passed in ``summary``.
    """
    t0 = time.time()
    seeds = ref.cfg.sampling_seeds
    samples, scores, sample_s = score_seeds(draw, ref, ctx.seed, seeds)
    rows = M.reference_rows(ref, ctx.seed, seeds)
    out = dict(summary)
    out.update(interval_keys("image", scores))
    out["image/sampling_seeds"] = seeds
    out["image/interval"] = "t-based 95% CI of the mean over sampling seeds" if seeds > 1 else "none (one seed)"
    out["image/class_entropy_max"] = M.max_class_entropy(ref)
    out["perf/sample_s"] = sample_s
    out.update(interval_keys("floor", rows["real held-out (floor)"]))
    out.update(interval_keys("noise", rows["per-pixel Gaussian noise"]))
    out.update({"classifier/held_out_accuracy": ref.classifier.held_out_accuracy,
                "classifier/nets": len(ref.classifier.nets) or 1,
                "classifier/key": ref.classifier.key, "classifier/labels_from": ref.classifier.labels_from,
                "data/description": ref.data.description, "data/held_out": ref.n,
                "data/train": len(ref.data.train), "train/steps": step})
    out["perf/score_s"] = time.time() - t0
    if ctx.is_main:
        from safetensors.torch import save_file

        save_file({"images": samples.float().contiguous()}, ctx.stage_dir / "samples.safetensors")
        save_grid(samples[:64], ctx.stage_dir / "samples.png")
        save_nearest_train(samples, ref.data, ctx.stage_dir / "nearest_train.png")
        write_summary(ctx.stage_dir, out)
        logger.log({f"summary/{k}": v for k, v in out.items() if isinstance(v, (int, float))}, step=step)
        plot_curves(ctx.stage_dir, ctx.name)
    log.info("%s: Fréchet distance %.3f [%.3f, %.3f] over %d seeds (floor %.3f, noise %.3f), KID %.4f, "
             "precision %.3f, recall %.3f; scored in %.1fs", ctx.name, scores["fd"].mean, scores["fd"].low,
             scores["fd"].high, seeds, out["floor/fd"], out["noise/fd"], scores["kid"].mean,
             scores["precision"].mean, scores["recall"].mean, out["perf/score_s"])
    return out
