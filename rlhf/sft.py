"""Supervised fine-tuning stage (``type: sft``), on TRL's ``SFTTrainer``.

Data: prompt/completion (loss on the completion only, the default), plain
``text``, or chat ``messages``. Writes ``<stage>/final`` (a causal LM plus
tokenizer; LoRA adapters merged), ``metrics.jsonl`` and ``metrics.json`` with
the held-out loss before and after training.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from rlhf.config import opt
from rlhf.data import DataConfig, load_splits, normalize_sft, render_prompt
from rlhf.errors import BadInput
from rlhf.models import (ModelConfig, as_model_config, context_length, load_causal_lm, load_tokenizer,
                         load_policy, peft_config)
from rlhf.tracking import MetricsCallback, MetricsLogger
from rlhf.training import (TrainingConfig, finish_stage, held_out_loss, hf_kwargs, quiet_trl_config,
                           train_or_resume)

log = logging.getLogger(__name__)


@dataclass
class Config:
    """SFT stage."""

    model: str | ModelConfig = opt("tiny", "base model: preset, local dir or hub id (or a ModelConfig mapping)")
    data: DataConfig = opt(DataConfig(), "demonstrations")
    train: TrainingConfig = opt(TrainingConfig(), "optimisation")
    max_length: int = opt(256, "tokens per example; longer ones are truncated from the right")
    completion_only_loss: bool = opt(True, "prompt/completion data: train on completion tokens only")
    packing: bool = opt(False, "pack several examples per sequence (faster on large data)")

    def check(self, fail):
        if self.max_length < 8:
            raise fail("max_length", f"expected >= 8, got {self.max_length}")


def _examples(cfg: Config, seed: int):
    train, held = load_splits(cfg.data, seed)
    train_rows, held_rows = normalize_sft(train), normalize_sft(held)
    fmt = set(train_rows[0])
    for rows, records in ((train_rows, train), (held_rows, held)):
        for row, rec in zip(rows, records):
            if set(row) != fmt:
                raise BadInput(f"{rec.where}: record format {sorted(row)} differs from the first record's "
                               f"{sorted(fmt)}; a dataset must use one format")
    return train, held, train_rows, held_rows


class _InitialEval(TrainerCallback):
    """Saves the held-out loss of the evaluation train() runs before its first step."""

    def __init__(self, path: Path, is_main: bool):
        self.path, self.is_main = path, is_main

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.is_main and state.global_step == 0 and metrics and "eval_loss" in metrics \
                and not self.path.exists():
            self.path.write_text(json.dumps({"eval/loss": metrics["eval_loss"]}))


def validate(cfg: Config, ctx) -> None:
    model_cfg = as_model_config(cfg.model)
    train, held, train_rows, held_rows = _examples(cfg, ctx.seed)
    source = ctx.loadable(model_cfg)
    tok = load_tokenizer(source)
    limit = min(cfg.max_length, context_length(source) or cfg.max_length)
    for rec, row in zip(train + held, train_rows + held_rows):
        if "prompt" in row:
            # verbose=False: we report an over-long prompt ourselves, as one error line.
            n = len(tok(render_prompt(tok, row["prompt"]), add_special_tokens=False, verbose=False)["input_ids"])
            if n >= limit:
                raise BadInput(f"{rec.where}: prompt is {n} tokens, which leaves no room for the completion "
                               f"within max_length / model context {limit}")


def train(cfg: Config, ctx) -> Path:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model_cfg = as_model_config(cfg.model)
    tok = load_tokenizer(model_cfg)
    model = load_causal_lm(model_cfg, tok, seed=ctx.seed)
    _, _, train_rows, held_rows = _examples(cfg, ctx.seed)
    initial_path = ctx.stage_dir / "initial_eval.json"
    args = quiet_trl_config(lambda: SFTConfig(
        **hf_kwargs(cfg.train, ctx.stage_dir, ctx.seed, ctx.report_to, f"{ctx.recipe.path.stem}-{ctx.name}"),
        # TRL turns checkpointing on by default (~30% more compute); ours follows the model config.
        gradient_checkpointing=model_cfg.gradient_checkpointing,
        max_length=cfg.max_length,
        completion_only_loss=cfg.completion_only_loss if "prompt" in train_rows[0] else None,
        packing=cfg.packing,
        disable_tqdm=not ctx.is_main,
        # The untrained model's held-out loss, the baseline SFT must beat, is
        # taken inside train(), after the model is wrapped for DDP/DeepSpeed/FSDP.
        # Not with trainer.evaluate() before train(): Accelerate then marks the
        # model as prepared and train() skips the DDP wrapper, so each rank
        # trains alone without gradient all-reduce (seen under torchrun).
        eval_on_start=bool(held_rows) and not initial_path.exists(),
    ))
    logger = MetricsLogger(ctx.stage_dir, ctx.name, [], enabled=ctx.is_main)
    trainer = SFTTrainer(
        model=model, args=args, processing_class=tok,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(held_rows) if held_rows else None,
        peft_config=peft_config(model_cfg.lora, "CAUSAL_LM", model) if model_cfg.lora else None,
        callbacks=[MetricsCallback(logger), _InitialEval(initial_path, ctx.is_main)],
    )
    train_or_resume(trainer, ctx.stage_dir)
    summary = {"train/steps": trainer.state.global_step, "train/examples": len(train_rows),
               "dist/world_size": trainer.args.world_size}
    if held_rows:
        summary.update(held_out_loss(trainer, initial_path, len(held_rows), ctx.name))
    return finish_stage(trainer, tok, ctx, summary, logger,
                        lambda: load_policy(model_cfg, tok, ctx.seed))
