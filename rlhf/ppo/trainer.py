"""PPO stage (``type: ppo``): our own trainer on Accelerate, per shared/PPO.md.

One step, CleanRL-style, reads top to bottom in ``train``:

  1. generate   left-padded prompts -> sampled responses (cut after EOS)
  2. forward    fp32 log-probs of the policy and the reference, values
  3. score      reward sources on (prompt, response) text; missing-EOS penalty
  4. rewards    per-token -beta * KL, score added at the last response token
  5. advantages GAE (gamma, lambda), whitened over valid tokens
  6. update     ppo_epochs x shuffled minibatches x micro-batches (grad accum)
  7. log        every PPO.md statistic to metrics.jsonl (+ wandb/tensorboard)

The math lives in ``rlhf.ppo.core`` as pure, tested functions. Checkpoints
hold policy, value, optimizer, scheduler, KL controller, RNG states and the
step (the data position is a function of the step), so a resumed run follows
the same trajectory as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from rlhf.config import opt, require_positive
from rlhf.data import DataConfig, normalize_prompts, read_records, render_prompt
from rlhf.errors import BadInput
from rlhf.models import (ModelConfig, as_model_config, context_length, load_causal_lm, load_sequence_classifier,
                         load_policy, load_tokenizer)
from rlhf.ppo import core
from rlhf.ppo.policy import PolicyAndValue, Reference, ScalarHeadModel
from rlhf.rewards import CombinedReward, RewardSpec, as_specs, check_source, is_function
from rlhf.sharding import full_weights, pad_shard, prepare_frozen, save_full, sharding
from rlhf.tracking import MetricsLogger, read_metrics, write_summary
from rlhf.training import precision_flags

log = logging.getLogger(__name__)


@dataclass
class GenerationConfig:
    """Rollout sampling (PPO.md: no top-k/top-p, no forced minimum length)."""

    max_new_tokens: int = opt(32, "response length cap; responses also stop at EOS")
    temperature: float = opt(1.0, "sampling temperature; log-probs use the same one everywhere (0.7 for real models)")
    top_k: int = opt(0, "0 = off; anything else biases the KL estimate (PPO.md pitfalls)")
    top_p: float = opt(1.0, "1.0 = off; anything else biases the KL estimate")
    stop_strings: list[str] | None = opt(None, "extra stop strings besides EOS")

    def check(self, fail):
        if self.max_new_tokens < 1:
            raise fail("max_new_tokens", "expected >= 1")
        if self.temperature <= 0:
            raise fail("temperature", "expected > 0 (sampling is required for PPO)")


@dataclass
class KLConfig:
    """Per-token KL penalty to the reference policy."""

    coef: float = opt(0.05, "beta: initial (adaptive) or fixed KL coefficient")
    estimator: Literal["k1", "k3"] = opt("k1", "k1 = logp - logp_ref; k3 = (r - 1) - log r, r = p_ref/p")
    adaptive: bool = opt(False, "adapt beta toward `target` (Ziegler et al. 2019)")
    target: float = opt(6.0, "adaptive: target KL (nats per sequence)")
    horizon: float = opt(10000.0, "adaptive: horizon in episodes")


@dataclass
class EvalConfig:
    """Held-out check at the end: gold score of the initial vs trained policy."""

    prompts: str | None = opt(None, "held-out prompts file (JSONL with `prompt`); null = skip")
    gold: str | None = opt(None, "gold scorer module:function (e.g. rlhf.gold:vader_sentiment)")
    max_prompts: int = opt(256, "evaluate at most this many prompts")
    batch_size: int = opt(64, "generation batch size")


@dataclass
class Config:
    """PPO stage. Defaults run a tiny CPU job; see recipes/ for real sizes."""

    model: str | ModelConfig = opt("tiny", "policy init, usually the SFT stage's final/")
    reward: str | list[str | RewardSpec] = opt("", "reward source(s): checkpoint dir, module:function, or a list")
    value_model: str = opt("reward", "reward: init from the first reward-model checkpoint (or the policy if "
                                     "none); policy_head: value head on the policy; or a checkpoint dir")
    data: DataConfig = opt(DataConfig(), "training prompts (`prompt` field)")
    steps: int = opt(20, "PPO steps (each = one rollout batch + its update)")
    rollout_batch_size: int = opt(32, "prompts per step per process")
    num_minibatches: int = opt(2, "minibatches per PPO epoch (one optimiser step each)")
    micro_batch_size: int = opt(16, "sequences per forward/backward (gradient accumulation inside a minibatch)")
    forward_batch_size: int = opt(64, "sequences per no-grad forward during the rollout")
    ppo_epochs: int = opt(4, "passes over each rollout batch")
    learning_rate: float = opt(1e-5, "peak learning rate, linearly annealed to 0")
    lr_schedule: Literal["linear", "constant"] = opt("linear", "learning-rate schedule over all optimiser steps")
    max_grad_norm: float = opt(1.0, "gradient clipping max-norm")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    generation: GenerationConfig = opt(GenerationConfig(), "rollout sampling")
    kl: KLConfig = opt(KLConfig(), "KL penalty")
    missing_eos_penalty: float | None = opt(1.0, "subtracted from the score of responses without EOS; null = off")
    reward_clip: float | None = opt(None, "clip scores to [-c, c]; null = off")
    normalize_rewards: bool = opt(False, "scale scores by a running std (Ziegler et al.)")
    whiten_rewards: bool = opt(False, "whiten per-token rewards before GAE")
    gamma: float = opt(1.0, "GAE discount")
    lam: float = opt(0.95, "GAE lambda")
    clip_range: float = opt(0.2, "policy ratio clip epsilon")
    clip_range_value: float = opt(0.2, "value clip epsilon")
    vf_coef: float = opt(0.1, "value-loss weight in the total loss")
    entropy_coef: float = opt(0.0, "entropy bonus weight")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = opt("auto", "mixed precision; log-probs are fp32 always")
    save_every: int = opt(0, "checkpoint every N steps for resuming (0 = only at the end)")
    log_every: int = opt(1, "log metrics every N steps")
    sample_every: int = opt(10, "write sample responses to samples.jsonl every N steps")
    eval: EvalConfig = opt(EvalConfig(), "held-out gold evaluation at the end")

    def check(self, fail):
        require_positive(self, fail, "steps", "rollout_batch_size", "num_minibatches", "micro_batch_size",
                                     "forward_batch_size", "ppo_epochs", "log_every", "sample_every")
        if self.rollout_batch_size % self.num_minibatches:
            raise fail("num_minibatches", f"must divide rollout_batch_size ({self.rollout_batch_size})")
        mini = self.rollout_batch_size // self.num_minibatches
        if mini % self.micro_batch_size and self.micro_batch_size < mini:
            raise fail("micro_batch_size", f"must divide the minibatch size ({mini})")
        if not as_specs(self.reward) or not all(s.source for s in as_specs(self.reward)):
            raise fail("reward", "required: a reward-model checkpoint dir or module:function (or a list)")
        if self.kl.adaptive and self.kl.target <= 0:
            raise fail("kl.target", "expected > 0")


# ---------------------------------------------------------------- helpers


def _prompts(path: str, columns: dict, limit: int | None = None, split: str = "train") -> list:
    return normalize_prompts(read_records(path, split, columns, limit))


def validate(cfg: Config, ctx) -> None:
    source = ctx.loadable(cfg.model)
    tok = load_tokenizer(source)
    for spec in as_specs(cfg.reward):
        check_source(spec.source, ctx.produces)
    if cfg.value_model not in ("reward", "policy_head"):
        check_source(cfg.value_model, ctx.produces)
    if cfg.eval.gold:
        check_source(cfg.eval.gold)
    limit = context_length(source)
    files = [(cfg.data.path, cfg.data.split)] + ([(cfg.eval.prompts, "test")] if cfg.eval.prompts else [])
    for path, split in files:
        records = read_records(path, split, cfg.data.columns)
        prompts = normalize_prompts(records)
        if limit is None:
            continue
        for rec, prompt in zip(records, prompts):
            n = len(tok(render_prompt(tok, prompt), add_special_tokens=False)["input_ids"])
            if n + cfg.generation.max_new_tokens > limit:
                raise BadInput(f"{rec.where}: prompt is {n} tokens; with max_new_tokens="
                               f"{cfg.generation.max_new_tokens} it exceeds the model's context of {limit}")


def _value_model(cfg: Config, specs: list[RewardSpec], policy_cfg: ModelConfig, tok, seed: int):
    if cfg.value_model == "policy_head":
        return None
    if cfg.value_model == "reward":
        # A classifier picked by `label` (e.g. a sentiment model) has its own
        # tokenizer and heads: it cannot read the policy's tokens.
        ckpts = [s.source for s in specs if not is_function(s.source) and s.label is None]
        # With only function rewards there is no reward model: start from the
        # policy's trunk with a fresh head.
        source = ModelConfig(name=ckpts[0]) if ckpts else ModelConfig(
            name=policy_cfg.name, gguf_file=policy_cfg.gguf_file, revision=policy_cfg.revision)
    else:
        source = ModelConfig(name=cfg.value_model)
    source.dtype = policy_cfg.dtype
    clf = load_sequence_classifier(source, tok, seed=seed)
    if source.name == policy_cfg.name:
        torch.nn.init.zeros_(clf.score.weight)
    return ScalarHeadModel(clf)


def _disable_dropout(model: torch.nn.Module) -> None:
    # PPO.md: dropout off in every model, or log-probs differ between the
    # rollout and the first training pass and the ratio is not 1.
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def _set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _step_prompts(prompts: list, step: int, batch: int, rank: int, world: int, seed: int) -> list:
    """The prompts of one step on one rank, a pure function of the step.

    Epoch e uses permutation(seed + e); the global batch (world * batch) is
    consecutive in it and rank r takes its r-th slice, so ranks never overlap
    and resuming at step k needs no saved iterator.
    """
    global_batch = batch * world
    start = step * global_batch
    out = []
    for i in range(start + rank * batch, start + (rank + 1) * batch):
        epoch, pos = divmod(i, len(prompts))
        out.append(prompts[_permutation(seed + epoch, len(prompts))[pos]])
    return out


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, n: int) -> np.ndarray:
    return np.random.RandomState(seed % 2**32).permutation(n)


def _pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


@torch.no_grad()
def generate(policy, tok, prompt_texts: list[str], gen: GenerationConfig, device,
             synced_gpus: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample responses. Returns (query_ids (b, q), query_mask (b, q),
    response_ids (b, r) cut after EOS and padded, response_mask (b, r)).

    ``synced_gpus``: for a sharded model whose weights are not gathered, every
    rank keeps calling forward until all ranks are done (transformers' ZeRO-3 mode).
    """
    encoded = [tok(t, add_special_tokens=False)["input_ids"] for t in prompt_texts]
    query, query_mask = _pad_left(encoded, tok.pad_token_id)
    query, query_mask = query.to(device), query_mask.to(device)
    kwargs = dict(do_sample=True, temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p,
                  max_new_tokens=gen.max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                  use_cache=True, synced_gpus=synced_gpus)
    if gen.stop_strings:
        kwargs.update(stop_strings=gen.stop_strings, tokenizer=tok)
    out = policy.generate(input_ids=query, attention_mask=query_mask, **kwargs)
    response = out[:, query.size(1):]
    if response.size(1) == 0:
        response = torch.full((query.size(0), 1), tok.pad_token_id, device=device, dtype=torch.long)
    response, response_mask, _ = core.truncate_after_eos(response, tok.eos_token_id, tok.pad_token_id)
    return query, query_mask, response, response_mask


