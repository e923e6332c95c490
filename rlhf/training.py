"""Optimisation settings shared by the TRL-based stages (SFT, reward model),
and the glue from them to ``transformers.TrainingArguments`` kwargs."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from rlhf.config import opt, require_positive
from rlhf.precision import precision_flags

log = logging.getLogger(__name__)


# transformers' schedulers that need no extra arguments (the others, e.g.
# cosine_with_min_lr or reduce_lr_on_plateau, need settings this config lacks).
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")


@dataclass
class TrainingConfig:
    """How a TRL stage optimises (mapped onto HF TrainingArguments)."""

    epochs: float = opt(1.0, "passes over the training data (ignored when max_steps > 0)")
    max_steps: int = opt(-1, "stop after this many optimiser steps (-1: use epochs)")
    batch_size: int = opt(16, "per-device micro-batch size")
    grad_accum: int = opt(1, "micro-batches accumulated per optimiser step")
    learning_rate: float = opt(5e-4, "peak learning rate (AdamW)")
    lr_scheduler: str = opt("cosine", "HF scheduler name: linear, cosine, constant, ...")
    warmup: float = opt(0.05, "warmup: a fraction of total steps if < 1, else a number of steps")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping max-norm")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = opt(
        "auto", "auto: bf16 on GPUs that support it, else fp32 (CPU)")
    logging_steps: int = opt(10, "log metrics every N optimiser steps")
    eval_steps: int = opt(0, "evaluate every N steps (0: only at the end)")
    save_steps: int = opt(100, "checkpoint every N steps, for resuming an interrupted stage")
    save_total_limit: int = opt(2, "keep at most this many checkpoints")
    eval_batch_size: int = opt(64, "per-device batch size for evaluation")

    def check(self, fail):
        require_positive(self, fail, "batch_size", "grad_accum", "logging_steps", "save_steps", "eval_batch_size",
                         "save_total_limit")
        inf = float("inf")
        # (key, valid?, expected): NaN fails every comparison, so it is rejected too.
        for key, ok, expected in (
                ("max_steps", self.max_steps == -1 or self.max_steps > 0, "-1 (use epochs) or a positive integer"),
                ("epochs", 0 <= self.epochs < inf, "a finite number >= 0"),
                ("learning_rate", 0 < self.learning_rate < inf, "a finite number > 0"),
                ("warmup", 0 <= self.warmup < 1 or (1 <= self.warmup < inf and self.warmup == int(self.warmup)),
                 "a fraction in [0, 1) of the total steps, or a whole number of steps"),
                ("weight_decay", 0 <= self.weight_decay < inf, "a finite number >= 0"),
                ("max_grad_norm", 0 <= self.max_grad_norm < inf, "a finite number >= 0 (0 = no clipping)"),
                ("eval_steps", self.eval_steps >= 0, "0 (only at the end) or a positive integer"),
                ("lr_scheduler", self.lr_scheduler in LR_SCHEDULERS, f"one of {', '.join(LR_SCHEDULERS)}")):
            if not ok:
                raise fail(key, f"expected {expected}, got {getattr(self, key)!r}")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise fail("epochs", "expected > 0 when max_steps is not set")


def quiet_trl_config(make):
    """``make()`` (a TRL config constructor) without transformers'
    "`gradient_checkpointing` is deprecated" FutureWarning: TRL 1.x's own
    config declares that field (default True), so the warning fires on every
    stage whatever we pass; we set the value explicitly."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
        return make()


def hf_kwargs(cfg: TrainingConfig, stage_dir: Path, seed: int, report_to: list[str], run_name: str) -> dict:
    """TrainingArguments kwargs. Checkpoints go to ``<stage_dir>/checkpoints``."""
    return dict(
        output_dir=str(stage_dir / "checkpoints"),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps,
        eval_strategy="steps" if cfg.eval_steps > 0 else "no",
        eval_steps=cfg.eval_steps if cfg.eval_steps > 0 else None,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=seed,
        # metrics.jsonl is written by our callback; wandb/tensorboard by HF's integrations.
        report_to=list(report_to) or "none",
        run_name=run_name,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),  # else a warning on every CPU run
        # HF's default drops NaN/inf losses from the logged average: a diverged
        # run would log a finite loss. Log them, and let _FiniteGuard stop it.
        logging_nan_inf_filter=False,
        **precision_flags(cfg.precision),
    )


