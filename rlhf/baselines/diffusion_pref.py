"""Preference tuning for the diffusion baseline (``type: diffusion_dpo``):
Diffusion-DPO on a DDPM from the ``diffusion`` stage, from a reward function or
from people's labels.

Diffusion-DPO (Wallace et al. 2023, https://arxiv.org/abs/2311.12908, eq. 14;
the loss as diffusers' ``examples/research_projects/diffusion_dpo`` computes it):
for a preferred image x^w and a rejected one x^l, noise both with the *same*
eps and step t, and compare how much better the tuned denoiser predicts the
noise than the frozen reference does, on the winner versus the loser::

    e(model, x) = mean over pixels of || eps - model(x_t, t) ||^2
    z    = -beta/2 * [(e(theta, x^w) - e(ref, x^w)) - (e(theta, x^l) - e(ref, x^l))]
    loss = -log sigmoid(z)

Each e is a one-sample estimate of the ELBO term, so z estimates the DPO
log-ratio difference (a lower denoising error means a higher likelihood);
``implicit_accuracy`` is the share of pairs with z > 0. Why DPO rather than
DDPO (policy gradients through the DDIM chain): it needs only image pairs, so
labels from people and pairs scored by a reward function train the same way,
and a step costs two denoiser passes instead of a backward pass through every
sampling step.

1. pairs    with ``reward``: each round, ``group_size`` images per group are
            sampled from the current model (online, as in DDPO and online DPO)
            and the group's best and worst by reward form a pair; with
            ``preferences``: the {chosen, rejected} PNG images that ``rlhf label
            export`` writes for image pairs (docs/labeling.md), offline.
2. train    ``train.steps`` AdamW steps on the loss above; the reference is the
            starting checkpoint, frozen.
3. measure  on HELD-OUT sampling seeds (``eval.seed`` .. + ``eval.seeds`` - 1;
            each round of training pairs is sampled on a seed drawn from a
            generator seeded with the recipe seed, never one of those): the
            reward before and after on the same initial noise (DDIM with
            eta = 0 is a deterministic map from noise to image), the per-seed
            gain with a 95% t-interval over seeds, and the shared image
            metrics (Fréchet distance, KID ...) before and after: the cost.

The reward "draw digit k" (``reward.target_class``) is log p(k | image) under a
*reward classifier*: the shared feature classifier trained with another seed
(``reward.classifier_seed``), so the network the FD is measured in is not the
one being optimised; the metric classifier's share of samples it calls k is
reported beside it as an independent check. ``reward.function`` takes any
``module:function(images) -> (n,) tensor`` instead.

``final/`` is a ``DDPMPipeline`` directory like the diffusion stage's.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from rlhf.baselines import image_metrics as M
from rlhf.baselines import image_stage as S
from rlhf.baselines.diffusion import sample
from rlhf.baselines.images import ImageDataConfig, save_grid
from rlhf.config import opt, require_positive, required
from rlhf.errors import BadInput
from rlhf.tracking import MetricsLogger

log = logging.getLogger(__name__)

RewardFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class RewardConfig:
    """What the tuning raises. One of ``target_class`` or ``function``."""

    target_class: int | None = opt(None, "'draw this digit': reward = log p(class | image) under the reward "
                                         "classifier (a class index of the data's labels)")
    function: str | None = opt(None, "module:function taking images (n, c, h, w) in [0, 1] and returning a "
                                     "float tensor (n,), instead of target_class")
    classifier_seed: int = opt(1000, "seed of the reward classifier (the feature classifier trained with this "
                                     "seed); its networks' seeds must not overlap the recipe seed's, whose "
                                     "classifier measures the FD")

    def check(self, fail):
        if self.target_class is not None and self.function is not None:
            raise fail("function", "give target_class or function, not both")
        if self.target_class is not None and self.target_class < 0:
            raise fail("target_class", f"expected a class index >= 0, got {self.target_class}")


@dataclass
class PairsConfig:
    """Pairs sampled from the model and ordered by the reward (not with ``preferences``)."""

    per_round: int = opt(128, "pairs sampled per round")
    group_size: int = opt(4, "images sampled per pair; the best and the worst by reward form the pair")
    refresh_every: int = opt(25, "optimiser steps per round: fresh pairs from the current model after each "
                                 "(0: one round, sampled from the starting model)")

    def check(self, fail):
        require_positive(self, fail, "per_round")
        if self.group_size < 2:
            raise fail("group_size", f"expected >= 2, got {self.group_size}")
        if self.refresh_every < 0:
            raise fail("refresh_every", f"expected 0 or a positive integer, got {self.refresh_every}")


@dataclass
class EvalConfig:
    """Held-out measurement: the same seeds for the model before and after tuning."""

    seeds: int = opt(4, "held-out sampling seeds (>= 2 for an interval); each gives as many images as the "
                        "data's held-out split, so the FD is computed like for like")
    seed: int = opt(100_000, "the first held-out seed (training pairs are sampled on other seeds)")

    def check(self, fail):
        require_positive(self, fail, "seeds")


@dataclass
class DPOTrainConfig(S.ImageTrainConfig):
    """Optimisation, with Diffusion-DPO's defaults (batch_size = pairs per step)."""

    steps: int = opt(400, "optimiser steps")
    batch_size: int = opt(32, "pairs per step")
    learning_rate: float = opt(1e-4, "AdamW learning rate")
    log_every: int = opt(10, "log losses to metrics.jsonl every N steps")
    eval_every: int = opt(0, "must be 0: the held-out measurement runs before and after training")
    save_every: int = opt(0, "must be 0: no resumable state (a short stage; an interrupted one restarts)")

    def check(self, fail):
        super().check(fail)
        for key in ("eval_every", "save_every"):
            if getattr(self, key):
                raise fail(key, f"not supported by diffusion_dpo (got {getattr(self, key)}); leave it 0")