def _finished(eos_hits: torch.Tensor, texts: list[str], stop_strings: list[str] | None) -> torch.Tensor:
    """Which responses ended on their own (EOS, or a configured stop string)
    rather than at max_new_tokens. Shape: eos_hits (b, r) bool -> (b,) bool."""
    done = eos_hits.any(1)
    if stop_strings:
        stopped = torch.tensor([any(t.endswith(s) for s in stop_strings) for t in texts], device=done.device)
        done = done | stopped
    return done


def decode_responses(tok, response: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return [tok.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(response, mask)]


def _chunks(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


class _RunningStd:
    """Running std of scores (Welford) for `normalize_rewards` (Ziegler et al.)."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        for v in x.tolist():
            self.count += 1
            d = v - self.mean
            self.mean += d / self.count
            self.m2 += d * (v - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, s: dict) -> None:
        self.count, self.mean, self.m2 = s["count"], s["mean"], s["m2"]


# ---------------------------------------------------------------- training


def _rollout_forward(model: PolicyAndValue, reference: Reference, input_ids, attention_mask, q: int,
                     cfg: Config):
    logprobs, ref_logprobs, values = [], [], []
    inner = model.policy
    for sl in _chunks(input_ids.size(0), cfg.forward_batch_size):
        lp, v, _ = model(input_ids[sl], attention_mask[sl], q, cfg.generation.temperature)
        logprobs.append(lp)
        values.append(v)
        ref_logprobs.append(reference.logprobs(inner, input_ids[sl], attention_mask[sl], q,
                                               cfg.generation.temperature))
    return torch.cat(logprobs), torch.cat(ref_logprobs), torch.cat(values)


def _gold_eval(cfg: Config, accelerator, model, reference: Reference, tok, seed: int) -> dict[str, float]:
    """Held-out check: gold score and response length of the initial and the
    trained policy, and KL(trained || initial) per sequence.

    Every rank samples its share of the prompts (padded to equal shares, so
    sharded models see the same number of batches on every rank) from weights
    gathered once; the means are over all ranks' real prompts.
    """
    from accelerate.utils import gather_object

    from rlhf.evaluation.runner import SamplingConfig, sample_and_kl

    prompts = _prompts(cfg.eval.prompts, cfg.data.columns, cfg.eval.max_prompts, "test")
    share, real = pad_shard(prompts, accelerator.process_index, accelerator.num_processes)
    gold = CombinedReward([RewardSpec(source=cfg.eval.gold)], device=accelerator.device) if cfg.eval.gold else None
    sampling = SamplingConfig(max_new_tokens=cfg.generation.max_new_tokens, batch_size=cfg.eval.batch_size)
    policy = accelerator.unwrap_model(model).policy
    initial = reference.model if reference.model is not None else _AdaptersOff(policy)
    # One model's weights gathered at a time: the initial policy's to sample
    # from it, then the trained policy's; the reference's KL forwards stay
    # sharded (collective; equal shares keep the ranks in step).
    with full_weights(initial if reference.model is not None else model, accelerator) as local:
        before = sample_and_kl(initial, tok, share, sampling, seed, accelerator.device, settings=cfg.generation,
                               synced_gpus=not local)
    with full_weights(model, accelerator) as local:
        after = sample_and_kl(policy, tok, share, sampling, seed, accelerator.device, reference=initial,
                              settings=cfg.generation, synced_gpus=not local)
    out = {}
    for name, samples in (("sft", before), ("ppo", after)):
        texts = samples.texts[:real]
        if gold is not None:
            out[f"gold/{name}"] = float(np.mean(gather_object(gold(share[:real], texts))))
        out[f"response_length/{name}"] = float(np.mean(gather_object(samples.lengths[:real])))
    out["kl/ppo"] = float(np.mean(gather_object(after.kl[:real])))
    return out


def train(cfg: Config, ctx) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    flags = precision_flags(cfg.precision)
    mixed = "bf16" if flags["bf16"] else "fp16" if flags["fp16"] else "no"
    accelerator = Accelerator(mixed_precision=mixed)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    sharding(accelerator)  # FSDP1 cannot run PPO's local generation: say so before loading anything
    if accelerator.state.deepspeed_plugin is not None:
        _deepspeed_config(accelerator, cfg)
    # seed + rank: each rank samples its own responses (one process: the seed
    # itself). Models still start identical: presets and new heads seed
    # themselves, and prepare() broadcasts rank 0's weights.
    set_seed(ctx.seed, device_specific=True)

    # ---- models
    policy_cfg = as_model_config(cfg.model)
    tok = load_tokenizer(policy_cfg)
    tok.padding_side = "left"
    policy = load_policy(policy_cfg, tok, ctx.seed)
    specs = as_specs(cfg.reward)
    if policy_cfg.lora:
        reference = Reference(None)  # adapters disabled = the initial policy
    else:
        ref_model = load_causal_lm(policy_cfg, tok, seed=ctx.seed)
        _disable_dropout(ref_model)
        reference = Reference(prepare_frozen(ref_model, accelerator))
    value = _value_model(cfg, specs, policy_cfg, tok, ctx.seed)
    model = PolicyAndValue(policy, value)
    _disable_dropout(model)
    reward_fn = CombinedReward(specs, device=device, dtype=policy_cfg.dtype)
    for _, fn, _ in reward_fn.parts:
        if hasattr(fn, "model"):
            _disable_dropout(fn.model)
            fn.model = prepare_frozen(fn.model, accelerator)

    # ---- optimisation: one optimizer for policy + value, LR annealed per optimiser step
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay, eps=1e-5)
    total_updates = cfg.steps * cfg.ppo_epochs * cfg.num_minibatches
    if cfg.lr_schedule == "linear":
        schedule = lambda i: max(0.0, 1.0 - i / total_updates)  # noqa: E731
    else:
        schedule = lambda i: 1.0  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    # The scheduler is not passed to prepare(): Accelerate's wrapper steps it
    # once per process per call, which would anneal N times too fast on N ranks.
    model, optimizer = accelerator.prepare(model, optimizer)
    kl_ctl = (core.AdaptiveKLController(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon) if cfg.kl.adaptive
              else core.FixedKLController(cfg.kl.coef))
    score_std = _RunningStd()
    accelerator.register_for_checkpointing(scheduler, kl_ctl, score_std)

    prompts = _prompts(cfg.data.path, cfg.data.columns, cfg.data.max_samples, cfg.data.split)
    logger = MetricsLogger(ctx.stage_dir, ctx.name, ctx.report_to, enabled=accelerator.is_main_process,
                           project=ctx.recipe.run.wandb_project)

    # ---- resume
    ckpt_root = ctx.stage_dir / "checkpoints"
    start_step = 0
    done = sorted((int(p.name.split("-")[1]), p) for p in ckpt_root.glob("step-*") if (p / "step.json").exists()) \
        if ckpt_root.is_dir() else []
    if done:
        start_step, path = done[-1]
        accelerator.load_state(str(path))
        log.info("ppo: resumed from %s (step %d)", path, start_step)
        logger.truncate_after(start_step)

    unwrapped = accelerator.unwrap_model(model)
    mini = cfg.rollout_batch_size // cfg.num_minibatches
    micro = min(cfg.micro_batch_size, mini)
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc="ppo",
               disable=not accelerator.is_main_process, dynamic_ncols=True)
    for step in bar:
        t_step = time.time()
        model.eval()  # no dropout anyway; eval() also keeps generate's caches cheap
        batch_prompts = _step_prompts(prompts, step, cfg.rollout_batch_size, rank, world, ctx.seed)
        prompt_texts = [render_prompt(tok, p) for p in batch_prompts]

        # Sharded (FSDP2 / ZeRO-3): gather the policy and value weights once
        # for the whole rollout instead of once per token (rlhf.sharding).
        with full_weights(model, accelerator):
            # 1. generate
            t0 = time.time()
            query, query_mask, response, response_mask = generate(unwrapped.policy, tok, prompt_texts,
                                                                  cfg.generation, device)
            q = query.size(1)
            input_ids = torch.cat([query, response], 1)
            attention_mask = torch.cat([query_mask, response_mask.long()], 1)
            t_gen = time.time() - t0

            # 2. forward: old log-probs, reference log-probs, values
            t0 = time.time()
            with torch.no_grad():
                logprobs, ref_logprobs, values = _rollout_forward(unwrapped, reference, input_ids,
                                                                  attention_mask, q, cfg)
            t_fwd = time.time() - t0

        # 3. score
        t0 = time.time()
        texts = decode_responses(tok, response, response_mask)
        raw_scores = torch.tensor(reward_fn(batch_prompts, texts), dtype=torch.float32, device=device)
        has_eos = _finished(response == tok.eos_token_id, texts, cfg.generation.stop_strings)
        scores = raw_scores.clone()
        if cfg.missing_eos_penalty is not None:
            scores = torch.where(has_eos, scores, scores - cfg.missing_eos_penalty)
        if cfg.reward_clip is not None:
            scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
        if cfg.normalize_rewards:
            score_std.update(accelerator.gather(scores).cpu())
            scores = scores / score_std.std
        t_score = time.time() - t0

        # 4. rewards: per-token KL penalty, score at the last response token
        kl = core.kl_penalty(logprobs, ref_logprobs, cfg.kl.estimator) * response_mask
        rewards, non_score = core.per_token_rewards(scores, kl, kl_ctl.kl_coef, response_mask)
        if cfg.whiten_rewards:
            rewards = core.masked_whiten(rewards, response_mask, shift_mean=False)

        # 5. advantages
        advantages, returns = core.compute_gae(values, rewards, response_mask, cfg.gamma, cfg.lam)
        advantages = core.masked_whiten(advantages, response_mask)

        # 6. update
        t0 = time.time()
        model.train()
        stats = {k: [] for k in ("pg", "vf", "clip", "vclip", "akl", "ent", "ratio")}
        first_minibatch = None
        for epoch in range(cfg.ppo_epochs):
            order = torch.randperm(cfg.rollout_batch_size, device=device)
            for mb_index, mb in enumerate(_chunks(cfg.rollout_batch_size, mini)):
                mb_ids = order[mb]
                optimizer.zero_grad(set_to_none=True)
                micro_batches = list(_chunks(len(mb_ids), micro))
                for mc_index, mc in enumerate(micro_batches):
                    idx = mb_ids[mc]
                    # DDP: all-reduce gradients once per minibatch, not per micro-batch.
                    last_micro = mc_index == len(micro_batches) - 1
                    with contextlib.nullcontext() if last_micro else _no_sync(accelerator, model):
                        mask = response_mask[idx]
                        new_lp, new_v, ent = model(input_ids[idx], attention_mask[idx], q,
                                                   cfg.generation.temperature, with_entropy=True,
                                                   entropy_grad=cfg.entropy_coef != 0)
                        pg_loss, pg_stats = core.policy_loss(new_lp, logprobs[idx], advantages[idx], mask,
                                                             cfg.clip_range)
                        vf_loss, vclip = core.value_loss(new_v, values[idx], returns[idx], mask,
                                                         cfg.clip_range_value)
                        entropy = core.masked_mean(ent, mask)
                        loss = pg_loss + cfg.vf_coef * vf_loss - cfg.entropy_coef * entropy
                        # Micro-batches are equal slices of the minibatch: scaling
                        # each by its share averages the gradient over the minibatch.
                        accelerator.backward(loss * len(idx) / len(mb_ids))
                    for key, val in (("pg", pg_loss), ("vf", vf_loss), ("clip", pg_stats.clipfrac),
                                     ("vclip", vclip), ("akl", pg_stats.approx_kl), ("ent", entropy),
                                     ("ratio", pg_stats.ratio_mean)):
                        stats[key].append(val.detach())
                    if epoch == 0 and mb_index == 0 and first_minibatch is None:
                        first_minibatch = (pg_stats.ratio_mean.item(), pg_stats.approx_kl.item(),
                                           pg_stats.clipfrac.item())
                if cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
        t_train = time.time() - t0

        # 7. KL controller and logging
        seq_kl = accelerator.gather((kl * response_mask).sum(1)).mean()
        kl_coef_used = kl_ctl.kl_coef
        kl_ctl.update(seq_kl.item(), cfg.rollout_batch_size * world)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            mean = lambda xs: accelerator.reduce(torch.stack(xs).mean(), "mean").item()  # noqa: E731
            g_scores = accelerator.gather(raw_scores)
            g_nonscore = accelerator.gather(non_score.sum(1))
            g_len = accelerator.gather(response_mask.sum(1).float())
            g_eos = accelerator.gather(has_eos.float())
            elapsed = time.time() - t_step
            metrics = {
                "ppo/policy_loss": mean(stats["pg"]), "ppo/value_loss": mean(stats["vf"]),
                "ppo/approx_kl": mean(stats["akl"]), "ppo/clipfrac": mean(stats["clip"]),
                "ppo/value_clipfrac": mean(stats["vclip"]), "ppo/entropy": mean(stats["ent"]),
                "ppo/ratio": mean(stats["ratio"]),
                "ppo/first_minibatch_ratio": first_minibatch[0],
                "ppo/first_minibatch_approx_kl": first_minibatch[1],
                "ppo/first_minibatch_clipfrac": first_minibatch[2],
                "objective/kl": seq_kl.item(), "objective/kl_coef": kl_coef_used,
                "objective/scores": g_scores.mean().item(), "objective/scores_std": g_scores.std().item()
                if g_scores.numel() > 1 else 0.0,
                "objective/rlhf_reward": (g_scores + g_nonscore).mean().item(),
                "objective/non_score_reward": g_nonscore.mean().item(),
                "rollout/response_length": g_len.mean().item(), "rollout/eos_rate": g_eos.mean().item(),
                "perf/generation_s": t_gen, "perf/forward_s": t_fwd, "perf/scoring_s": t_score,
                "perf/training_s": t_train, "perf/step_s": elapsed,
                "perf/samples_per_s": cfg.rollout_batch_size * world / elapsed,
                "perf/tokens_per_s": g_len.sum().item() / elapsed,
                "train/learning_rate": scheduler.get_last_lr()[0],
                "train/episodes": (step + 1) * cfg.rollout_batch_size * world,
            }
            logger.log(metrics, step=step + 1)
            bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.2f}",
                            sps=f"{metrics['perf/samples_per_s']:.1f}")
        if accelerator.is_main_process and ((step + 1) % cfg.sample_every == 0 or step == 0):
            with (ctx.stage_dir / "samples.jsonl").open("a") as f:
                for p, r, s in list(zip(prompt_texts, texts, raw_scores.tolist()))[:4]:
                    f.write(json.dumps({"step": step + 1, "prompt": p, "response": r, "score": s}) + "\n")
            log.info("step %d sample: %r -> %r (score %.3f)", step + 1, prompt_texts[0], texts[0],
                     raw_scores[0].item())
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            _save_state(accelerator, ckpt_root, step + 1)
    bar.close()

    # ---- final: policy checkpoint, held-out gold evaluation, summary
    model.eval()
    final = ctx.stage_dir / "final"
    summary: dict[str, float] = {"train/steps": cfg.steps, "dist/world_size": world,
                                 "train/episodes": cfg.steps * cfg.rollout_batch_size * world}
    history = [r for r in read_metrics(logger.path) if "objective/scores" in r]
    if history:
        summary["objective/scores_first"] = history[0]["objective/scores"]
        summary["objective/scores_last"] = history[-1]["objective/scores"]
        summary["objective/kl_last"] = history[-1]["objective/kl"]
    if cfg.eval.prompts:
        held_out = _gold_eval(cfg, accelerator, model, reference, tok, ctx.seed)
        summary.update(held_out)
        log.info("held-out gold score: %.4f (initial) -> %.4f (ppo), KL(ppo || initial) = %.3f nats",
                 held_out.get("gold/sft", float("nan")), held_out.get("gold/ppo", float("nan")),
                 held_out["kl/ppo"])
    save_full(accelerator, model, tok, final, lambda: load_policy(policy_cfg, tok, ctx.seed), prefix="policy.")
    if accelerator.is_main_process:
        write_summary(ctx.stage_dir, summary)
        if ckpt_root.exists():
            shutil.rmtree(ckpt_root)  # finished: the resumable state is no longer needed
    logger.close()
    accelerator.wait_for_everyone()
    return final


class _AdaptersOff(torch.nn.Module):
    """The LoRA policy with adapters disabled: the initial policy, no copy."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, **kw):
        with self.policy.disable_adapter():
            return self.policy(**kw)

    def generate(self, **kw):
        with self.policy.disable_adapter():
            return self.policy.generate(**kw)


def _deepspeed_config(accelerator, cfg: Config) -> None:
    """Fill in what DeepSpeed needs before any model is prepared.

    The accelerate configs leave the batch sizes "auto", which Accelerate
    fills from a dataloader passed to prepare() and TRL's prepare_deepspeed
    (reference, reward model) does not fill at all; PPO has no dataloader, so
    both would fail. One engine step per minibatch: gradient accumulation over
    its micro-batches is ours (``_no_sync``), so DeepSpeed's is 1. Clipping
    happens inside the engine step, with the config's value: the recipe's
    max_grad_norm replaces it (0 = off, as under DDP/FSDP).
    """
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    micro = min(cfg.micro_batch_size, cfg.rollout_batch_size // cfg.num_minibatches)
    ds.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=1,
              train_batch_size=micro * accelerator.num_processes, gradient_clipping=cfg.max_grad_norm)


@contextlib.contextmanager
def _no_sync(accelerator, model):
    """Accumulate a micro-batch's gradients: no all-reduce, no optimiser step."""
    if accelerator.state.deepspeed_plugin is None:
        with accelerator.no_sync(model):
            yield
        return
    # DeepSpeed: accelerator.no_sync is a no-op under ZeRO-2/3 and
    # accelerator.backward runs engine.step() (clip + optimiser step) after
    # every backward unless sync_gradients is False; it then marks the
    # micro-batch as not an accumulation boundary. No public setter (accelerate 1.15).
    accelerator.gradient_state._set_sync_gradients(False)
    try:
        yield
    finally:
        accelerator.gradient_state._set_sync_gradients(True)


def _save_state(accelerator, root: Path, step: int) -> None:
    """Checkpoint everything a resume needs; written to a temp dir, then renamed,
    so a crash mid-save leaves the previous checkpoint intact."""
    path = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    accelerator.save_state(str(tmp))
    # save_state returns on each rank when its own files are written (every
    # rank writes its RNG state): renaming before all are done races them.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "step.json").write_text(json.dumps({"step": step}))
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
        for old in root.glob("step-*"):  # keep only the newest
            if old != path:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
