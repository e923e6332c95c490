"""GAN baseline (``type: gan``): a DCGAN with the stabilisers small GANs need.

DCGAN (Radford et al. 2016, https://arxiv.org/abs/1511.06434): a generator
of transposed convolutions with batch norm and ReLU, a strided-convolution
discriminator with LeakyReLU(0.2), Adam(beta1 0.5; lr 5e-4 here, which SN tolerates). On top:

- spectral normalisation of every discriminator layer (Miyato et al. 2018,
  https://arxiv.org/abs/1802.05957) instead of its batch norm: bounds D's
  Lipschitz constant, the single most effective fix for D overpowering G;
- the non-saturating generator loss -log D(G(z)) (Goodfellow et al. 2014,
  Sec. 3): strong gradients while G is still bad;
- optional one-sided label smoothing (Salimans et al. 2016,
  https://arxiv.org/abs/1606.03498), off by default (SN makes it unneeded);
- an exponential moving average of the generator's weights, used for every
  sample and for ``final/`` (Yazici et al. 2019, https://arxiv.org/abs/1806.04498):
  averages out the oscillation of the adversarial game.

Both losses are logged (``train/d_loss``, ``train/g_loss``) with D's mean
output on real and fake images. ``final/generator`` and
``final/discriminator`` load with ``Generator.from_pretrained`` /
``Discriminator.from_pretrained`` (diffusers ``ModelMixin``, safetensors).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from rlhf.baselines import image_metrics as M
from rlhf.baselines import image_stage as S
from rlhf.baselines.images import ImageDataConfig, save_grid
from rlhf.config import opt, require_positive
from rlhf.tracking import MetricsLogger

log = logging.getLogger(__name__)


class Generator(ModelMixin, ConfigMixin):
    """z (b, latent_dim) -> images (b, channels, size, size) in [-1, 1]."""

    @register_to_config
    def __init__(self, latent_dim: int = 32, channels: int = 1, image_size: int = 8, width: int = 32):
        super().__init__()
        self.start = image_size // 4  # two stride-2 upsamplings reach image_size
        self.project = nn.Sequential(nn.Linear(latent_dim, 2 * width * self.start ** 2, bias=False),
                                     nn.Unflatten(1, (2 * width, self.start, self.start)),
                                     nn.BatchNorm2d(2 * width), nn.ReLU())
        self.up = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.ConvTranspose2d(width, channels, 4, 2, 1), nn.Tanh())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.up(self.project(z))

    @torch.no_grad()
    def sample(self, n: int, seed: int, batch_size: int = 512) -> torch.Tensor:
        """``n`` images in [0, 1] from latents drawn with ``seed``: same seed, same images."""
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.config.latent_dim, generator=gen)
        was_training = self.training
        self.eval()
        out = torch.cat([self(z[i:i + batch_size]) for i in range(0, n, batch_size)])
        self.train(was_training)
        return (out + 1) / 2


class Discriminator(ModelMixin, ConfigMixin):
    """images (b, channels, size, size) in [-1, 1] -> one logit each (b,)."""

    @register_to_config
    def __init__(self, channels: int = 1, image_size: int = 8, width: int = 32, spectral_norm: bool = True):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda m: m)
        self.net = nn.Sequential(
            sn(nn.Conv2d(channels, width, 4, 2, 1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(width, 2 * width, 4, 2, 1)), nn.LeakyReLU(0.2),
            nn.Flatten(), sn(nn.Linear(2 * width * (image_size // 4) ** 2, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


@dataclass
class GanArchitecture:
    """Generator and discriminator shapes."""

    latent_dim: int = opt(32, "size of the generator's input noise z")
    width: int = opt(32, "base channel count of both networks")
    spectral_norm: bool = opt(True, "spectral normalisation on every discriminator layer (Miyato et al. 2018)")

    def check(self, fail):
        require_positive(self, fail, "latent_dim", "width")


@dataclass
class GanTrainConfig(S.ImageTrainConfig):
    """Optimisation, with the GAN's defaults."""

    steps: int = opt(2000, "optimiser steps (each: one discriminator and one generator update)")
    learning_rate: float = opt(5e-4, "Adam learning rate of both networks")


