"""Diffusion baseline (``type: diffusion``): DDPM training, DDIM sampling, and
restoration of damaged held-out images (denoising, inpainting).

Everything noise-schedule shaped comes from ``diffusers``; this file is the
training loop, the sampling loops and the restoration experiment.

1. train   DDPM (Ho et al. 2020, https://arxiv.org/abs/2006.11239, Algorithm 1):
           x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, and a ``UNet2DModel``
           learns eps from (x_t, t) by mean squared error; ``DDPMScheduler``
           with the cosine schedule (Nichol & Dhariwal 2021,
           https://arxiv.org/abs/2102.09672: the linear one destroys small
           images too early). Weights are averaged (EMA) for sampling.
2. sample  DDIM (Song et al. 2021, https://arxiv.org/abs/2010.02502, eq. 12):
           ``sampling_steps`` steps instead of 1000; eta = 0 makes the map from
           the initial noise to the image deterministic.
3. restore held-out images, never trained on:
           - denoising: y = x + sigma * n. In the model's [-1, 1] range the
             noise std is 2 sigma, so sqrt(abar) y has exactly the law of x_t
             at the step where (1 - abar) / abar = (2 sigma)^2: start DDIM there
             (the observation *is* a diffusion state; cf. SDEdit, Meng et al.
             2022, https://arxiv.org/abs/2108.01073).
           - inpainting: a square hole in the middle; RePaint (Lugmayr et al.
             2022, https://arxiv.org/abs/2201.09865) via ``RePaintScheduler``:
             at each step the known pixels are re-noised from the observation,
             the hole comes from the model, with resampling jumps to harmonise.
           Scored by PSNR and SSIM against the clean image, beside the
           corrupted input's own scores and (with ``restoration.vae``) the VAE
           stage's reconstruction of the same corrupted input.

``final/`` is a ``DDPMPipeline`` directory (``unet/`` with the EMA weights,
``scheduler/``): ``DDPMPipeline.from_pretrained`` or ``DDIMPipeline`` load it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, RePaintScheduler, UNet2DModel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from rlhf.baselines import image_metrics as M
from rlhf.baselines import image_stage as S
from rlhf.baselines.images import ImageDataConfig
from rlhf.config import opt, require_positive
from rlhf.errors import BadInput
from rlhf.tracking import MetricsLogger

log = logging.getLogger(__name__)


@dataclass
class UNetArchitecture:
    """``UNet2DModel`` shape: one resolution level per entry of ``block_out_channels``."""

    block_out_channels: list[int] = opt([16, 32], "channels per resolution level (each halves the size)")
    layers_per_block: int = opt(1, "ResNet blocks per level")
    attention: bool = opt(False, "self-attention in the lowest-resolution level and the middle block "
                                 "(costly on CPU; little gain on 8x8 images)")
    norm_num_groups: int = opt(8, "GroupNorm groups (must divide every channel count)")

    def check(self, fail):
        if not self.block_out_channels or any(c < 1 for c in self.block_out_channels):
            raise fail("block_out_channels", "expected a non-empty list of positive integers")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise fail("norm_num_groups", f"must divide every channel count {self.block_out_channels}")
        require_positive(self, fail, "layers_per_block")


@dataclass
class RestorationConfig:
    """Denoising and inpainting of held-out images."""

    num_images: int = opt(64, "held-out images restored (0 = skip restoration)")
    noise_std: float = opt(0.2, "denoising: std of the Gaussian noise added to [0, 1] pixels")
    hole: float = opt(0.5, "inpainting: side of the central square hole, as a fraction of the image side")
    inpaint_steps: int = opt(50, "RePaint inference steps")
    jump_length: int = opt(5, "RePaint: steps per resampling jump")
    jump_n_sample: int = opt(2, "RePaint: times each jump is resampled (1 = no resampling)")
    vae: str | None = opt(None, "a VAE stage's final/ (e.g. ${output_dir}/vae/final): its reconstruction of the "
                                "same corrupted inputs is scored beside the diffusion model's")

    def check(self, fail):
        if self.num_images < 0:
            raise fail("num_images", f"expected >= 0, got {self.num_images}")
        if not 0 < self.noise_std < float("inf"):  # NaN too
            raise fail("noise_std", f"expected a finite number > 0, got {self.noise_std}")
        if not 0.0 < self.hole < 1.0:
            raise fail("hole", f"expected a number in (0, 1), got {self.hole}")
        require_positive(self, fail, "inpaint_steps", "jump_length", "jump_n_sample")


@dataclass
class DiffusionTrainConfig(S.ImageTrainConfig):
    """Optimisation, with the diffusion model's defaults."""

    steps: int = opt(2000, "optimiser steps")
    learning_rate: float = opt(2e-3, "AdamW learning rate")


