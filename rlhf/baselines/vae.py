"""VAE baseline (``type: vae``): a convolutional variational autoencoder with a beta option.

Kingma & Welling 2014 (https://arxiv.org/abs/1312.6114): an encoder gives
q(z|x) = N(mu, diag(exp(logvar))), a decoder gives Bernoulli pixel logits
p(x|z), trained on the negative ELBO per image (nats)

    loss = reconstruction + beta * KL(q(z|x) || N(0, I))
         = BCE(logits, x) summed over pixels + beta * 0.5 * sum(mu^2 + exp(logvar) - 1 - logvar)

with the reparameterisation z = mu + exp(logvar / 2) * eps. beta > 1 is the
beta-VAE (Higgins et al. 2017, https://openreview.net/forum?id=Sy2fzU9gl):
smoother, more disentangled latents at the cost of blurrier reconstructions.
Grey levels in [0, 1] are treated as Bernoulli probabilities, as in the
original paper's MNIST experiments (``likelihood: gaussian`` instead uses a
fixed-std Gaussian: sharper reconstructions, worse samples on the digits).

What a VAE is for here is the latent space: besides samples (decoded
z ~ N(0, I)), the stage draws reconstructions of held-out images,
interpolations between two held-out images (linear in latent means), and
variations of a given image (decoded z ~ q(z|x), ``variation_scale`` times its
std). ``final/`` loads with ``ConvVAE.from_pretrained`` (diffusers
``ModelMixin``, safetensors); the diffusion stage uses it to reconstruct
corrupted images beside its own restorations.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn
from tqdm.auto import tqdm

from rlhf.baselines import image_metrics as M
from rlhf.baselines import image_stage as S
from rlhf.baselines.images import ImageDataConfig, save_grid
from rlhf.config import opt, require_positive
from rlhf.tracking import MetricsLogger

log = logging.getLogger(__name__)


class ConvVAE(ModelMixin, ConfigMixin):
    """Images in [0, 1], Shape (b, channels, size, size) <-> latents (b, latent_dim)."""

    @register_to_config
    def __init__(self, channels: int = 1, image_size: int = 8, latent_dim: int = 16, width: int = 32):
        super().__init__()
        s = image_size // 4  # after two stride-2 convolutions
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.ReLU(),
            nn.Flatten(), nn.Linear(2 * width * s * s, 2 * latent_dim))
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, 2 * width * s * s), nn.ReLU(), nn.Unflatten(1, (2 * width, s, s)),
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(width, channels, 4, 2, 1))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> mu, logvar, each (b, latent_dim)."""
        mu, logvar = self.encoder(x * 2 - 1).chunk(2, dim=1)
        return mu, logvar.clamp(-10, 10)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """-> pixel logits (b, channels, size, size)."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """-> logits, mu, logvar, with z = mu + std * eps (the reparameterisation trick)."""
        mu, logvar = self.encode(x)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device)
        return self.decode(mu + torch.exp(0.5 * logvar) * eps), mu, logvar

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decoded posterior means, in [0, 1]."""
        return torch.sigmoid(self.decode(self.encode(x)[0]))

    @torch.no_grad()
    def sample(self, n: int, seed: int) -> torch.Tensor:
        """``n`` images (Bernoulli means, in [0, 1]) from z ~ N(0, I) drawn with ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        return torch.sigmoid(self.decode(torch.randn(n, self.config.latent_dim, generator=gen)))

    @torch.no_grad()
    def interpolate(self, a: torch.Tensor, b: torch.Tensor, steps: int = 8) -> torch.Tensor:
        """Decoded linear paths between the latent means of ``a`` and ``b``.
        Shape: (n, c, h, w) x 2 -> (n, steps, c, h, w)."""
        za, zb = self.encode(a)[0], self.encode(b)[0]
        t = torch.linspace(0, 1, steps)[None, :, None]
        z = (1 - t) * za[:, None] + t * zb[:, None]  # (n, steps, latent)
        out = torch.sigmoid(self.decode(z.reshape(-1, z.shape[-1])))
        return out.reshape(len(a), steps, *out.shape[1:])

    @torch.no_grad()
    def variations(self, x: torch.Tensor, n: int, scale: float, seed: int) -> torch.Tensor:
        """``n`` decodes of z = mu + scale * std * eps per image. Shape: (b, c, h, w) -> (b, n, c, h, w)."""
        gen = torch.Generator().manual_seed(seed)
        mu, logvar = self.encode(x)
        eps = torch.randn((len(x), n, mu.shape[1]), generator=gen)
        z = mu[:, None] + scale * torch.exp(0.5 * logvar)[:, None] * eps
        out = torch.sigmoid(self.decode(z.reshape(-1, mu.shape[1])))
        return out.reshape(len(x), n, *out.shape[1:])


def negative_elbo(model: ConvVAE, x: torch.Tensor, beta: float, likelihood: str = "bernoulli", sigma: float = 0.1,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, reconstruction, KL), each a mean over the batch of per-image nats.

    ``likelihood``: "bernoulli" (BCE on grey levels) or "gaussian" with a fixed
    ``sigma`` (sum of squared errors / (2 sigma^2), constants dropped).
    """
    logits, mu, logvar = model(x, generator)
    if likelihood == "bernoulli":
        rec = nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="sum") / len(x)
    else:
        rec = (torch.sigmoid(logits) - x).pow(2).sum() / (2 * sigma ** 2) / len(x)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum() / len(x)
    return rec + beta * kl, rec, kl