@dataclass
class Config:
    """Diffusion-DPO stage: preference-tune a diffusion stage's checkpoint."""

    model: str = required("the diffusion checkpoint to tune: a diffusion stage's final/ "
                          "(e.g. ${output_dir}/diffusion/final)")
    data: str | ImageDataConfig = opt("digits", "the images the model learned: the classifiers and FD use them")
    reward: RewardConfig = opt(RewardConfig(), "the reward: pairs are ordered by it and it is measured before/after")
    preferences: str | None = opt(None, "a preference file from `rlhf label export` of image pairs ({chosen, "
                                        "rejected} PNG data URIs), or a labeling database URL: train on "
                                        "people's labels instead of reward-ordered pairs")
    beta: float = opt(5000.0, "Diffusion-DPO beta: larger keeps the model closer to the reference (the errors "
                              "are per-pixel means, so it is large; lower values let the reward classifier be "
                              "fooled: reward up, images worse)")
    pairs: PairsConfig = opt(PairsConfig(), "online pairs from the reward")
    sampling_steps: int = opt(20, "DDIM steps for training pairs and held-out samples")
    train: DPOTrainConfig = opt(DPOTrainConfig(), "optimisation")
    eval: EvalConfig = opt(EvalConfig(), "held-out seeds")
    metrics: M.ImageMetricsConfig = opt(M.ImageMetricsConfig(), "shared image metrics")

    def check(self, fail):
        if not 0 < self.beta < float("inf"):  # NaN too
            raise fail("beta", f"expected a finite number > 0, got {self.beta}")
        require_positive(self, fail, "sampling_steps")


# ---------------------------------------------------------------- pure math