@dataclass
class Config:
    """Diffusion stage."""

    data: str | ImageDataConfig = opt("digits", "images: digits, an IDX file, an image folder or a hub dataset "
                                                "(or an ImageDataConfig mapping)")
    unet: UNetArchitecture = opt(UNetArchitecture(), "denoiser shape")
    train: DiffusionTrainConfig = opt(DiffusionTrainConfig(), "optimisation")
    num_train_timesteps: int = opt(1000, "diffusion steps T of the forward process")
    beta_schedule: Literal["squaredcos_cap_v2", "linear", "scaled_linear"] = opt(
        "squaredcos_cap_v2", "noise schedule (cosine: Nichol & Dhariwal 2021)")
    sampling_steps: int = opt(50, "DDIM steps per sample")
    eta: float = opt(0.0, "DDIM eta: 0 = deterministic given the initial noise, 1 = DDPM-like")
    ema_decay: float = opt(0.995, "weight EMA used for sampling and final/ (0: none)")
    restoration: RestorationConfig = opt(RestorationConfig(), "denoising and inpainting of held-out images")
    metrics: M.ImageMetricsConfig = opt(M.ImageMetricsConfig(), "shared image metrics")

    def check(self, fail):
        if self.num_train_timesteps < 2:
            raise fail("num_train_timesteps", f"expected >= 2, got {self.num_train_timesteps}")
        if not 1 <= self.sampling_steps <= self.num_train_timesteps:
            raise fail("sampling_steps", f"expected 1..num_train_timesteps, got {self.sampling_steps}")
        if not 0 <= self.eta < float("inf"):  # NaN too
            raise fail("eta", f"expected a finite number >= 0, got {self.eta}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise fail("ema_decay", f"expected a number in [0, 1), got {self.ema_decay}")


def build_unet(arch: UNetArchitecture, channels: int, size: int) -> UNet2DModel:
    levels = len(arch.block_out_channels)
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if arch.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels,
                       block_out_channels=tuple(arch.block_out_channels), layers_per_block=arch.layers_per_block,
                       down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=arch.norm_num_groups,
                       add_attention=arch.attention)


# ---------------------------------------------------------------- sampling


@torch.no_grad()
def ddim_sample(unet: UNet2DModel, scheduler_config, noise: torch.Tensor, steps: int, eta: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """DDIM from the initial noise x_T. Shape: noise (n, c, h, w) -> images in [0, 1].

    With eta = 0 the result is a deterministic function of ``noise``;
    ``generator`` only feeds the per-step noise when eta > 0.
    """
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    x = noise
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t).sample, t, x, eta=eta, generator=generator).prev_sample
    return (x.clamp(-1, 1) + 1) / 2


def sample(unet: UNet2DModel, scheduler_config, n: int, seed: int, steps: int, eta: float = 0.0,
           batch_size: int = 512) -> torch.Tensor:
    """``n`` images in [0, 1]; the same seed gives the same images."""
    gen = torch.Generator().manual_seed(seed)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    noise = torch.randn((n, *shape), generator=gen)
    unet.eval()
    return torch.cat([ddim_sample(unet, scheduler_config, noise[i:i + batch_size], steps, eta, gen)
                      for i in range(0, n, batch_size)])


@torch.no_grad()
def denoise(unet: UNet2DModel, scheduler_config, noisy: torch.Tensor, noise_std: float, steps: int) -> torch.Tensor:
    """Denoise ``noisy`` = clean + noise_std * N(0, I) (pixels in [0, 1], not clipped) by starting
    DDIM at the step whose noise level matches. Returns images in [0, 1]."""
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    sigma = 2 * noise_std  # the model's range is [-1, 1]
    target = 1.0 / (1.0 + sigma ** 2)  # abar with (1 - abar) / abar = sigma^2
    abar = scheduler.alphas_cumprod[scheduler.timesteps]
    start = int(torch.argmin((abar - target).abs()))
    t0 = scheduler.timesteps[start]
    x = scheduler.alphas_cumprod[t0].sqrt() * (noisy * 2 - 1)
    for t in scheduler.timesteps[start:]:
        x = scheduler.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    return (x.clamp(-1, 1) + 1) / 2