def _finite_guard():
    """A TrainerCallback that stops an HF Trainer run at the first non-finite
    logged loss or gradient norm, and before a checkpoint is saved from
    non-finite weights, so the last good checkpoint is what a re-run resumes
    from; ``.problem`` says what happened. (Defined here, not at import:
    importing transformers' trainer takes seconds.)"""
    from transformers import TrainerCallback

    class FiniteGuard(TrainerCallback):
        problem: str | None = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in ("loss", "grad_norm"):
                value = (logs or {}).get(key)
                if isinstance(value, (int, float)) and not math.isfinite(value) and self.problem is None:
                    self.problem = f"the training {key.replace('_', ' ')} is {value} at step {state.global_step}"
                    control.should_training_stop, control.should_save = True, False

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if control.should_save and model is not None and self.problem is None:
                bad = next((n for n, p in model.named_parameters() if not torch.isfinite(p.detach()).all()), None)
                if bad is not None:
                    self.problem = f"weight {bad} is non-finite at step {state.global_step}"
                    control.should_training_stop, control.should_save = True, False

    return FiniteGuard()


def last_checkpoint(stage_dir: Path) -> str | None:
    """The newest ``checkpoint-N`` of an interrupted stage, to resume from."""
    ckpt_dir = stage_dir / "checkpoints"
    if not ckpt_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir()
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / "trainer_state.json").exists()]
    if not found:
        return None
    step, path = max(found)
    log.info("resuming from %s", path)
    return str(path)


def train_or_resume(trainer, stage_dir: Path) -> None:
    """``trainer.train()``, resuming from the stage's newest checkpoint.

    A checkpoint at the last step (the run died between it and ``final/``) is
    loaded rather than resumed: transformers resumes it by training one step
    past ``max_steps``. Its ``_load_from_checkpoint`` is private API, but it is
    what ``train`` itself uses and knows every format (full, LoRA adapters,
    safetensors shards). With sharded weights (FSDP, ZeRO-3) it needs the
    wrapped model, so there the extra step is left to happen (and logged).

    A non-finite loss, gradient norm or weight stops training and raises
    RunFailed (exit 1) before ``final/`` or a poisoned checkpoint is written.
    """
    from transformers.trainer_callback import ProgressCallback

    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, ProgressCallback):
            # Its on_log prints every log dict ({'loss': '6.794', ...}) under the bar; the same
            # figures are in metrics.jsonl, and the bar shows progress, rate and ETA.
            cb.on_log = lambda *args, **kwargs: None
    from rlhf.models import quiet_bars

    guard = _finite_guard()
    trainer.add_callback(guard)
    try:
        with quiet_bars():  # checkpoint writes; the training bar is the Trainer's own
            _train(trainer, stage_dir)
    finally:
        trainer.remove_callback(guard)
    if guard.problem is not None:
        from rlhf.errors import RunFailed

        raise RunFailed(f"{stage_dir}: training diverged: {guard.problem} (try a lower learning rate, or "
                        f"check the data); no final/ was written, and {stage_dir / 'checkpoints'} keeps the last "
                        "finite checkpoint, which a re-run resumes from")


def _train(trainer, stage_dir: Path) -> None:
    from transformers import TrainerState

    resume = last_checkpoint(stage_dir)
    if resume is not None:
        state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
        if state.max_steps and state.global_step >= state.max_steps:
            from rlhf.sharding import is_sharded

            if not is_sharded(trainer.accelerator):
                log.info("%s is the last step: loading it instead of training on", resume)
                trainer._load_from_checkpoint(resume)
                trainer.state = state
                return
            log.warning("%s is the last step; resuming a sharded model from it trains one extra step", resume)
    trainer.train(resume_from_checkpoint=resume)


def held_out_loss(trainer, initial_path: Path, n_examples: int, name: str) -> dict[str, float]:
    """Held-out loss and perplexity after training, beside the untrained
    model's (saved in ``initial_path`` before training started)."""
    final_loss = trainer.evaluate()["eval_loss"]
    initial = json.loads(initial_path.read_text())["eval/loss"] if initial_path.exists() else float("nan")
    log.info("%s held-out loss: %.4f before -> %.4f after", name, initial, final_loss)
    return {"eval/loss_before": initial, "eval/loss": final_loss,
            "eval/perplexity_before": math.exp(min(initial, 50)), "eval/perplexity": math.exp(min(final_loss, 50)),
            "eval/examples": n_examples}


def finish_stage(trainer, tok, ctx, summary: dict, logger, fresh: Callable, extra: dict | None = None) -> Path:
    """Save ``final/`` (every rank joins when the weights are sharded; see
    ``rlhf.sharding.save_full``: ``fresh`` builds an unsharded copy of the
    model), then on the main process write ``metrics.json`` and log the
    summary; every process closes its logger. Returns the final checkpoint dir."""
    from rlhf.sharding import save_full
    from rlhf.tracking import write_summary

    final = ctx.stage_dir / "final"
    save_full(trainer.accelerator, trainer.model_wrapped, tok, final, fresh, extra=extra)
    if ctx.is_main:
        write_summary(ctx.stage_dir, summary)
        logger.log({f"summary/{k}": v for k, v in summary.items()}, step=trainer.state.global_step)
    logger.close()
    return final