@dataclass
class VaeArchitecture:
    """Encoder/decoder shape."""

    latent_dim: int = opt(16, "latent dimensions")
    width: int = opt(32, "base channel count")

    def check(self, fail):
        require_positive(self, fail, "latent_dim", "width")


@dataclass
class VaeTrainConfig(S.ImageTrainConfig):
    """Optimisation, with the VAE's defaults."""

    steps: int = opt(3000, "optimiser steps")
    learning_rate: float = opt(2e-3, "Adam learning rate")


@dataclass
class Config:
    """VAE stage."""

    data: str | ImageDataConfig = opt("digits", "images: digits, an IDX file, an image folder or a hub dataset "
                                                "(or an ImageDataConfig mapping)")
    vae: VaeArchitecture = opt(VaeArchitecture(), "network shape")
    train: VaeTrainConfig = opt(VaeTrainConfig(), "optimisation")
    beta: float = opt(1.0, "weight of the KL term (1: the VAE; > 1: beta-VAE)")
    likelihood: Literal["bernoulli", "gaussian"] = opt("bernoulli", "p(x|z): Bernoulli pixels, or Gaussian with "
                                                                   "fixed std `sigma`")
    sigma: float = opt(0.1, "gaussian likelihood: pixel noise std (smaller: sharper reconstructions, less "
                            "regular latents)")
    kl_warmup_steps: int = opt(0, "ramp beta linearly from 0 over this many steps (Bowman et al. 2016); 0 = off")
    variation_scale: float = opt(1.0, "variations: multiple of the posterior std the latent is perturbed by")
    metrics: M.ImageMetricsConfig = opt(M.ImageMetricsConfig(), "shared image metrics")

    def check(self, fail):
        # `not (...)`: NaN fails every comparison, so it is rejected too.
        if not 0 <= self.beta < float("inf"):
            raise fail("beta", f"expected a finite number >= 0, got {self.beta}")
        if not 0 < self.sigma < float("inf"):
            raise fail("sigma", f"expected a finite number > 0, got {self.sigma}")
        if self.kl_warmup_steps < 0:
            raise fail("kl_warmup_steps", f"expected >= 0, got {self.kl_warmup_steps}")
        if not 0 <= self.variation_scale < float("inf"):
            raise fail("variation_scale", f"expected a finite number >= 0, got {self.variation_scale}")


def validate(cfg: Config, ctx) -> None:
    S.validate_data(cfg.data, f"stages.{ctx.name}.data", size_multiple=4)


@torch.no_grad()
def held_out_elbo(model: ConvVAE, cfg: Config, x: torch.Tensor, seed: int) -> dict[str, float]:
    model.eval()
    loss, rec, kl = negative_elbo(model, x, 1.0, cfg.likelihood, cfg.sigma, torch.Generator().manual_seed(seed))
    return {"eval/negative_elbo": loss.item(), "eval/reconstruction_loss": rec.item(), "eval/kl": kl.item()}