@torch.no_grad()
def inpaint(unet: UNet2DModel, scheduler_config, image: torch.Tensor, known: torch.Tensor, steps: int,
            jump_length: int, jump_n_sample: int, seed: int) -> torch.Tensor:
    """RePaint: fill where ``known`` is 0 (Shape (n, 1 or c, h, w), 1 = observed pixel).
    ``image`` in [0, 1]; returns images in [0, 1] equal to ``image`` where known."""
    scheduler = RePaintScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps, jump_length=jump_length, jump_n_sample=jump_n_sample)
    gen = torch.Generator().manual_seed(seed)
    original = image * 2 - 1
    mask = known.expand_as(image).float()
    x = torch.randn(image.shape, generator=gen)
    t_last = scheduler.timesteps[0] + 1
    for t in scheduler.timesteps:
        if t < t_last:  # a denoising step
            x = scheduler.step(unet(x, t).sample, t, x, original, mask, gen).prev_sample
        else:  # a resampling jump back up: re-noise by one step
            x = scheduler.undo_step(x, t_last, gen)
        t_last = t
    return (x.clamp(-1, 1) + 1) / 2


# ---------------------------------------------------------------- restoration


def _load_vae(path: str | None):
    if path is None:
        return None
    from rlhf.baselines.vae import ConvVAE

    return ConvVAE.from_pretrained(path).eval()


def restore(unet: UNet2DModel, scheduler_config, cfg: Config, clean: torch.Tensor, seed: int, out: Path | None
            ) -> dict[str, float]:
    """Both restoration tasks on ``clean`` held-out images; scores and (if ``out``) panels."""
    r = cfg.restoration
    vae = _load_vae(r.vae)
    gen = torch.Generator().manual_seed(seed)
    scores: dict[str, float] = {}
    panels = {}

    # Denoising: the observation is not clipped, so it is exactly clean + Gaussian noise.
    noisy = clean + r.noise_std * torch.randn(clean.shape, generator=gen)
    results = {"input": noisy.clamp(0, 1),
               "diffusion": denoise(unet, scheduler_config, noisy, r.noise_std, cfg.sampling_steps)}
    if vae is not None:
        results["vae"] = vae.reconstruct(noisy.clamp(0, 1))
    for name, img in results.items():
        psnr, ssim = M.psnr_ssim(clean, img)
        scores[f"restore/denoise/{name}_psnr"], scores[f"restore/denoise/{name}_ssim"] = psnr, ssim
        if name != "input":
            scores[f"restore/denoise/{name}_psnr_vs_input"] = M.psnr_ssim(noisy, img)[0]
    scores["restore/denoise/input_psnr"] = M.psnr_ssim(clean, noisy)[0]  # the unclipped observation
    panels["denoise"] = results

    # Inpainting: the hole is zeroed in the input the models see.
    known = M.central_hole(clean.shape, r.hole)
    masked = clean * known
    results = {"input": masked,
               "diffusion": inpaint(unet, scheduler_config, clean, known, r.inpaint_steps, r.jump_length,
                                    r.jump_n_sample, seed)}
    if vae is not None:
        # The VAE reconstructs the whole image; observed pixels are pasted back, as RePaint keeps them.
        results["vae"] = known * clean + (1 - known) * vae.reconstruct(masked)
    hole = 1 - known
    for name, img in results.items():
        psnr, ssim = M.psnr_ssim(clean, img)
        scores[f"restore/inpaint/{name}_psnr"], scores[f"restore/inpaint/{name}_ssim"] = psnr, ssim
        scores[f"restore/inpaint/{name}_hole_psnr"] = M.psnr_ssim(clean, img, hole)[0]
    panels["inpaint"] = results
    if out is not None:
        for task, results in panels.items():
            _restoration_panel(clean, results, scores, task, out / f"restoration_{task}.png")
    return scores