@dataclass
class Config:
    """GAN stage."""

    data: str | ImageDataConfig = opt("digits", "images: digits, an IDX file, an image folder or a hub dataset "
                                                "(or an ImageDataConfig mapping)")
    gan: GanArchitecture = opt(GanArchitecture(), "network shapes")
    train: GanTrainConfig = opt(GanTrainConfig(), "optimisation")
    beta1: float = opt(0.5, "Adam beta1 for both networks (DCGAN: 0.5)")
    label_smoothing: float = opt(0.0, "one-sided: real targets are 1 - this (Salimans et al. 2016)")
    ema_decay: float = opt(0.99, "generator weight EMA for samples and final/ (0: no averaging)")
    metrics: M.ImageMetricsConfig = opt(M.ImageMetricsConfig(), "shared image metrics")

    def check(self, fail):
        if not 0.0 <= self.beta1 < 1.0:
            raise fail("beta1", f"expected a number in [0, 1), got {self.beta1}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise fail("label_smoothing", f"expected a number in [0, 0.5), got {self.label_smoothing}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise fail("ema_decay", f"expected a number in [0, 1), got {self.ema_decay}")


def validate(cfg: Config, ctx) -> None:
    S.validate_data(cfg.data, f"stages.{ctx.name}.data", size_multiple=4)


def adversarial_step(G, D, opt_g, opt_d, real: torch.Tensor, z: torch.Tensor, label_smoothing: float) -> dict:
    """One discriminator step, then one generator step; returns the losses and D's mean outputs."""
    bce = nn.functional.binary_cross_entropy_with_logits
    # 1. discriminator: real -> 1 (smoothed), fake -> 0
    fake = G(z)
    d_real, d_fake = D(real), D(fake.detach())
    d_loss = bce(d_real, torch.full_like(d_real, 1.0 - label_smoothing)) + bce(d_fake, torch.zeros_like(d_fake))
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    # 2. generator: non-saturating, -log D(G(z))
    d_gen = D(fake)
    g_loss = bce(d_gen, torch.ones_like(d_gen))
    opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    opt_g.step()
    return {"train/d_loss": d_loss.item(), "train/g_loss": g_loss.item(),
            "train/d_real": torch.sigmoid(d_real).mean().item(), "train/d_fake": torch.sigmoid(d_fake).mean().item()}


def latent_walk(G: nn.Module, latent_dim: int, seed: int, path: Path) -> None:
    """A grid whose rows interpolate between two random z (how smooth the generator's space is)."""
    ends = torch.randn(2, 8, latent_dim, generator=torch.Generator().manual_seed(seed))
    alphas = torch.linspace(0, 1, 8)[:, None, None]
    walk = ((1 - alphas) * ends[0] + alphas * ends[1]).transpose(0, 1).reshape(-1, latent_dim)
    G.eval()
    with torch.no_grad():
        save_grid((G(walk) + 1) / 2, path, nrow=8)


@S.with_threads
def train(cfg: Config, ctx) -> Path:
    data = S.load_data(cfg.data, ctx.seed, size_multiple=4)
    channels, size = data.shape[0], data.shape[1]
    ref = M.real_reference(data, cfg.metrics, ctx.seed)

    torch.manual_seed(ctx.seed)
    G = Generator(cfg.gan.latent_dim, channels, size, cfg.gan.width)
    D = Discriminator(channels, size, cfg.gan.width, cfg.gan.spectral_norm)
    # The EMA copy averages weights *and* batch-norm statistics.
    ema = AveragedModel(G, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True) \
        if cfg.ema_decay > 0 else None
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.train.learning_rate, betas=(cfg.beta1, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.train.learning_rate, betas=(cfg.beta1, 0.999))

    gen = torch.Generator().manual_seed(ctx.seed)
    state = S.Resumable(ctx.stage_dir)
    objects = {"G": G, "D": D, "opt_g": opt_g, "opt_d": opt_d, **({"ema": ema} if ema is not None else {})}
    start = state.load(objects, gen)
    logger = MetricsLogger(ctx.stage_dir, ctx.name, ctx.report_to, enabled=ctx.is_main,
                           project=ctx.recipe.run.wandb_project)
    logger.truncate_after(start)
    sampler = lambda: (ema.module if ema is not None else G)  # noqa: E731
    stream = S.batches(data.train, cfg.train.batch_size, gen)
    t0 = time.time()
    step = start
    bar = tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps, desc=f"{ctx.name} (gan)",
               disable=not ctx.is_main, dynamic_ncols=True)
    for step in bar:
        real = next(stream) * 2 - 1  # [0, 1] -> [-1, 1], the generator's tanh range
        # 1-2. a discriminator step, then a generator step
        row = adversarial_step(G, D, opt_g, opt_d, real, torch.randn(len(real), cfg.gan.latent_dim),
                               cfg.label_smoothing)

        # 3. weight averaging
        if ema is not None:
            ema.update_parameters(G)

        # 4. log
        if (step + 1) % cfg.train.log_every == 0 or step == start:
            row["perf/steps_per_s"] = (step + 1 - start) / (time.time() - t0)
            logger.log(row, step=step + 1)
            bar.set_postfix(d=f"{row['train/d_loss']:.3f}", g=f"{row['train/g_loss']:.3f}")
        if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0:
            scores = M.score(sampler().sample(ref.n, ctx.seed), ref)
            logger.log({f"eval/{k}": v for k, v in scores.items()}, step=step + 1)
        if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0 and ctx.is_main:
            state.save(step + 1, objects, gen)
        if cfg.train.max_seconds is not None and time.time() - t0 >= cfg.train.max_seconds:
            log.info("%s: time budget of %.0fs reached at step %d", ctx.name, cfg.train.max_seconds, step + 1)
            break
    bar.close()
    train_s = time.time() - t0
    steps_done = step + 1 if cfg.train.steps > start else start

    G_final = sampler()
    summary = {"train/budget": S.budget_kind(cfg.train),
               "model/params": S.param_count(G), "model/params_discriminator": S.param_count(D),
               "perf/train_s": train_s, "perf/steps_per_s": (steps_done - start) / max(train_s, 1e-9)}
    S.finish(ctx, logger, ref, lambda seed: G_final.sample(ref.n, seed), steps_done, summary)
    if ctx.is_main:
        latent_walk(G_final, cfg.gan.latent_dim, ctx.seed + 1, ctx.stage_dir / "latent_walk.png")

        def write(tmp: Path):
            G_final.save_pretrained(tmp / "generator")
            D.save_pretrained(tmp / "discriminator")

        S.save_final(ctx.stage_dir, write)
        state.clear()
    logger.close()
    return ctx.stage_dir / "final"
