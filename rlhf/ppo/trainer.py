"""PPO stage (``type: ppo``): our own on-policy trainer on Accelerate, for
PPO and, with ``advantage: rloo | grpo``, the critic-free RLOO and GRPO
(design and sources: docs/ppo.md, docs/algorithms.md).

One step, CleanRL-style, reads top to bottom in ``train``:

  1. generate   left-padded prompts -> sampled responses, each ended after
                its EOS or stop string (``rlhf.sampling``)          ``rollout``
  2. forward    fp32 log-probs of the policy and the reference, values
  3. score      reward sources on (prompt, response) text; non-finite scores
                skip the step; missing-EOS penalty
  4. rewards    per-token -beta * KL, score added at the last response token
  5. advantages GAE (gamma, lambda), whitened over valid tokens; rloo/grpo:
                each sequence against the other samples of its prompt ``advantages``
  6. update     ppo_epochs x shuffled minibatches x micro-batches (grad accum,
                loss_aggregation over the minibatch); a non-finite loss or gradient
                norm skips the optimiser step; optional target_kl stop ``update``
  7. log        one flat row of statistics to metrics.jsonl (+ wandb/tensorboard)
  8. save       every ``save_every`` steps and on Ctrl-C / SIGTERM

The math lives in ``rlhf.ppo.core`` as pure, tested functions. Checkpoints
hold policy, value, optimizer, scheduler, KL controller, RNG states and the
step (the data position is a function of the step), so a resumed run follows
the same trajectory as an uninterrupted one; metrics.jsonl and samples.jsonl
are cut back to the checkpoint's step. No checkpoint is written from
non-finite weights.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import math
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from rlhf.config import opt, require_positive
from rlhf.data import DataConfig, normalize_prompts, read_records, render_prompt
from rlhf.errors import BadInput, RunFailed
from rlhf.gold import HeldOutCheck as EvalConfig
from rlhf.models import (ModelConfig, as_model_config, context_length, load_causal_lm, load_sequence_classifier,
                         load_policy, load_tokenizer)
from rlhf.ppo import core
from rlhf.ppo.policy import PolicyAndValue, Reference, ScalarHeadModel, value_init_problem, value_source
from rlhf.ppo.watch import WatchConfig, first_alarm
from rlhf.rewards import CombinedReward, NonFiniteReward, RewardSpec, as_specs, check_source
from rlhf.sampling import Generated, SamplingConfig, generate, sample
from rlhf.sharding import full_weights, pad_shard, prepare_frozen, save_full, sharding
from rlhf.textstats import distinct_n, top_ending_share
from rlhf.tracking import MetricsLogger, read_metrics, truncate_jsonl, write_summary
from rlhf.precision import fuse_tanh_gelu, precision_flags, training_attention

log = logging.getLogger(__name__)


@dataclass
class KLConfig:
    """Per-token KL penalty to the reference policy."""

    coef: float = opt(0.05, "beta: initial (adaptive) or fixed KL coefficient")
    estimator: Literal["k1", "k3"] = opt("k1", "k1 = logp - logp_ref; k3 = (r - 1) - log r, r = p_ref/p")
    adaptive: bool = opt(False, "adapt beta toward `target` (Ziegler et al. 2019)")
    target: float = opt(6.0, "adaptive: target KL (nats per sequence)")
    horizon: float = opt(10000.0, "adaptive: horizon in episodes")
    placement: Literal["reward", "loss"] = opt(
        "reward", "reward: -beta * KL per token in the reward (PPO, RLOO; with rloo/grpo summed into each "
                  "sequence's score before the baseline); loss: beta * k3 KL of the current policy per token in "
                  "the loss (GRPO; rloo/grpo only)")

    def check(self, fail):
        if not 0 <= self.coef < math.inf:
            raise fail("coef", f"expected a finite number >= 0, got {self.coef}")
        if not 0 < self.target < math.inf:
            raise fail("target", f"expected a finite number > 0, got {self.target}")
        if not 0 < self.horizon < math.inf:
            raise fail("horizon", f"expected a finite number > 0, got {self.horizon}")


@dataclass
class Config:
    """PPO stage. Defaults run a tiny CPU job; see recipes/ for real sizes."""

    model: str | ModelConfig = opt("tiny", "policy init, usually the SFT stage's final/")
    reference: str | ModelConfig | None = opt(
        None, "KL reference policy; null = `model` (with LoRA: the policy with adapters off). In rounds, "
              "where `model` is the previous round's policy, keep this the SFT policy")
    reward: str | RewardSpec | list[str | RewardSpec] = opt(
        "", "reward source(s): checkpoint dir, module:function, a {source, weight, aggregate, ...} mapping, "
            "or a list of them")
    value_model: str = opt("reward", "advantage gae only. reward: a second trunk initialised from the first "
                                     "reward-model checkpoint (InstructGPT; ~1.6x the step time of policy_head), "
                                     "or policy_head when every reward is a function; policy_head: a value head "
                                     "on the policy (one forward serves both); or a checkpoint dir")
    advantage: Literal["gae", "rloo", "grpo"] = opt(
        "gae", "gae: PPO with a value model; rloo: leave-one-out baseline over the samples of a prompt "
               "(Ahmadian et al. 2024); grpo: scores normalised within the prompt's group (Shao et al. 2024). "
               "rloo and grpo load no value model")
    samples_per_prompt: int = opt(1, "responses sampled per prompt per step (rloo/grpo: >= 2); a step trains on "
                                     "rollout_batch_size * samples_per_prompt sequences")
    scale_advantages: Literal["group", "batch", "none"] = opt(
        "group", "grpo: divide by the group's std (GRPO), the batch's, or not at all (Dr. GRPO)")
    whiten_advantages: bool | None = opt(None, "whiten advantages over the batch; null = yes for gae, no for "
                                               "rloo/grpo (as TRL's defaults)")
    loss_aggregation: Literal["token_mean", "sequence_mean", "constant"] = opt(
        "token_mean", "per-token losses -> one loss: token_mean over the minibatch (PPO, DAPO), sequence_mean "
                      "(the original GRPO), constant = sum / (sequences * max_new_tokens) (Dr. GRPO)")
    data: DataConfig = opt(DataConfig(), "training prompts (`prompt` field)")
    steps: int = opt(20, "PPO steps (each = one rollout batch + its update)")
    rollout_batch_size: int = opt(32, "prompts per step per process")
    num_minibatches: int = opt(2, "minibatches per PPO epoch (one optimiser step each); divides the step's "
                                  "sequences, rollout_batch_size * samples_per_prompt")
    micro_batch_size: int = opt(16, "sequences per forward/backward (gradient accumulation inside a minibatch)")
    forward_batch_size: int = opt(64, "sequences per no-grad forward during the rollout")
    ppo_epochs: int = opt(4, "passes over each rollout batch")
    learning_rate: float = opt(1e-5, "peak learning rate, linearly annealed to 0")
    lr_schedule: Literal["linear", "constant"] = opt("linear", "learning-rate schedule over all optimiser steps")
    max_grad_norm: float = opt(1.0, "gradient clipping max-norm")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    generation: SamplingConfig = opt(SamplingConfig(), "rollout sampling (top_k/top_p bias the ratio and KL; "
                                                       "batch_size: sequences per generate call)")
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
    precision: Literal["auto", "fp32", "bf16", "fp16"] = opt(
        "auto", "mixed precision (autocast; log-probs, KL and losses are fp32 always). auto: bf16 on GPUs that "
                "support it and on CPUs with bf16 instructions (AVX512-BF16 / AMX), fp32 elsewhere")
    save_every: int = opt(25, "checkpoint every N steps for resuming (0 = only at the end; Ctrl-C / SIGTERM "
                              "always saves one)")
    target_kl: float | None = opt(None, "stop a step's epochs early once the mean approx KL of an epoch exceeds "
                                        "this (CleanRL); null = off")
    max_consecutive_skips: int = opt(3, "stop the run (exit 1) after this many steps in a row skipped for "
                                        "non-finite scores, losses or gradient norms")
    log_every: int = opt(1, "log metrics every N steps")
    sample_every: int = opt(10, "write sample responses to samples.jsonl every N steps")
    eval: EvalConfig = opt(EvalConfig(), "held-out gold evaluation at the end")
    watch: WatchConfig = opt(WatchConfig(), "reward-hacking watch: proxy vs held-out signal every N steps, "
                                            "alarm, best/ checkpoint, optional stop (rlhf/ppo/watch.py)")
    length_penalty: float = opt(0.0, "subtracted from each score per response token (counters length bias)")

    def check(self, fail):
        require_positive(self, fail, "steps", "rollout_batch_size", "num_minibatches", "micro_batch_size",
                                     "forward_batch_size", "ppo_epochs", "log_every", "sample_every",
                                     "samples_per_prompt")
        if self.advantage != "gae" and self.samples_per_prompt < 2:
            raise fail("samples_per_prompt", f"advantage {self.advantage} compares the samples of a prompt: "
                                             f"expected >= 2, got {self.samples_per_prompt}")
        if self.advantage == "gae" and self.kl.placement == "loss":
            raise fail("kl.placement", "loss is for advantage rloo or grpo; PPO (gae) puts the KL in the reward")
        if self.sequences % self.num_minibatches:
            raise fail("num_minibatches", f"must divide the step's sequences (rollout_batch_size * "
                                          f"samples_per_prompt = {self.sequences})")
        mini = self.sequences // self.num_minibatches
        if mini % self.micro_batch_size and self.micro_batch_size < mini:
            raise fail("micro_batch_size", f"must divide the minibatch size ({mini})")
        if not as_specs(self.reward) or not all(s.source for s in as_specs(self.reward)):
            raise fail("reward", "required: a reward-model checkpoint dir or module:function (or a list)")
        inf = math.inf
        # (key, valid?, expected): NaN fails every comparison, so it is rejected too.
        for key, ok, expected in (
                ("learning_rate", 0 < self.learning_rate < inf, "a finite number > 0"),
                ("max_grad_norm", 0 <= self.max_grad_norm < inf, "a finite number >= 0 (0 = no clipping)"),
                ("weight_decay", 0 <= self.weight_decay < inf, "a finite number >= 0"),
                ("missing_eos_penalty", self.missing_eos_penalty is None or 0 <= self.missing_eos_penalty < inf,
                 "a finite number >= 0, or null"),
                ("reward_clip", self.reward_clip is None or 0 < self.reward_clip < inf,
                 "a finite number > 0, or null"),
                ("gamma", 0 <= self.gamma <= 1, "a number in [0, 1]"),
                ("lam", 0 <= self.lam <= 1, "a number in [0, 1]"),
                ("clip_range", 0 < self.clip_range < inf, "a finite number > 0"),
                ("clip_range_value", 0 < self.clip_range_value < inf, "a finite number > 0"),
                ("vf_coef", 0 <= self.vf_coef < inf, "a finite number >= 0"),
                ("entropy_coef", 0 <= self.entropy_coef < inf, "a finite number >= 0"),
                ("save_every", self.save_every >= 0, "0 (only at the end) or a positive integer"),
                ("target_kl", self.target_kl is None or 0 < self.target_kl < inf, "a finite number > 0, or null"),
                ("max_consecutive_skips", self.max_consecutive_skips >= 1, "a positive integer"),
                ("length_penalty", 0 <= self.length_penalty < inf, "a finite number >= 0 (per token)")):
            if not ok:
                raise fail(key, f"expected {expected}, got {getattr(self, key)}")
        if self.watch.every and not (self.watch.prompts or self.eval.prompts):
            raise fail("watch.prompts", "the watch needs held-out prompts: set watch.prompts or eval.prompts")
        if self.watch.every and not (self.watch.heldout or self.eval.gold):
            raise fail("watch.heldout", "the watch needs a held-out signal: a gold scorer or a reward model PPO "
                                        "does not optimise (watch.heldout or eval.gold)")
        if self.generation.samples_per_prompt != 1:
            raise fail("generation.samples_per_prompt", "expected 1: set the stage's samples_per_prompt instead")
        if not self.value_model:
            raise fail("value_model", "expected reward, policy_head or a checkpoint dir")

    @property
    def sequences(self) -> int:
        """Sequences per step per process."""
        return self.rollout_batch_size * self.samples_per_prompt

    @property
    def critic_free(self) -> bool:
        return self.advantage != "gae"

    @property
    def old_logprobs_from_update(self) -> bool:
        """Whether the rollout can skip the policy's log-prob forward.

        With one epoch of one minibatch, the update's forward runs on the same
        sequences with the weights that sampled them, so its log-probs are the
        old ones (ratio exactly 1; TRL's GRPO does the same). Only when nothing
        needs them before the update: no value model, and no KL in the reward
        (the advantages would need it)."""
        kl_in_reward = self.kl.placement == "reward" and (self.kl.coef > 0 or self.kl.adaptive)
        return self.ppo_epochs == 1 and self.num_minibatches == 1 and self.critic_free and not kl_in_reward


# ---------------------------------------------------------------- inputs


def _prompts(path: str, columns: dict, limit: int | None = None, split: str = "train") -> list:
    return normalize_prompts(read_records(path, split, columns, limit))


def validate(cfg: Config, ctx) -> None:
    source = ctx.loadable(cfg.model)
    tok = load_tokenizer(source)
    if cfg.reference is not None:
        ref_tok = load_tokenizer(ctx.loadable(cfg.reference))
        if ref_tok.get_vocab() != tok.get_vocab():
            raise BadInput(f"stages.{ctx.name}.reference: its tokenizer differs from the policy's "
                           "(the KL compares the two models' log-probs of the same tokens)")
    for spec in as_specs(cfg.reward):
        check_source(spec.source, ctx.produces)
    if cfg.value_model not in ("reward", "policy_head"):
        check_source(cfg.value_model, ctx.produces)
        if not cfg.critic_free and Path(cfg.value_model).exists() and \
                (problem := value_init_problem(cfg.value_model, tok)) is not None:
            raise BadInput(f"stages.{ctx.name}.value_model: {cfg.value_model} cannot be the value model: {problem}; "
                           "use policy_head (or `reward` to start from a decoder reward model)")
    if cfg.eval.gold:
        check_source(cfg.eval.gold)
    if cfg.watch.every and cfg.watch.heldout:
        check_source(cfg.watch.heldout, ctx.produces)
    limit = context_length(source)
    files = [(cfg.data.path, cfg.data.split)] + ([(cfg.eval.prompts, "test")] if cfg.eval.prompts else [])
    if cfg.watch.every and cfg.watch.prompts:
        files.append((cfg.watch.prompts, "test"))
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


class _SkipCounter:
    """Steps skipped for non-finite values: the total (logged) and the current
    run of consecutive ones (which stops training at ``max_consecutive_skips``).
    Checkpointed, so a resumed run counts on."""

    def __init__(self):
        self.total, self.consecutive = 0, 0

    def state_dict(self) -> dict:
        return {"total": self.total, "consecutive": self.consecutive}

    def load_state_dict(self, s: dict) -> None:
        self.total, self.consecutive = s["total"], s["consecutive"]


# ---------------------------------------------------------------- models


def _disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off in every model, or log-probs differ between the rollout and
    the first training pass and the ratio is not 1 (docs/ppo.md). Also the
    functional attention dropout of Llama-style attention modules, which reads
    a float attribute rather than an ``nn.Dropout``."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
        config = getattr(m, "config", None)
        if isinstance(getattr(config, "attention_dropout", None), float):
            config.attention_dropout = 0.0


def _ready_to_run(model: torch.nn.Module, bf16: bool) -> None:
    """Every model PPO runs forward (policy and value, reference, reward
    models): dropout off (see :func:`_disable_dropout`) and, in bf16 runs, the
    fused tanh-GELU (see :func:`fuse_tanh_gelu`), so that models with the same
    weights give the same log-probs."""
    _disable_dropout(model)
    if bf16:
        fuse_tanh_gelu(model)


def _value_model(cfg: Config, specs: list[RewardSpec], policy_cfg: ModelConfig, tok, seed: int):
    """The separate value model, or None for a value head on the policy (or none at all: rloo/grpo)."""
    name = value_source(cfg.value_model, cfg.critic_free, specs, lambda src: value_init_problem(src, tok))
    if name is None:
        return None
    source = ModelConfig(name=name)
    source.dtype = policy_cfg.dtype
    clf = load_sequence_classifier(source, tok, seed=seed)
    if source.name == policy_cfg.name:
        torch.nn.init.zeros_(clf.score.weight)
    return ScalarHeadModel(clf)


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


@dataclass
class _WatchState:
    """The watch's history (rebuilt from metrics.jsonl on resume) and outcome."""

    proxy: list[float] = field(default_factory=list)
    heldout: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    alarm_step: int | None = None
    stopped: bool = False
    heldout_fn: CombinedReward | None = None  # loaded at the first watch point


@dataclass
class _Run:
    """Everything a PPO run holds between steps."""

    cfg: Config
    ctx: object
    accelerator: object
    tok: object
    policy_cfg: ModelConfig
    model: object  # PolicyAndValue, prepared (DDP / FSDP / DeepSpeed)
    reference: Reference
    reward_fn: CombinedReward
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    kl_ctl: core.KLController
    score_std: _RunningStd
    skips: _SkipCounter
    prompts: list
    logger: MetricsLogger
    watch: _WatchState = field(default_factory=lambda: _WatchState())

    @property
    def ckpt_root(self) -> Path:
        return self.ctx.stage_dir / "checkpoints"


def _setup(cfg: Config, ctx) -> _Run:
    """Accelerator, models, optimiser and schedule; nothing trained yet."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    flags = precision_flags(cfg.precision, cpu_bf16=True)
    mixed = "bf16" if flags["bf16"] else "fp16" if flags["fp16"] else "no"
    if AcceleratorState._shared_state.get("_mixed_precision", mixed) != mixed:
        # An earlier stage in this process (a PPO stage in another precision)
        # initialised Accelerate's per-process state, which refuses a second
        # precision: start it afresh, as HF's Trainer does between runs. The
        # process group (PartialState) is kept.
        AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=mixed)
    sharding(accelerator)  # FSDP1 cannot run PPO's local generation: say so before loading anything
    if accelerator.state.deepspeed_plugin is not None:
        _deepspeed_config(accelerator, cfg)
    policy_cfg = as_model_config(cfg.model)
    tok = load_tokenizer(policy_cfg)
    tok.padding_side = "left"
    # Presets and new heads seed their own initialisation without touching
    # the global RNG, and prepare() broadcasts rank 0's weights.
    policy = load_policy(policy_cfg, tok, ctx.seed)
    if policy_cfg.lora and cfg.reference is None:
        reference = Reference(None)  # adapters disabled = the initial policy
    else:
        ref_cfg = policy_cfg if cfg.reference is None else as_model_config(cfg.reference)
        ref_model = load_causal_lm(dataclasses.replace(ref_cfg, lora=None), tok, seed=ctx.seed)
        _ready_to_run(ref_model, flags["bf16"])  # as the policy below: same weights, same log-probs
        reference = Reference(prepare_frozen(ref_model, accelerator))
    specs = as_specs(cfg.reward)
    model = PolicyAndValue(policy, _value_model(cfg, specs, policy_cfg, tok, ctx.seed),
                           value_head=not cfg.critic_free)
    _ready_to_run(model, flags["bf16"])
    reward_fn = CombinedReward(specs, device=accelerator.device, dtype=policy_cfg.dtype)
    for _, fn, _ in reward_fn.parts:
        if hasattr(fn, "model"):
            _ready_to_run(fn.model, flags["bf16"])
            fn.model = prepare_frozen(fn.model, accelerator)
    # One optimizer for policy + value, LR annealed per optimiser step.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay, eps=1e-5)
    total_updates = cfg.steps * cfg.ppo_epochs * cfg.num_minibatches
    linear = cfg.lr_schedule == "linear"
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: max(0.0, 1.0 - i / total_updates) if linear else 1.0)
    # The scheduler is not passed to prepare(): Accelerate's wrapper steps it
    # once per process per call, which would anneal N times too fast on N ranks.
    model, optimizer = accelerator.prepare(model, optimizer)
    kl_ctl = (core.AdaptiveKLController(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon) if cfg.kl.adaptive
              else core.FixedKLController(cfg.kl.coef))
    run = _Run(cfg, ctx, accelerator, tok, policy_cfg, model, reference, reward_fn, optimizer, scheduler, kl_ctl,
               _RunningStd(), _SkipCounter(), _prompts(cfg.data.path, cfg.data.columns, cfg.data.max_samples,
                                                      cfg.data.split),
               MetricsLogger(ctx.stage_dir, ctx.name, ctx.report_to, enabled=accelerator.is_main_process,
                             project=ctx.recipe.run.wandb_project))
    accelerator.register_for_checkpointing(scheduler, kl_ctl, run.score_std, run.skips)
    # Sampling seed: (seed, rank), so every rank draws its own responses and
    # the recipe seed decides them; set after loading, which never re-seeds.
    seed = cfg.generation.seed if cfg.generation.seed is not None else ctx.seed
    set_seed(seed, device_specific=True)  # seed + rank
    return run


# ---------------------------------------------------------------- 1-3. rollout


@dataclass
class Rollout:
    """One step's samples and what the update needs, on this rank.

    Shapes: b = rollout_batch_size * samples_per_prompt, q = prompt width (left-padded), r =
    response width (right-padded). Per-token tensors are (b, r) and zero
    outside ``response_mask``.
    """

    prompt_texts: list[str]  # b rendered prompts
    texts: list[str]  # b decoded responses
    input_ids: torch.Tensor  # (b, q + r)
    attention_mask: torch.Tensor  # (b, q + r)
    context_length: int  # q
    response_mask: torch.Tensor  # (b, r) bool
    finished: torch.Tensor  # (b,) bool: ended by EOS or a stop string
    logprobs: torch.Tensor  # (b, r) fp32, the policy that sampled
    ref_logprobs: torch.Tensor  # (b, r) fp32, the reference
    values: torch.Tensor  # (b, r); zeros for rloo/grpo
    raw_scores: torch.Tensor  # (b,) the reward sources' weighted sum
    scores: torch.Tensor  # (b,) after the missing-EOS penalty, clipping and normalisation
    timings: dict[str, float]
    nonfinite: str | None = None  # why this rollout cannot be trained on
    kl: torch.Tensor | None = None  # (b, r) per-token KL estimate            (set by `advantages`)
    non_score: torch.Tensor | None = None  # (b, r) -beta * KL
    rewards: torch.Tensor | None = None  # (b, r) non_score + score at the last token
    advantages: torch.Tensor | None = None  # (b, r) GAE (whitened), or a sequence's RLOO/GRPO advantage
    returns: torch.Tensor | None = None  # (b, r) advantages + values (before whitening); gae only


def rollout(run: _Run, step: int) -> Rollout:
    """1. generate, 2. forward (old log-probs, reference log-probs, values), 3. score."""
    cfg, acc = run.cfg, run.accelerator
    unwrapped = acc.unwrap_model(run.model)
    prompts = _step_prompts(run.prompts, step, cfg.rollout_batch_size, acc.process_index, acc.num_processes,
                            run.ctx.seed)
    # rloo/grpo: the k samples of a prompt are consecutive rows (the groups of
    # core.rloo_advantages), always on one rank.
    prompts = [p for p in prompts for _ in range(cfg.samples_per_prompt)]
    prompt_texts = [render_prompt(run.tok, p) for p in prompts]
    timings = {}
    # Sharded (FSDP2 / ZeRO-3): the policy and value weights gathered once for
    # the whole rollout instead of once per token (rlhf.sharding). One
    # precision context for every log-prob forward (policy, reference,
    # rollout and update): with identical weights the KL is then exactly 0.
    with full_weights(run.model, acc), acc.autocast(), torch.no_grad():
        t0 = time.time()
        gens = [generate(unwrapped.policy, run.tok, prompt_texts[sl], cfg.generation, acc.device)
                for sl in _chunks(len(prompt_texts), cfg.generation.batch_size)]
        gen = gens[0] if len(gens) == 1 else _concat(gens, run.tok.pad_token_id)
        timings["generation_s"] = time.time() - t0
        t0 = time.time()
        logprobs, ref_logprobs, values = _forwards(run, gen.input_ids, gen.attention_mask, gen.query_ids.size(1),
                                                   policy=not cfg.old_logprobs_from_update, reference=True)
        timings["forward_s"] = time.time() - t0
    t0 = time.time()
    # Reward models score in the run's precision too (bf16: about twice as fast
    # on hardware with bf16 matmuls; the scores come back as float32).
    with acc.autocast():
        raw, nonfinite = _score(run, step, prompts, gen.texts)
    scores = raw.clone()
    if cfg.missing_eos_penalty is not None:
        scores = torch.where(gen.finished, scores, scores - cfg.missing_eos_penalty)
    if cfg.length_penalty:
        scores = scores - cfg.length_penalty * gen.response_mask.sum(1).float()
    if cfg.reward_clip is not None:
        scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
    if cfg.normalize_rewards and nonfinite is None:
        run.score_std.update(acc.gather(scores).cpu())
        scores = scores / run.score_std.std
    timings["scoring_s"] = time.time() - t0
    return Rollout(prompt_texts, gen.texts, gen.input_ids, gen.attention_mask, gen.query_ids.size(1),
                   gen.response_mask, gen.finished, logprobs, ref_logprobs, values, raw, scores, timings, nonfinite)


def _forwards(run: _Run, input_ids, attention_mask, q: int, policy: bool, reference: bool):
    """Log-probs of the responses under the policy (with its values) and the
    reference, in chunks of ``forward_batch_size``; zeros for what is not
    asked for (``old_logprobs_from_update``: the update's forward fills the
    policy's). Runs in the caller's precision and no-grad context, with the
    update's attention kernel, so identical weights give identical log-probs."""
    cfg, acc = run.cfg, run.accelerator
    unwrapped = acc.unwrap_model(run.model)
    lps, refs, values = [], [], []
    with training_attention(acc.device, acc.mixed_precision == "bf16", input_ids.size(1)):
        for sl in _chunks(input_ids.size(0), cfg.forward_batch_size):
            ids, mask = input_ids[sl], attention_mask[sl]
            zeros = torch.zeros(ids.size(0), ids.size(1) - q, device=ids.device)
            if reference:
                refs.append(run.reference.logprobs(unwrapped.policy, ids, mask, q, cfg.generation.temperature))
            lp, v = zeros, None
            if policy:
                lp, v, _ = unwrapped(ids, mask, q, cfg.generation.temperature, with_values=not cfg.critic_free)
            lps.append(lp)
            values.append(v if v is not None else zeros)
    return torch.cat(lps), torch.cat(refs) if refs else None, torch.cat(values)


def _concat(gens: list, pad_id: int):
    """Generation chunks (each padded to its own widths) as one batch."""
    q = max(g.query_ids.size(1) for g in gens)
    r = max(g.response_ids.size(1) for g in gens)
    left = lambda t, v: torch.nn.functional.pad(t, (q - t.size(1), 0), value=v)  # noqa: E731
    right = lambda t, v: torch.nn.functional.pad(t, (0, r - t.size(1)), value=v)  # noqa: E731
    return Generated(torch.cat([left(g.query_ids, pad_id) for g in gens]),
                     torch.cat([left(g.query_mask, 0) for g in gens]),
                     torch.cat([right(g.response_ids, pad_id) for g in gens]),
                     torch.cat([right(g.response_mask, False) for g in gens]),
                     torch.cat([g.finished for g in gens]), [t for g in gens for t in g.texts])


def _score(run: _Run, step: int, prompts: list, texts: list[str]) -> tuple[torch.Tensor, str | None]:
    """The reward sources' scores (b,), and why they cannot be trained on (a
    non-finite score on any rank: every rank then skips the step together)."""
    device = run.accelerator.device
    problem = None
    try:
        raw = torch.tensor(run.reward_fn(prompts, texts), dtype=torch.float32, device=device)
    except NonFiniteReward as e:
        problem = f"step {step + 1}: {e}"
        raw = torch.zeros(len(texts), device=device)
    bad = run.accelerator.reduce(torch.tensor([float(problem is not None)], device=device), "sum")
    if problem is None and bad.item() > 0:
        problem = f"step {step + 1}: another process's reward source returned non-finite scores"
    return raw, problem


# ---------------------------------------------------------------- 4-5. rewards and advantages


def advantages(run: _Run, ro: Rollout) -> None:
    """4. per-token rewards (-beta * KL, the score at the last token), 5. GAE
    whitened over valid tokens; or (rloo/grpo) each sequence's summed reward
    compared with the other samples of its prompt. Fills ``ro.kl ... ro.returns``."""
    cfg = run.cfg
    mask = ro.response_mask
    # old_logprobs_from_update: the log-probs come with the update; no KL in the
    # reward then, and the logged KL is measured after it (kl_after_update).
    ro.kl = (torch.zeros_like(ro.ref_logprobs) if cfg.old_logprobs_from_update
             else core.kl_penalty(ro.logprobs, ro.ref_logprobs, cfg.kl.estimator) * mask)
    beta = run.kl_ctl.kl_coef if cfg.kl.placement == "reward" else 0.0
    ro.rewards, ro.non_score = core.per_token_rewards(ro.scores, ro.kl, beta, mask)
    if cfg.whiten_rewards:
        ro.rewards = core.masked_whiten(ro.rewards, mask, shift_mean=False)
    whiten = cfg.whiten_advantages if cfg.whiten_advantages is not None else not cfg.critic_free
    if not cfg.critic_free:
        adv, ro.returns = core.compute_gae(ro.values, ro.rewards, mask, cfg.gamma, cfg.lam)
        ro.advantages = core.masked_whiten(adv, mask) if whiten else adv
        return
    # With gamma = 1 and no value, every token's return is the sequence's
    # summed reward: the score minus beta * its KL.
    total = ro.rewards.sum(1)
    k = cfg.samples_per_prompt
    adv = (core.rloo_advantages(total, k) if cfg.advantage == "rloo"
           else core.group_normalized_advantages(total, k, cfg.scale_advantages))
    if whiten:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    ro.advantages = adv.unsqueeze(1) * mask
    ro.returns = torch.zeros_like(ro.values)


def kl_after_update(run: _Run, ro: Rollout, updated: bool) -> None:
    """old_logprobs_from_update: the per-token KL of the sampling policy to the
    reference, from the log-probs the update's forward recorded (or, when the
    step was skipped, from a forward of its own)."""
    cfg = run.cfg
    if not cfg.old_logprobs_from_update:
        return
    if not updated:
        with full_weights(run.model, run.accelerator), run.accelerator.autocast(), torch.no_grad():
            ro.logprobs = _forwards(run, ro.input_ids, ro.attention_mask, ro.context_length, policy=True,
                                    reference=False)[0]
    ro.kl = core.kl_penalty(ro.logprobs, ro.ref_logprobs, cfg.kl.estimator) * ro.response_mask


# ---------------------------------------------------------------- 6. update


@dataclass
class UpdateStats:
    """Per-micro-batch statistics of one step's update (means are taken when logged)."""

    policy_loss: list = field(default_factory=list)
    value_loss: list = field(default_factory=list)
    clipfrac: list = field(default_factory=list)
    value_clipfrac: list = field(default_factory=list)
    approx_kl: list = field(default_factory=list)
    entropy: list = field(default_factory=list)
    ratio: list = field(default_factory=list)
    kl_loss: list = field(default_factory=list)  # kl.placement: loss
    first_minibatch: tuple[float, float, float] | None = None  # ratio, approx_kl, clipfrac
    optimizer_steps: int = 0
    skipped_updates: int = 0  # optimiser steps skipped for a non-finite loss or gradient norm
    epochs: int = 0  # epochs run (fewer than ppo_epochs after a target_kl stop)
    seconds: float = 0.0


def update(run: _Run, ro: Rollout) -> UpdateStats:
    """6. ``ppo_epochs`` passes over the rollout in shuffled minibatches, one
    optimiser step each; stops early when ``target_kl`` is exceeded."""
    cfg, acc = run.cfg, run.accelerator
    t0 = time.time()
    stats = UpdateStats()
    run.model.train()
    n = cfg.sequences
    mini = n // cfg.num_minibatches
    bf16 = acc.mixed_precision == "bf16"
    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(n, device=acc.device)
        epoch_kl = []
        with training_attention(acc.device, bf16, ro.input_ids.size(1)):
            for mb in _chunks(n, mini):
                epoch_kl.append(_minibatch_step(run, ro, order[mb], stats))
        stats.epochs = epoch + 1
        mean_kl = acc.reduce(torch.stack(epoch_kl).mean(), "mean").item()
        if cfg.target_kl is not None and mean_kl > cfg.target_kl:
            log.info("ppo: approx KL %.4f > target_kl %.4f after epoch %d: update stopped", mean_kl,
                     cfg.target_kl, epoch + 1)
            break
    run.model.eval()
    stats.seconds = time.time() - t0
    return stats


def _minibatch_step(run: _Run, ro: Rollout, idx_mb: torch.Tensor, stats: UpdateStats) -> torch.Tensor:
    """Gradient of one minibatch over its micro-batches, then one optimiser
    step unless the loss or the gradient norm is non-finite. Returns the
    minibatch's approx KL.

    Each micro-batch's loss is aggregated with the whole minibatch's token and
    sequence counts (``core.aggregate_loss``), so the gradient does not depend
    on ``micro_batch_size`` (a memory setting only).
    """
    cfg, acc, model = run.cfg, run.accelerator, run.model
    micro = min(cfg.micro_batch_size, len(idx_mb))
    counts = {"tokens": ro.response_mask[idx_mb].sum().clamp(min=1), "sequences": len(idx_mb)}
    run.optimizer.zero_grad(set_to_none=True)
    finite, kls = True, []
    pieces = list(_chunks(len(idx_mb), micro))
    for i, mc in enumerate(pieces):
        idx = idx_mb[mc]
        # DDP: all-reduce gradients once per minibatch, not per micro-batch.
        with contextlib.nullcontext() if i == len(pieces) - 1 else _no_sync(acc, model):
            loss, parts, pg = _micro_loss(run, ro, idx, counts)
            finite = finite and bool(torch.isfinite(loss))
            acc.backward(loss)
        for name, value in parts.items():
            getattr(stats, name).append(value.detach())
        kls.append(pg.approx_kl.detach())
        if stats.first_minibatch is None:
            stats.first_minibatch = (pg.ratio_mean.item(), pg.approx_kl.item(), pg.clipfrac.item())
    # max_grad_norm 0: no clipping, but the norm is still measured (inf never clips).
    grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
    # DeepSpeed clips (and skips overflowing steps) inside its engine and returns no norm here.
    finite = finite and (grad_norm is None or bool(torch.isfinite(torch.as_tensor(grad_norm))))
    # Every rank decides alike: a NaN gradient is in every rank's after the
    # all-reduce, but a non-finite local loss must be shared explicitly.
    ok = acc.reduce(torch.tensor([float(finite)], device=acc.device), "sum").item() == acc.num_processes
    if ok:
        run.optimizer.step()
        stats.optimizer_steps += 1
    else:
        run.optimizer.zero_grad(set_to_none=True)
        stats.skipped_updates += 1
        log.warning("ppo: non-finite loss or gradient norm (%s): optimiser step skipped",
                    grad_norm if grad_norm is not None else "?")
    run.scheduler.step()  # the schedule follows the planned optimiser steps, taken or skipped
    return torch.stack(kls).mean()


def _micro_loss(run: _Run, ro: Rollout, idx: torch.Tensor, counts: dict):
    """The loss of micro-batch ``idx``, scaled as its share of the minibatch's
    (``counts``), its logged parts and the policy-loss statistics.

    loss = policy surrogate [+ vf_coef * value loss (gae)] [+ beta * k3 KL to the
    reference (kl.placement: loss)] - entropy_coef * entropy, every per-token
    term aggregated by ``loss_aggregation``.
    """
    cfg = run.cfg
    mask = ro.response_mask[idx]
    new_lp, new_v, ent = run.model(ro.input_ids[idx], ro.attention_mask[idx], ro.context_length,
                                   cfg.generation.temperature, with_entropy=True, with_values=not cfg.critic_free,
                                   entropy_grad=cfg.entropy_coef != 0)
    own = functools.partial(core.aggregate_loss, mask=mask, how=cfg.loss_aggregation,
                            max_len=cfg.generation.max_new_tokens)
    if cfg.old_logprobs_from_update:  # each row is visited once, before any optimiser step
        ro.logprobs[idx] = new_lp.detach()
    per_token, pg = core.clipped_surrogate(new_lp, ro.logprobs[idx], ro.advantages[idx], mask, cfg.clip_range)
    entropy = core.masked_mean(ent, mask)
    parts = {"policy_loss": own(per_token.detach()), "entropy": entropy, "clipfrac": pg.clipfrac,
             "approx_kl": pg.approx_kl, "ratio": pg.ratio_mean}
    token_terms = -cfg.entropy_coef * entropy  # token means, whatever the aggregation
    if not cfg.critic_free:
        vf_loss, vclip = core.value_loss(new_v, ro.values[idx], ro.returns[idx], mask, cfg.clip_range_value)
        token_terms = token_terms + cfg.vf_coef * vf_loss
        parts.update(value_loss=vf_loss, value_clipfrac=vclip)
    kl = core.kl_penalty(new_lp, ro.ref_logprobs[idx], "k3") if cfg.kl.placement == "loss" else None
    if kl is not None:
        parts["kl_loss"] = own(kl.detach())
    if cfg.loss_aggregation == "token_mean":
        # Every term a token mean: the micro-batch's loss times its token share
        # (the order of operations PPO runs have always reproduced with).
        loss = own(per_token) + token_terms + (run.kl_ctl.kl_coef * own(kl) if kl is not None else 0)
        return loss * mask.sum() / counts["tokens"], parts, pg
    # sequence_mean / constant: the per-sequence terms divided by the minibatch's counts.
    whole = functools.partial(own, **counts)
    share = mask.sum() / counts["tokens"]
    loss = whole(per_token) + token_terms * share + (run.kl_ctl.kl_coef * whole(kl) if kl is not None else 0)
    return loss, parts, pg


# ---------------------------------------------------------------- 7. log


def log_step(run: _Run, step: int, ro: Rollout, stats: UpdateStats | None, seq_kl: float, kl_coef: float,
             t_step: float) -> dict:
    """7. one flat metrics row (docs/ppo.md lists each), to metrics.jsonl and the trackers."""
    cfg, acc = run.cfg, run.accelerator
    world = acc.num_processes
    mean = lambda xs: acc.reduce(torch.stack(xs).mean(), "mean").item() if xs else float("nan")  # noqa: E731
    g_raw, g_scores = acc.gather(ro.raw_scores), acc.gather(ro.scores)
    # -beta * KL whether the KL sits in the reward or (kl.placement: loss) in the loss.
    g_non_score = -kl_coef * acc.gather(ro.kl.sum(1))
    g_len = acc.gather(ro.response_mask.sum(1).float())
    elapsed = time.time() - t_step
    metrics = {}
    if stats is not None and stats.policy_loss:
        metrics.update({
            "ppo/policy_loss": mean(stats.policy_loss),
            "ppo/approx_kl": mean(stats.approx_kl), "ppo/clipfrac": mean(stats.clipfrac),
            "ppo/entropy": mean(stats.entropy), "ppo/ratio": mean(stats.ratio),
            "ppo/first_minibatch_ratio": stats.first_minibatch[0],
            "ppo/first_minibatch_approx_kl": stats.first_minibatch[1],
            "ppo/first_minibatch_clipfrac": stats.first_minibatch[2],
            "ppo/epochs": stats.epochs, "ppo/skipped_updates": stats.skipped_updates,
            "perf/training_s": stats.seconds})
        if not cfg.critic_free:
            # Per rank (response widths differ between ranks), averaged.
            explained = core.explained_variance(ro.values, ro.returns, ro.response_mask).to(acc.device)
            metrics.update({"ppo/value_loss": mean(stats.value_loss), "ppo/value_clipfrac": mean(stats.value_clipfrac),
                            "ppo/explained_variance": acc.reduce(explained, "mean").item()})
        if stats.kl_loss:
            metrics["ppo/kl_loss"] = mean(stats.kl_loss)
    if cfg.critic_free:
        # Prompts whose k samples scored alike teach nothing (advantage 0).
        groups = g_scores.view(-1, cfg.samples_per_prompt)
        metrics["rollout/zero_std_groups"] = (groups.std(1) < 1e-6).float().mean().item()
    metrics.update({
        "ppo/skipped_steps": run.skips.total,
        "objective/kl": seq_kl, "objective/kl_coef": kl_coef,
        "objective/scores": g_raw.mean().item(),
        "objective/scores_std": g_raw.std().item() if g_raw.numel() > 1 else 0.0,
        # The reward PPO maximises: scores after the missing-EOS penalty, clipping
        # and normalisation, plus the KL penalty.
        "objective/rlhf_reward": (g_scores + g_non_score).mean().item(),
        "objective/non_score_reward": g_non_score.mean().item(),
        "rollout/response_length": g_len.mean().item(),
        "rollout/eos_rate": acc.gather(ro.finished.float()).mean().item(),
        **{f"perf/{k}": v for k, v in ro.timings.items()}, "perf/step_s": elapsed,
        "perf/samples_per_s": cfg.sequences * world / elapsed,
        "perf/tokens_per_s": g_len.sum().item() / elapsed,
        "train/learning_rate": run.scheduler.get_last_lr()[0],
        "train/episodes": (step + 1) * cfg.sequences * world,
    })
    run.logger.log(metrics, step=step + 1)
    return metrics


def _write_samples(run: _Run, step: int, ro: Rollout) -> None:
    if not run.accelerator.is_main_process:
        return
    with (run.ctx.stage_dir / "samples.jsonl").open("a") as f:
        for p, r, s in list(zip(ro.prompt_texts, ro.texts, ro.raw_scores.tolist()))[:4]:
            f.write(json.dumps({"step": step + 1, "prompt": p, "response": r, "score": s}) + "\n")
    log.info("step %d sample: %r -> %r (score %.3f)", step + 1, ro.prompt_texts[0], ro.texts[0],
             ro.raw_scores[0].item())


# ---------------------------------------------------------------- the loop


def train(cfg: Config, ctx) -> Path:
    """The numbered steps of the module docstring, ``cfg.steps`` times."""
    run = _setup(cfg, ctx)
    start = _resume(run)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="ppo",
               disable=not run.accelerator.is_main_process, dynamic_ncols=True)
    with _InterruptSaver(run) as interrupt:
        for step in bar:
            t_step = time.time()
            ro = rollout(run, step)  # 1-3
            advantages(run, ro)  # 4-5
            stats = None
            if ro.nonfinite is None:
                stats = update(run, ro)  # 6
            kl_after_update(run, ro, stats is not None)
            _count_skips(run, ro, stats)
            seq_kl = run.accelerator.gather((ro.kl * ro.response_mask).sum(1)).mean().item()
            kl_coef = run.kl_ctl.kl_coef
            if ro.nonfinite is None:
                run.kl_ctl.update(seq_kl, cfg.sequences * run.accelerator.num_processes)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps or ro.nonfinite:
                m = log_step(run, step, ro, stats, seq_kl, kl_coef, t_step)  # 7
                bar.set_postfix(score=f"{m['objective/scores']:.3f}", kl=f"{m['objective/kl']:.2f}",
                                sps=f"{m['perf/samples_per_s']:.1f}")
            if (step + 1) % cfg.sample_every == 0 or step == 0:
                _write_samples(run, step, ro)
            if cfg.watch.every and (step + 1) % cfg.watch.every == 0 and _watch(run, step + 1):
                break  # stop_on_hacking
            if interrupt.requested() or (cfg.save_every and (step + 1) % cfg.save_every == 0
                                         and step + 1 < cfg.steps):
                _save_state(run, step + 1)
            interrupt.stop_if_requested(step + 1)
    bar.close()
    return _finish(run)


def _watch(run: _Run, step: int) -> bool:
    """The reward-hacking watch (rlhf/ppo/watch.py) at ``step``: sample the
    fixed held-out prompts, log ``watch/*``, keep ``best/``, raise the alarm.
    Returns True when the run should stop (``stop_on_hacking``)."""
    from accelerate.utils import gather_object

    cfg, acc, w = run.cfg, run.accelerator, run.cfg.watch
    held = _held_out(run, w.prompts or cfg.eval.prompts, w.max_prompts)
    share, real = held.share, held.real
    run.model.eval()
    got = _sample_trained(run, held)
    run.model.train()
    state = run.watch
    if state.heldout_fn is None:
        state.heldout_fn = CombinedReward([RewardSpec(source=w.heldout or cfg.eval.gold)], device=acc.device)
    every = gather_object(list(zip(run.reward_fn(share[:real], got.texts[:real]),
                                   state.heldout_fn(share[:real], got.texts[:real]), got.kl[:real],
                                   got.lengths[:real], got.texts[:real])))
    proxy, heldout, kl, length, all_texts = (list(x) for x in zip(*every))
    state.proxy.append(float(np.mean(proxy)))
    state.heldout.append(float(np.mean(heldout)))
    state.steps.append(step)
    row = {"watch/proxy": state.proxy[-1], "watch/heldout": state.heldout[-1], "watch/kl": float(np.mean(kl)),
           "watch/length": float(np.mean(length)), "watch/distinct_2": distinct_n(all_texts, 2),
           "watch/top_ending_share": top_ending_share(all_texts)}
    if w.keep_best and state.heldout[-1] == max(state.heldout):
        _save_policy(run, run.ctx.stage_dir / "best", extra={"best.json": {"step": step, "heldout": state.heldout[-1]}})
        row["watch/best_step"] = step
    fired = state.alarm_step is None and first_alarm(state.proxy, state.heldout, w.patience, w.threshold) == len(
        state.heldout) - 1
    if fired:
        state.alarm_step = step
        row["watch/alarm"] = 1
        peak = int(np.argmax(state.heldout))
        log.warning("ppo: reward hacking? at step %d the training reward rose %.3f -> %.3f since step %d while the "
                    "held-out signal fell %.3f -> %.3f (watch: patience %d, threshold %g)%s", step,
                    state.proxy[peak], state.proxy[-1], state.steps[peak], state.heldout[peak], state.heldout[-1],
                    w.patience, w.threshold, "; stopping (stop_on_hacking), final/ = best/" if w.stop_on_hacking
                    else f"; the best policy so far is in {run.ctx.stage_dir / 'best'}")
    run.logger.log(row, step=step)
    state.stopped = bool(fired and w.stop_on_hacking)
    return state.stopped


def _save_policy(run: _Run, out: Path, extra: dict | None = None) -> None:
    """The policy as a plain HF checkpoint, mid-run: a LoRA policy is merged
    in a copy (``save_checkpoint`` merges what it is given), never in place."""
    from rlhf.models import save_checkpoint
    from rlhf.sharding import is_sharded

    _require_finite(run, str(out))
    acc = run.accelerator
    if is_sharded(acc):
        save_full(acc, run.model, run.tok, out, lambda: load_policy(run.policy_cfg, run.tok, run.ctx.seed),
                  prefix="policy.", extra=extra)
    elif acc.is_main_process:
        policy = acc.unwrap_model(run.model).policy
        save_checkpoint(copy.deepcopy(policy) if hasattr(policy, "merge_and_unload") else policy, run.tok, out,
                        extra)
    acc.wait_for_everyone()


def _restore_best(run: _Run) -> bool:
    """Load ``best/`` into the live policy (a plain, unsharded one), so the
    final held-out check measures what final/ holds. False when it cannot."""
    from safetensors.torch import load_file

    from rlhf.sharding import is_sharded

    policy = run.accelerator.unwrap_model(run.model).policy
    if is_sharded(run.accelerator) or hasattr(policy, "merge_and_unload"):
        return False
    missing, unexpected = policy.load_state_dict(load_file(run.ctx.stage_dir / "best" / "model.safetensors"),
                                                 strict=False)
    tied = {k for k in missing if "lm_head" in k}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"best/ does not match the policy: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if tied:
        policy.tie_weights()
    return True


def _count_skips(run: _Run, ro: Rollout, stats: UpdateStats | None) -> None:
    """A step with non-finite scores, or whose every optimiser step was
    skipped, is a skipped step; too many in a row stop the run (exit 1)."""
    skipped = ro.nonfinite is not None or (stats is not None and stats.optimizer_steps == 0)
    if not skipped:
        run.skips.consecutive = 0
        return
    run.skips.total += 1
    run.skips.consecutive += 1
    why = ro.nonfinite or "every optimiser step had a non-finite loss or gradient norm"
    log.warning("ppo: %s; step skipped (%d in a row, %d in all)", why, run.skips.consecutive, run.skips.total)
    if run.skips.consecutive >= run.cfg.max_consecutive_skips:
        raise RunFailed(f"ppo stopped: {run.skips.consecutive} consecutive steps skipped for non-finite values "
                        f"(max_consecutive_skips={run.cfg.max_consecutive_skips}); last: {why}. The last good "
                        f"checkpoint (if any) is in {run.ckpt_root}")


# ---------------------------------------------------------------- the end: final/, held-out gold, summary


def _finish(run: _Run) -> Path:
    cfg, ctx, acc = run.cfg, run.ctx, run.accelerator
    run.model.eval()
    final = ctx.stage_dir / "final"
    world = acc.num_processes
    steps = run.watch.steps[-1] if run.watch.stopped else cfg.steps
    summary: dict[str, float] = {"train/steps": steps, "dist/world_size": world,
                                 "train/episodes": steps * cfg.sequences * world,
                                 "ppo/skipped_steps": run.skips.total}
    if run.watch.steps:
        best = int(np.argmax(run.watch.heldout))
        summary.update({"watch/alarm_step": run.watch.alarm_step, "watch/stopped": run.watch.stopped,
                        "best/step": run.watch.steps[best], "best/heldout": run.watch.heldout[best],
                        "watch/heldout_last": run.watch.heldout[-1], "watch/proxy_last": run.watch.proxy[-1]})
    restored = run.watch.stopped and _restore_best(run)
    history = [r for r in read_metrics(run.logger.path) if "objective/scores" in r]
    if history:
        summary["objective/scores_first"] = history[0]["objective/scores"]
        summary["objective/scores_last"] = history[-1]["objective/scores"]
        summary["objective/kl_last"] = history[-1]["objective/kl"]
    if run.watch.stopped and not restored:
        log.info("ppo: stopped at the alarm; final/ is best/ (step %s); no final held-out check (a LoRA or "
                 "sharded policy is not reloaded from best/ mid-run)", summary["best/step"])
    elif cfg.eval.prompts:
        held_out = _gold_eval(run)
        summary.update(held_out)
        log.info("held-out gold score: %.4f (initial) -> %.4f (%s, trained), KL(trained || initial) = %.3f nats",
                 held_out.get("gold/sft", float("nan")), held_out.get("gold/ppo", float("nan")), ctx.name,
                 held_out["kl/ppo"])
    if run.watch.stopped:
        if acc.is_main_process:
            tmp = final.with_name("final.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(ctx.stage_dir / "best", tmp)
            tmp.rename(final)
        acc.wait_for_everyone()
    else:
        _require_finite(run, "final/")
        save_full(acc, run.model, run.tok, final, lambda: load_policy(run.policy_cfg, run.tok, ctx.seed),
                  prefix="policy.")
    if acc.is_main_process:
        write_summary(ctx.stage_dir, summary)
        if run.ckpt_root.exists():
            shutil.rmtree(run.ckpt_root)  # finished: the resumable state is no longer needed
    run.logger.close()
    acc.wait_for_everyone()
    return final


@dataclass
class _HeldOut:
    """This rank's share of a held-out prompt file (padded to equal shares, so
    sharded models run the same batches on every rank), rendered, and how it is sampled."""

    share: list
    real: int  # prompts at the start of ``share`` that are not padding
    texts: list[str]
    sampling: SamplingConfig
    seed: int


def _held_out(run: _Run, path: str, limit: int) -> _HeldOut:
    cfg, acc = run.cfg, run.accelerator
    share, real = pad_shard(_prompts(path, cfg.data.columns, limit, "test"), acc.process_index, acc.num_processes)
    return _HeldOut(share, real, [render_prompt(run.tok, p) for p in share],
                    dataclasses.replace(cfg.generation, batch_size=cfg.eval.batch_size, samples_per_prompt=1),
                    cfg.generation.seed if cfg.generation.seed is not None else run.ctx.seed)


def _initial_policy(run: _Run):
    """The policy the run started from: the reference model, or the LoRA policy with adapters off."""
    ref = run.reference.model
    return ref if ref is not None else _AdaptersOff(run.accelerator.unwrap_model(run.model).policy)


def _sample_trained(run: _Run, held: _HeldOut):
    """The trained policy's samples of ``held`` with KL to the initial policy,
    from its weights gathered once."""
    acc = run.accelerator
    with full_weights(run.model, acc) as local, acc.autocast():
        return sample(acc.unwrap_model(run.model).policy, run.tok, held.texts, held.sampling, held.seed, acc.device,
                      reference=_initial_policy(run), synced_gpus=not local)


def _gold_eval(run: _Run) -> dict[str, float]:
    """Held-out check: gold score and response length of the initial and the
    trained policy, and KL(trained || initial) per sequence.

    Every rank samples its share of the prompts (padded to equal shares, so
    sharded models see the same number of batches on every rank) from weights
    gathered once; the means are over all ranks' real prompts.
    """
    from accelerate.utils import gather_object

    cfg, acc = run.cfg, run.accelerator
    held = _held_out(run, cfg.eval.prompts, cfg.eval.max_prompts)
    share, real = held.share, held.real
    gold = CombinedReward([RewardSpec(source=cfg.eval.gold)], device=acc.device) if cfg.eval.gold else None
    reference = run.reference
    initial = _initial_policy(run)
    # One model's weights gathered at a time: the initial policy's to sample
    # from it, then the trained policy's; the reference's KL forwards stay
    # sharded (collective; equal shares keep the ranks in step).
    with full_weights(initial if reference.model is not None else run.model, acc) as local, acc.autocast():
        before = sample(initial, run.tok, held.texts, held.sampling, held.seed, acc.device, synced_gpus=not local)
    after = _sample_trained(run, held)
    out = {}
    for name, samples in (("sft", before), ("ppo", after)):
        if gold is not None:
            out[f"gold/{name}"] = float(np.mean(gather_object(gold(share[:real], samples.texts[:real]))))
        out[f"response_length/{name}"] = float(np.mean(gather_object(samples.lengths[:real])))
    out["kl/ppo"] = float(np.mean(gather_object(after.kl[:real])))
    return out


# ---------------------------------------------------------------- checkpoints


def _resume(run: _Run) -> int:
    """Load the newest complete checkpoint; cut metrics.jsonl and samples.jsonl
    back to its step (to nothing without one), so a resumed run appends
    exactly the rows an uninterrupted run would have. Returns the step."""
    start, path = 0, None
    if run.ckpt_root.is_dir():
        done = sorted((int(p.name.split("-")[1]), p) for p in run.ckpt_root.glob("step-*")
                      if (p / "step.json").exists())
        if done:
            start, path = done[-1]
            run.accelerator.load_state(str(path))
            log.info("ppo: resumed from %s (step %d)", path, start)
    if run.accelerator.is_main_process:
        run.logger.truncate_after(start)
        truncate_jsonl(run.ctx.stage_dir / "samples.jsonl", start)
    run.accelerator.wait_for_everyone()
    for row in read_metrics(run.logger.path):  # the watch's history so far: its rows up to `start`
        if "watch/heldout" in row and row["step"] <= start:
            run.watch.proxy.append(row["watch/proxy"])
            run.watch.heldout.append(row["watch/heldout"])
            run.watch.steps.append(row["step"])
            if row.get("watch/alarm"):
                run.watch.alarm_step = row["step"]
    return start


def _require_finite(run: _Run, what: str) -> None:
    """Refuse to write ``what`` from non-finite weights (the last good checkpoint stays)."""
    bad = [n for n, p in run.accelerator.unwrap_model(run.model).named_parameters()
           if not torch.isfinite(p.detach()).all()]
    flag = run.accelerator.reduce(torch.tensor([float(bool(bad))], device=run.accelerator.device), "sum")
    if flag.item() > 0:
        raise RunFailed(f"ppo: not writing {what}: non-finite weights ({', '.join(bad[:3]) or 'on another rank'}"
                        f"{' ...' if len(bad) > 3 else ''}); the last good checkpoint (if any) is kept in "
                        f"{run.ckpt_root}")


def _save_state(run: _Run, step: int) -> None:
    """Checkpoint everything a resume needs: written to a temp dir, then
    renamed; the previous checkpoint is deleted only after the new one is
    complete, and none is written from non-finite weights."""
    _require_finite(run, f"the step-{step} checkpoint")
    acc, root = run.accelerator, run.ckpt_root
    path, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    acc.save_state(str(tmp))
    # save_state returns on each rank when its own files are written (every
    # rank writes its RNG state): renaming before all are done races them.
    acc.wait_for_everyone()
    if acc.is_main_process:
        (tmp / "step.json").write_text(json.dumps({"step": step}))
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
        for old in root.glob("step-*"):  # keep only the newest
            if old != path:
                shutil.rmtree(old)
    acc.wait_for_everyone()


class _InterruptSaver:
    """Ctrl-C / SIGTERM: finish the current step, save a checkpoint, exit 130.

    The first signal is noted (every rank agrees at the end of the step); a
    second one interrupts at once, as usual, losing only the current step.
    """

    def __init__(self, run: _Run):
        self.run, self.flag, self.previous = run, False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        log.warning("ppo: interrupted: saving a checkpoint after this step (interrupt again to stop now)")

    def requested(self) -> bool:
        acc = self.run.accelerator
        self.flag = acc.reduce(torch.tensor([float(self.flag)], device=acc.device), "sum").item() > 0
        return self.flag

    def stop_if_requested(self, step: int) -> None:
        if self.flag:
            log.warning("ppo: checkpoint saved at step %d", step)
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


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
    micro = min(cfg.micro_batch_size, cfg.sequences // cfg.num_minibatches)
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
    # micro-batch as not an accumulation boundary. Accelerate (1.15) has no
    # public setter for it: GradientState.sync_gradients is read-only.
    accelerator.gradient_state._set_sync_gradients(False)
    try:
        yield
    finally:
        accelerator.gradient_state._set_sync_gradients(True)