def _pictures(model: ConvVAE, cfg: Config, held: torch.Tensor, labels, out: Path, seed: int) -> None:
    model.eval()
    # Reconstructions: rows of 8 held-out images, each above its reconstruction.
    x = held[:16]
    rec = model.reconstruct(x)
    save_grid(torch.cat([x[:8], rec[:8], x[8:], rec[8:]]), out / "reconstructions.png", nrow=8)
    # Interpolations between pairs of held-out images (of different classes where labels exist):
    # real A, 8 decoded steps from mu_A to mu_B, real B.
    n = min(8, len(held) // 2)
    a_idx = list(range(n))
    if labels is not None:
        b_idx = [next((j for j in range(n, len(held)) if labels[j] != labels[i] and j not in a_idx), n + i)
                 for i in a_idx]
    else:
        b_idx = [n + i for i in a_idx]
    a, b = held[a_idx], held[b_idx]
    path = model.interpolate(a, b, 8)
    rows = torch.cat([a[:, None], path, b[:, None]], 1)  # (n, 10, c, h, w)
    save_grid(rows.reshape(-1, *held.shape[1:]), out / "interpolations.png", nrow=10)
    # Variations: a held-out image, then 9 decodes of nearby latents.
    v = model.variations(held[:8], 9, cfg.variation_scale, seed)
    rows = torch.cat([held[:8, None], v], 1)
    save_grid(rows.reshape(-1, *held.shape[1:]), out / "variations.png", nrow=10)


@S.with_threads
def train(cfg: Config, ctx) -> Path:
    data = S.load_data(cfg.data, ctx.seed, size_multiple=4)
    channels, size = data.shape[0], data.shape[1]
    ref = M.real_reference(data, cfg.metrics, ctx.seed)

    torch.manual_seed(ctx.seed)
    model = ConvVAE(channels, size, cfg.vae.latent_dim, cfg.vae.width)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.learning_rate)
    gen = torch.Generator().manual_seed(ctx.seed)
    state = S.Resumable(ctx.stage_dir)
    objects = {"model": model, "optimizer": optimizer}
    start = state.load(objects, gen)
    logger = MetricsLogger(ctx.stage_dir, ctx.name, ctx.report_to, enabled=ctx.is_main,
                           project=ctx.recipe.run.wandb_project)
    logger.truncate_after(start)
    if start == 0:
        logger.log(held_out_elbo(model, cfg, data.held, ctx.seed), step=0)
    stream = S.batches(data.train, cfg.train.batch_size, gen)
    t0 = time.time()
    step = start
    bar = tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps, desc=f"{ctx.name} (vae)",
               disable=not ctx.is_main, dynamic_ncols=True)
    for step in bar:
        model.train()
        x = next(stream)
        beta = cfg.beta * min(1.0, (step + 1) / cfg.kl_warmup_steps) if cfg.kl_warmup_steps else cfg.beta
        loss, rec, kl = negative_elbo(model, x, beta, cfg.likelihood, cfg.sigma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % cfg.train.log_every == 0 or step == start:
            row = {"train/loss": loss.item(), "train/reconstruction_loss": rec.item(), "train/kl_loss": kl.item(),
                   "train/beta": beta, "perf/steps_per_s": (step + 1 - start) / (time.time() - t0)}
            logger.log(row, step=step + 1)
            bar.set_postfix(loss=f"{row['train/loss']:.2f}", kl=f"{row['train/kl_loss']:.2f}")
        if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0:
            model.eval()
            scores = M.score(model.sample(ref.n, ctx.seed), ref)
            row = {**held_out_elbo(model, cfg, data.held, ctx.seed), **{f"eval/{k}": v for k, v in scores.items()}}
            logger.log(row, step=step + 1)
        if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0 and ctx.is_main:
            state.save(step + 1, objects, gen)
        if cfg.train.max_seconds is not None and time.time() - t0 >= cfg.train.max_seconds:
            log.info("%s: time budget of %.0fs reached at step %d", ctx.name, cfg.train.max_seconds, step + 1)
            break
    bar.close()
    train_s = time.time() - t0
    steps_done = step + 1 if cfg.train.steps > start else start

    model.eval()
    held = held_out_elbo(model, cfg, data.held, ctx.seed)
    rec = model.reconstruct(data.held)
    summary = {"train/budget": S.budget_kind(cfg.train),
               "model/params": S.param_count(model), "perf/train_s": train_s,
               "perf/steps_per_s": (steps_done - start) / max(train_s, 1e-9), "vae/beta": cfg.beta,
               **{k.replace("eval/", "vae/held_out_"): v for k, v in held.items()},
               "vae/reconstruction_rmse": (rec - data.held).pow(2).mean().sqrt().item()}
    S.finish(ctx, logger, ref, lambda seed: model.sample(ref.n, seed), steps_done, summary)
    if ctx.is_main:
        _pictures(model, cfg, data.held, data.held_labels, ctx.stage_dir, ctx.seed)
        S.save_final(ctx.stage_dir, model.save_pretrained)
        state.clear()
    logger.close()
    return ctx.stage_dir / "final"