def dpo_loss(model_w: torch.Tensor, model_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Diffusion-DPO loss from per-pair denoising errors (each Shape (b,)).

    Returns (mean loss, z): z = -beta/2 * ((model_w - ref_w) - (model_l - ref_l)),
    the implicit reward margin; z > 0 when the model improved on the winner more
    than on the loser (relative to the reference).
    """
    z = -0.5 * beta * ((model_w - ref_w) - (model_l - ref_l))
    return -F.logsigmoid(z).mean(), z


def denoising_error(unet: UNet2DModel, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error of the predicted noise. Shape: (b, c, h, w) -> (b,)."""
    return (unet(xt, t).sample - eps).pow(2).flatten(1).mean(1)


def best_worst_pairs(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (winners, losers) of each consecutive group of ``group_size``
    rewards' best and worst. Groups whose best and worst tie are dropped (no
    preference). Shape: (g * group_size,) -> (g',), (g',)."""
    groups = rewards[: len(rewards) // group_size * group_size].view(-1, group_size)
    offset = torch.arange(len(groups)) * group_size
    best, worst = offset + groups.argmax(1), offset + groups.argmin(1)
    keep = groups.max(1).values > groups.min(1).values
    return best[keep], worst[keep]


def training_seed(gen: torch.Generator, held_out: range) -> int:
    """A sampling seed for a round of training pairs, drawn from ``gen``, never one of ``held_out``."""
    while (seed := int(torch.randint(2 ** 31 - 1, (1,), generator=gen))) in held_out:
        pass
    return seed


# ---------------------------------------------------------------- rewards and preferences


def classifier_reward(clf: M.FeatureClassifier, target: int) -> RewardFn:
    """log p(target | image): the log of the classifier's networks' mean probability
    (images in [0, 1]), as the metrics take its predicted classes."""
    nets = clf.nets or (clf.net,)

    @torch.no_grad()
    def reward(images: torch.Tensor) -> torch.Tensor:
        # log of the mean probability, as a logsumexp of log-probabilities: a probability
        # that underflows to 0 would make the reward -inf.
        logp = torch.stack([torch.log_softmax(net.eval()(images.float())[1], dim=1)[:, target] for net in nets])
        return torch.logsumexp(logp, dim=0) - math.log(len(nets))

    return reward


def checked_reward(fn: RewardFn, name: str) -> RewardFn:
    """``fn`` with its answer checked: a float tensor of shape (n,), all finite;
    anything else (or an exception) is BadInput naming ``name``."""

    def reward(images: torch.Tensor) -> torch.Tensor:
        try:
            out = fn(images)
        except Exception as e:  # noqa: BLE001 - the user's code: any error is theirs
            raise BadInput(f"reward function '{name}' raised {type(e).__name__}: {str(e)[:300]}") from e
        if not isinstance(out, torch.Tensor) or out.shape != (len(images),):
            got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise BadInput(f"reward function '{name}': expected a float tensor of shape ({len(images)},), got {got}")
        out = out.detach().float()
        bad = (~torch.isfinite(out)).nonzero().flatten()
        if len(bad):
            raise BadInput(f"reward function '{name}' returned {len(bad)} non-finite value(s) of {len(out)} "
                           f"(first: {out[bad[0]].item()} at index {bad[0].item()})")
        return out

    return reward


def load_reward(cfg: RewardConfig, data, metrics: M.ImageMetricsConfig, key: str = "reward"
                ) -> tuple[RewardFn | None, str]:
    """The reward function and its description; (None, "") without a reward. ``key``
    names the reward config in messages (e.g. stages.dpo.reward)."""
    if cfg.function is not None:
        from rlhf.rewards import load_function

        return checked_reward(load_function(cfg.function), cfg.function), cfg.function
    if cfg.target_class is None:
        return None, ""
    clf = M.feature_classifier(data, metrics, cfg.classifier_seed)
    if cfg.target_class >= clf.num_classes:
        raise BadInput(f"{key}.target_class: {cfg.target_class}, but the classifier of this data has "
                       f"{clf.num_classes} classes ({clf.labels_from}: 0..{clf.num_classes - 1})")
    name = f"log p(class {cfg.target_class}) under the reward classifier (seed {cfg.classifier_seed})"
    return checked_reward(classifier_reward(clf, cfg.target_class), name), name


def read_preferences(path: str, channels: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) images in [0, 1] from an export of image pairs. Shape: (n, c, h, w) each."""
    from rlhf.data import read_records
    from rlhf.labeling.images import decode_image

    chosen, rejected = [], []
    for r in read_records(path):
        for key, out in (("chosen", chosen), ("rejected", rejected)):
            value = r.data.get(key)
            if not isinstance(value, str):
                raise BadInput(f"{r.where}: expected '{key}', a PNG data URI (an image pair's export); "
                               f"record has {sorted(r.data)}")
            img = decode_image(value, f"{r.where}: {key}", channels)
            if img.shape[1:] != (size, size):
                raise BadInput(f"{r.where}: {key} is {img.shape[2]}x{img.shape[1]}; the model makes "
                               f"{size}x{size} images")
            out.append(img)
    if not chosen:
        raise BadInput(f"preferences '{path}': no preference pairs")
    return torch.stack(chosen), torch.stack(rejected)


# ---------------------------------------------------------------- the stage


def validate(cfg: Config, ctx) -> None:
    key = f"stages.{ctx.name}"
    S.validate_data(cfg.data, f"{key}.data")
    path = Path(cfg.model)
    if not ctx.produces(cfg.model) and not (path / "unet" / "config.json").is_file():
        raise BadInput(f"{key}.model: '{path}' is neither a diffusion checkpoint (a DDPMPipeline dir with unet/) "
                       "nor the final/ of a stage in this recipe")
    if cfg.reward.target_class is None and cfg.reward.function is None and cfg.preferences is None:
        raise BadInput(f"{key}.reward: set reward.target_class or reward.function (pairs ordered by a reward), "
                       "or preferences (people's labels)")
    if cfg.reward.function is not None:
        from rlhf.rewards import is_function, load_function

        if not is_function(cfg.reward.function):
            raise BadInput(f"{key}.reward.function: '{cfg.reward.function}' is not module:function")
        try:
            load_function(cfg.reward.function)
        except BadInput as e:
            raise BadInput(f"{key}.reward.function: {e}") from None
    nets = cfg.metrics.classifier_nets  # a classifier of seed s is networks of seeds s .. s + nets - 1
    if cfg.reward.target_class is not None and abs(cfg.reward.classifier_seed - ctx.seed) < nets:
        raise BadInput(f"{key}.reward.classifier_seed: {cfg.reward.classifier_seed} overlaps the recipe seed "
                       f"{ctx.seed}, whose classifier networks (seeds {ctx.seed}..{ctx.seed + nets - 1}) measure "
                       "the FD; the reward must come from other networks")
    if cfg.preferences is not None and "://" not in cfg.preferences and not Path(cfg.preferences).exists() \
            and not ctx.produces(cfg.preferences):
        raise BadInput(f"{key}.preferences: no such file '{cfg.preferences}'")


class Measured(NamedTuple):
    rewards: list[float]  # mean reward per held-out seed (empty without a reward)
    scores: list[dict[str, float]]  # the shared image metrics per held-out seed
    target_share: list[float]  # share the metric classifier calls reward.target_class, per seed
    first: torch.Tensor  # the first seed's images


def measure(unet: UNet2DModel, sched_cfg, reward: RewardFn | None, ref: M.RealReference, cfg: Config) -> Measured:
    """Sample ``ref.n`` images per held-out seed and score them."""
    rewards, scores, share, first = [], [], [], None
    for i in range(cfg.eval.seeds):
        images = sample(unet, sched_cfg, ref.n, cfg.eval.seed + i, cfg.sampling_steps)
        first = images if first is None else first
        if reward is not None:
            rewards.append(float(reward(images).mean()))
        scores.append(M.score(images, ref))
        if cfg.reward.target_class is not None:
            share.append(float((ref.classifier.features(images)[2] == cfg.reward.target_class).mean()))
    return Measured(rewards, scores, share, first)


def online_pairs(unet: UNet2DModel, sched_cfg, reward: RewardFn, cfg: Config, seed: int
                 ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Sample groups from the current model; each group's best and worst image by reward form a pair."""
    n = cfg.pairs.per_round * cfg.pairs.group_size
    images = sample(unet, sched_cfg, n, seed, cfg.sampling_steps)
    r = reward(images)
    win, lose = best_worst_pairs(r, cfg.pairs.group_size)
    stats = {"pairs/reward_mean": float(r.mean()), "pairs/reward_gap": float((r[win] - r[lose]).mean()),
             "pairs/kept": len(win)}
    return images[win], images[lose], stats


def dpo_step(policy: UNet2DModel, reference: UNet2DModel, scheduler: DDPMScheduler, winners: torch.Tensor,
             losers: torch.Tensor, beta: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The Diffusion-DPO loss of a batch of pairs (images in [0, 1]): same noise and step for both sides."""
    x0 = torch.cat([winners, losers]) * 2 - 1
    b = len(winners)
    eps = torch.randn(winners.shape, generator=gen).repeat(2, 1, 1, 1)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=gen).repeat(2)
    xt = scheduler.add_noise(x0, eps, t)
    model_err = denoising_error(policy, xt, t, eps)
    with torch.no_grad():
        ref_err = denoising_error(reference, xt, t, eps)
    return dpo_loss(model_err[:b], model_err[b:], ref_err[:b], ref_err[b:], beta)


def _summary(cfg: Config, before: Measured, after: Measured, reward_name: str) -> dict:
    """Before/after means over held-out seeds, and the paired differences with 95% intervals."""
    out: dict = {"eval/held_out_seeds": f"{cfg.eval.seed}..{cfg.eval.seed + cfg.eval.seeds - 1}",
                 "eval/images_per_seed": len(before.first)}
    if before.rewards:
        out["reward/name"] = reward_name
        out["reward/before"] = sum(before.rewards) / len(before.rewards)
        out["reward/after"] = sum(after.rewards) / len(after.rewards)
        gain = [a - b for a, b in zip(after.rewards, before.rewards, strict=True)]
        out["reward/gain"], out["reward/gain_low"], out["reward/gain_high"] = M.interval(gain)[:3]
    if before.target_share:
        out["target_share/before"] = sum(before.target_share) / len(before.target_share)
        out["target_share/after"] = sum(after.target_share) / len(after.target_share)
    for k in before.scores[0]:
        b = [s[k] for s in before.scores]
        a = [s[k] for s in after.scores]
        out[f"before/{k}"], out[f"after/{k}"] = sum(b) / len(b), sum(a) / len(a)
        if k in ("fd", "kid"):  # the cost of the tuning in sample quality
            diff = [y - x for x, y in zip(b, a, strict=True)]
            out[f"cost/{k}"], out[f"cost/{k}_low"], out[f"cost/{k}_high"] = M.interval(diff)[:3]
    return out


def _load(path: str) -> tuple[UNet2DModel, DDPMScheduler]:
    try:
        pipe = DDPMPipeline.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise BadInput(f"model '{path}': cannot load a diffusion checkpoint ({str(e).splitlines()[0]})") from None
    return pipe.unet, pipe.scheduler


class Pairs(NamedTuple):
    winners: torch.Tensor | None  # images in [0, 1], Shape (n, c, h, w); None until the first round
    losers: torch.Tensor | None


def optimise(policy: UNet2DModel, reference: UNet2DModel, scheduler: DDPMScheduler, cfg: Config, ctx,
             reward: RewardFn | None, offline: Pairs | None, logger: MetricsLogger) -> tuple[int, dict]:
    """The training loop: ``cfg.train.steps`` Diffusion-DPO steps, with fresh
    reward-ordered pairs every ``pairs.refresh_every`` steps unless ``offline``
    pairs (people's labels) are given. Returns (steps done, training summary)."""
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.train.learning_rate, weight_decay=0.0)
    gen = torch.Generator().manual_seed(ctx.seed)  # training noise: never a held-out seed (validate)
    pairs = offline or Pairs(None, None)
    if offline is not None:
        logger.log({"pairs/kept": len(offline.winners)}, step=0)
    t_start, step, accs, loss = time.time(), 0, [], torch.tensor(math.nan)
    bar = tqdm(range(cfg.train.steps), desc=f"{ctx.name} (diffusion-dpo)", disable=not ctx.is_main,
               dynamic_ncols=True)
    for step in bar:
        refresh = cfg.pairs.refresh_every
        if offline is None and (pairs.winners is None or (refresh and step % refresh == 0)):
            # A new round: pairs from the current model, on noise from the training generator.
            policy.eval()
            seed = training_seed(gen, range(cfg.eval.seed, cfg.eval.seed + cfg.eval.seeds))
            *pairs, stats = online_pairs(policy, scheduler.config, reward, cfg, seed)
            pairs = Pairs(*pairs)
            logger.log(stats, step=step)
            if not len(pairs.winners):
                raise BadInput(f"stages.{ctx.name}.reward: every sampled group tied; no preference to learn")
        policy.train()
        idx = torch.randint(len(pairs.winners), (min(cfg.train.batch_size, len(pairs.winners)),), generator=gen)
        loss, z = dpo_step(policy, reference, scheduler, pairs.winners[idx], pairs.losers[idx], cfg.beta, gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        accs.append(float((z > 0).float().mean()))
        if (step + 1) % cfg.train.log_every == 0 or step == 0:
            window = accs[-cfg.train.log_every:]
            logger.log({"train/loss": loss.item(), "train/implicit_accuracy": sum(window) / len(window),
                        "train/margin": float(z.detach().mean()),
                        "perf/steps_per_s": (step + 1) / (time.time() - t_start)}, step=step + 1)
            bar.set_postfix(loss=f"{loss.item():.4f}", acc=f"{sum(window) / len(window):.2f}")
        if cfg.train.max_seconds is not None and time.time() - t_start >= cfg.train.max_seconds:
            log.info("%s: time budget of %.0fs reached at step %d", ctx.name, cfg.train.max_seconds, step + 1)
            break
    bar.close()
    tail = accs[-cfg.train.log_every:]
    return step + 1, {"train/implicit_accuracy": sum(tail) / len(tail), "train/final_loss": loss.item(),
                      "train/pairs": len(pairs.winners), "perf/train_s": time.time() - t_start,
                      "train/source": "preferences" if offline is not None else "reward"}


@S.with_threads
def train(cfg: Config, ctx) -> Path:
    reference, scheduler = _load(cfg.model)
    channels, size = reference.config.in_channels, reference.config.sample_size
    data = S.load_data(cfg.data, ctx.seed)
    if data.shape != (channels, size, size):
        raise BadInput(f"stages.{ctx.name}.data: images are {tuple(data.shape)}, the model makes "
                       f"{(channels, size, size)}")
    ref = M.real_reference(data, cfg.metrics, ctx.seed)
    reward, reward_name = load_reward(cfg.reward, data, cfg.metrics, f"stages.{ctx.name}.reward")
    offline = Pairs(*read_preferences(cfg.preferences, channels, size)) if cfg.preferences is not None else None
    reference.eval().requires_grad_(False)

    t0 = time.time()
    before = measure(reference, scheduler.config, reward, ref, cfg)
    eval_s = time.time() - t0

    torch.manual_seed(ctx.seed)
    policy = copy.deepcopy(reference).requires_grad_(True)
    logger = MetricsLogger(ctx.stage_dir, ctx.name, ctx.report_to, enabled=ctx.is_main,
                           project=ctx.recipe.run.wandb_project)
    logger.truncate_after(0)  # no resumable state: a restarted stage starts over
    steps_done, trained = optimise(policy, reference, scheduler, cfg, ctx, reward, offline, logger)
    policy.eval()

    t1 = time.time()
    after = measure(policy, scheduler.config, reward, ref, cfg)
    eval_s += time.time() - t1
    summary = {**_summary(cfg, before, after, reward_name), **trained, "model/params": S.param_count(policy),
               "perf/eval_s": eval_s}
    if before.target_share and data.held_labels is not None:
        summary.update(class_mix_fd(ref, cfg.reward.target_class, summary, ctx.seed))
    _log_result(ctx.name, summary)
    if ctx.is_main:
        # Same noise, before (top four rows) and after (bottom four): what the tuning changed, by eye.
        save_grid(torch.cat([before.first[:32], after.first[:32]]), ctx.stage_dir / "before_after.png")
    # The shared end of an image stage: image/* metrics of the tuned model, pictures, metrics.json.
    S.finish(ctx, logger, ref, lambda seed: sample(policy, scheduler.config, ref.n, seed, cfg.sampling_steps),
             steps_done, summary)
    if ctx.is_main:
        S.save_final(ctx.stage_dir, DDPMPipeline(unet=policy, scheduler=scheduler).save_pretrained)
    logger.close()
    return ctx.stage_dir / "final"


def class_mix_fd(ref: M.RealReference, target: int, summary: dict, seed: int, draws: int = 4
                 ) -> dict[str, float]:
    """How much FD a change of class mix alone costs: real held-out images resampled
    so that ``target`` has the share the metric classifier saw before / after tuning.

    A model that draws more of one digit moves away from the training mix even if
    every image is perfect; this separates that from damage to the images."""
    data, out = ref.data, {}
    is_k = (data.held_labels == target).float()
    for when in ("before", "after"):
        share = min(max(summary[f"target_share/{when}"], 1e-3), 1 - 1e-3)
        weights = is_k * share / is_k.mean() + (1 - is_k) * (1 - share) / (1 - is_k.mean())
        gen = torch.Generator().manual_seed(seed)
        fds = [M.score(data.held[torch.multinomial(weights, ref.n, replacement=True, generator=gen)], ref)["fd"]
               for _ in range(draws)]  # a few resamples: one is noisy at a few hundred images
        out[f"reference/fd_real_at_share_{when}"] = sum(fds) / draws
    return out


def _log_result(name: str, s: dict) -> None:
    if "reward/gain" in s:
        log.info("%s: held-out reward %.3f -> %.3f (gain %.3f, 95%% CI %.3f..%.3f)", name, s["reward/before"],
                 s["reward/after"], s["reward/gain"], s["reward/gain_low"], s["reward/gain_high"])
    log.info("%s: Fréchet distance %.2f -> %.2f (cost %.2f, 95%% CI %.2f..%.2f)", name, s["before/fd"],
             s["after/fd"], s["cost/fd"], s["cost/fd_low"], s["cost/fd_high"])
    if "reference/fd_real_at_share_after" in s:
        log.info("%s: share of the target class %.3f -> %.3f; real held-out images at those shares: FD %.2f -> %.2f",
                 name, s["target_share/before"], s["target_share/after"], s["reference/fd_real_at_share_before"],
                 s["reference/fd_real_at_share_after"])