def _restoration_panel(clean: torch.Tensor, results: dict, scores: dict, task: str, path: Path,
                       rows: int = 6) -> Path:
    """Columns: clean, corrupted input, diffusion, VAE; one held-out image per row; mean PSNR/SSIM in titles."""
    from matplotlib.figure import Figure

    rows = min(rows, len(clean))
    cols = [("clean", clean)] + [(name, img) for name, img in results.items()]
    fig = Figure(figsize=(1.5 * len(cols), 1.5 * rows + 0.6), dpi=110, layout="constrained")
    axes = fig.subplots(rows, len(cols), squeeze=False)
    titles = {"input": "noisy input" if task == "denoise" else "masked input", "diffusion": "diffusion",
              "vae": "VAE", "clean": "clean"}
    for j, (name, img) in enumerate(cols):
        for i in range(rows):
            ax = axes[i, j]
            pic = img[i].clamp(0, 1)
            ax.imshow(pic[0] if pic.shape[0] == 1 else pic.permute(1, 2, 0), cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        title = titles.get(name, name)
        if name != "clean":
            title += f"\n{scores[f'restore/{task}/{name}_psnr']:.1f} dB / {scores[f'restore/{task}/{name}_ssim']:.2f}"
        axes[0, j].set_title(title, fontsize=8)
    fig.suptitle(("Denoising" if task == "denoise" else "Inpainting") + " held-out images (mean PSNR / SSIM vs clean)",
                 fontsize=9)
    fig.savefig(path)
    return path


# ---------------------------------------------------------------- the stage


def validate(cfg: Config, ctx) -> None:
    levels = len(cfg.unet.block_out_channels)
    S.validate_data(cfg.data, f"stages.{ctx.name}.data", size_multiple=2 ** (levels - 1))
    if cfg.restoration.vae is not None:
        finals = {str((ctx.recipe.stage_dir(s.name) / "final").resolve()) for s in ctx.recipe.stages}
        path = Path(cfg.restoration.vae)
        if str(path.resolve()) not in finals and not (path / "config.json").is_file():
            raise BadInput(f"stages.{ctx.name}.restoration.vae: '{path}' is neither a VAE checkpoint dir nor "
                           "the final/ of a stage in this recipe")


@S.with_threads
def train(cfg: Config, ctx) -> Path:
    levels = len(cfg.unet.block_out_channels)
    data = S.load_data(cfg.data, ctx.seed, size_multiple=2 ** (levels - 1))
    channels, size = data.shape[0], data.shape[1]
    ref = M.real_reference(data, cfg.metrics, ctx.seed)

    torch.manual_seed(ctx.seed)
    unet = build_unet(cfg.unet, channels, size)
    scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule)
    ema = AveragedModel(unet, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay)) if cfg.ema_decay > 0 else None
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.train.learning_rate, weight_decay=0.0)
    gen = torch.Generator().manual_seed(ctx.seed)
    state = S.Resumable(ctx.stage_dir)
    objects = {"unet": unet, "optimizer": optimizer, **({"ema": ema} if ema is not None else {})}
    start = state.load(objects, gen)
    logger = MetricsLogger(ctx.stage_dir, ctx.name, ctx.report_to, enabled=ctx.is_main,
                           project=ctx.recipe.run.wandb_project)
    logger.truncate_after(start)
    sampler = lambda: (ema.module if ema is not None else unet)  # noqa: E731
    stream = S.batches(data.train, cfg.train.batch_size, gen)
    t_start = time.time()
    step = start
    bar = tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps,
               desc=f"{ctx.name} (diffusion)", disable=not ctx.is_main, dynamic_ncols=True)
    for step in bar:
        unet.train()
        x0 = next(stream) * 2 - 1  # [0, 1] -> [-1, 1]
        # 1. forward process: a random step per image, x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
        eps = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, cfg.num_train_timesteps, (len(x0),), generator=gen)
        xt = scheduler.add_noise(x0, eps, t)
        # 2. the denoiser predicts eps (Ho et al. 2020, eq. 14, the "simple" loss)
        loss = torch.nn.functional.mse_loss(unet(xt, t).sample, eps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update_parameters(unet)
        if (step + 1) % cfg.train.log_every == 0 or step == start:
            logger.log({"train/loss": loss.item(), "perf/steps_per_s": (step + 1 - start) / (time.time() - t_start)},
                       step=step + 1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0:
            scores = M.score(sample(sampler(), scheduler.config, ref.n, ctx.seed, cfg.sampling_steps, cfg.eta), ref)
            logger.log({f"eval/{k}": v for k, v in scores.items()}, step=step + 1)
        if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0 and ctx.is_main:
            state.save(step + 1, objects, gen)
        if cfg.train.max_seconds is not None and time.time() - t_start >= cfg.train.max_seconds:
            log.info("%s: time budget of %.0fs reached at step %d", ctx.name, cfg.train.max_seconds, step + 1)
            break
    bar.close()
    train_s = time.time() - t_start
    steps_done = step + 1 if cfg.train.steps > start else start

    model = sampler().eval()
    summary = {"train/budget": S.budget_kind(cfg.train),
               "model/params": S.param_count(unet), "perf/train_s": train_s,
               "perf/steps_per_s": (steps_done - start) / max(train_s, 1e-9),
               "diffusion/sampling_steps": cfg.sampling_steps}
    if cfg.restoration.num_images:
        t2 = time.time()
        clean = data.held[:cfg.restoration.num_images]
        summary.update(restore(model, scheduler.config, cfg, clean, ctx.seed, ctx.stage_dir if ctx.is_main else None))
        summary["perf/restore_s"] = time.time() - t2
    S.finish(ctx, logger, ref, lambda seed: sample(model, scheduler.config, ref.n, seed, cfg.sampling_steps, cfg.eta),
             steps_done, summary)
    if ctx.is_main:
        S.save_final(ctx.stage_dir, DDPMPipeline(unet=model, scheduler=scheduler).save_pretrained)
        state.clear()
    logger.close()
    return ctx.stage_dir / "final"
