"""RNN language-model baseline stage (``type: rnn_lm``).

Trains an LSTM/GRU causal LM (``rlhf.baselines.rnn_model``) with TRL's
``SFTTrainer`` on the same data, tokenizer, loss (completion-only) and
optimiser settings as the ``sft`` stage, so the two compare like for like.
The budget is the ``train`` section's steps/epochs, as for ``sft``: give both
the same steps and batch size and they see the same samples, and the figures
reproduce on any machine. ``max_seconds`` / ``match_wall_time`` (the
transformer's training time) are wall-clock budgets, only on request: how far
the RNN gets then depends on the machine and its load, and ``metrics.json``
says so (``train/budget: wall_clock``).
Writes ``<stage>/final`` (loads with ``AutoModelForCausalLM.from_pretrained``
once ``rlhf.baselines.rnn_model`` or this module is imported), ``metrics.jsonl``
and ``metrics.json`` (held-out loss and perplexity before and after, wall time,
parameters). The model classes live in ``rnn_model`` (imported by
``rlhf.recipe.load_plugins`` without the trainer stack) and are re-exported here.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import TrainerCallback

from rlhf.baselines.rnn_model import RnnConfig, RnnForCausalLM, RnnForSequenceClassification, RnnModel
from rlhf.config import opt, require_positive
from rlhf.data import DataConfig, load_splits, normalize_sft, render_prompt
from rlhf.errors import BadInput
from rlhf.models import ModelConfig, as_model_config, load_tokenizer
from rlhf.tracking import MetricsCallback, MetricsLogger, read_metrics
from rlhf.training import TrainingConfig, finish_stage, held_out_loss, hf_kwargs, train_or_resume

__all__ = ["Config", "RnnConfig", "RnnForCausalLM", "RnnForSequenceClassification", "RnnModel", "train",
           "validate"]

log = logging.getLogger(__name__)


@dataclass
class RnnArchitecture:
    """The recurrent network's shape."""

    cell: Literal["lstm", "gru"] = opt("lstm", "recurrent cell")
    hidden_size: int = opt(256, "embedding and state size")
    num_layers: int = opt(2, "stacked recurrent layers")
    dropout: float = opt(0.0, "dropout on embeddings and between layers (PPO switches it off)")
    tie_word_embeddings: bool = opt(True, "share the input embedding with the output head (Press & Wolf 2017)")

    def check(self, fail):
        require_positive(self, fail, "hidden_size", "num_layers")
        if not 0.0 <= self.dropout < 1.0:
            raise fail("dropout", f"expected a number in [0, 1), got {self.dropout}")


@dataclass
class Config:
    """RNN LM stage: same data, tokenizer and loss as ``sft``, an LSTM/GRU instead of a transformer."""

    tokenizer: str | ModelConfig = opt("tiny", "whose tokenizer to use: a preset (tiny: the shipped one) or a "
                                                "checkpoint dir; use the SFT stage's base model to compare")
    rnn: RnnArchitecture = opt(RnnArchitecture(), "network shape")
    data: DataConfig = opt(DataConfig(), "demonstrations, as for sft (prompt/completion, text or messages)")
    train: TrainingConfig = opt(TrainingConfig(), "optimisation (the sft stage's settings and defaults)")
    max_length: int = opt(256, "tokens per example; longer ones are truncated from the right")
    completion_only_loss: bool = opt(True, "prompt/completion data: train on completion tokens only")
    max_seconds: float | None = opt(None, "wall-clock budget: stop after this many seconds of training (results "
                                          "then depend on machine speed and load); null: the step budget only")
    match_wall_time: str | None = opt(None, "wall-clock budget from a stage dir (e.g. ${output_dir}/sft): its "
                                            "training time (train/runtime) becomes max_seconds; not reproducible "
                                            "across machines; null: the step budget only")

    def check(self, fail):
        if self.max_length < 8:
            raise fail("max_length", f"expected >= 8, got {self.max_length}")
        if self.max_seconds is not None and not self.max_seconds > 0:  # NaN too
            raise fail("max_seconds", f"expected > 0, got {self.max_seconds}")

    @property
    def model(self):
        """What later stages' validation reads in place of this stage's ``final/``
        before it exists (``StageContext.loadable``): same tokenizer and context."""
        return as_model_config(self.tokenizer)


def build_model(arch: RnnArchitecture, tok, max_length: int, seed: int) -> RnnForCausalLM:
    torch.manual_seed(seed)
    config = RnnConfig(vocab_size=len(tok), hidden_size=arch.hidden_size, num_layers=arch.num_layers,
                       cell=arch.cell, dropout=arch.dropout, max_position_embeddings=max_length,
                       tie_word_embeddings=arch.tie_word_embeddings, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = RnnForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


def _examples(cfg: Config, seed: int):
    train, held = load_splits(cfg.data, seed)
    return train, held, normalize_sft(train), normalize_sft(held)


def wall_time_of(stage_dir: str | Path) -> float | None:
    """Training wall time (seconds) an HF-Trainer stage logged as ``train/runtime``."""
    rows = [r for r in read_metrics(Path(stage_dir) / "metrics.jsonl") if "train/runtime" in r]
    return float(rows[-1]["train/runtime"]) if rows else None


def validate(cfg: Config, ctx) -> None:
    train, held, train_rows, held_rows = _examples(cfg, ctx.seed)
    fmt = set(train_rows[0])
    for rec, row in zip(train + held, train_rows + held_rows):
        if set(row) != fmt:
            raise BadInput(f"{rec.where}: record format {sorted(row)} differs from the first record's {sorted(fmt)}")
    tok = load_tokenizer(ctx.loadable(as_model_config(cfg.tokenizer)))
    for rec, row in zip(train + held, train_rows + held_rows):
        if "prompt" in row:
            n = len(tok(render_prompt(tok, row["prompt"]), add_special_tokens=False, verbose=False)["input_ids"])
            if n >= cfg.max_length:
                raise BadInput(f"{rec.where}: prompt is {n} tokens, which leaves no room for the completion "
                               f"within max_length {cfg.max_length}")
    if cfg.match_wall_time is not None:
        stages = {str(ctx.recipe.stage_dir(s.name).resolve()) for s in ctx.recipe.stages}
        if str(Path(cfg.match_wall_time).resolve()) not in stages and wall_time_of(cfg.match_wall_time) is None:
            raise BadInput(f"stages.{ctx.name}.match_wall_time: '{cfg.match_wall_time}' is neither a stage of "
                           "this recipe nor a stage dir with train/runtime in its metrics.jsonl")


class _TimeBudget(TrainerCallback):
    """Stops the HF Trainer once ``seconds`` of training have passed."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.t0 = None
        self.stopped = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0 = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        if self.seconds is not None and time.time() - self.t0 >= self.seconds:
            self.stopped = control.should_training_stop = True


def train(cfg: Config, ctx) -> Path:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tok = load_tokenizer(as_model_config(cfg.tokenizer))
    model = build_model(cfg.rnn, tok, cfg.max_length, ctx.seed)
    _, _, train_rows, held_rows = _examples(cfg, ctx.seed)
    budget = cfg.max_seconds
    if cfg.match_wall_time is not None:
        budget = wall_time_of(cfg.match_wall_time)
        if budget is None:
            raise BadInput(f"stages.{ctx.name}.match_wall_time: no train/runtime in "
                           f"{Path(cfg.match_wall_time) / 'metrics.jsonl'} (has that stage run?)")
        log.info("rnn_lm: training for the same wall time as %s: %.1fs", cfg.match_wall_time, budget)
    if budget is not None:
        log.warning("%s: wall-clock budget of %.1fs: how far training gets depends on this machine's speed and "
                    "load, so the results will not reproduce elsewhere (a step budget does)", ctx.name, budget)
    args = SFTConfig(
        **hf_kwargs(cfg.train, ctx.stage_dir, ctx.seed, ctx.report_to, f"{ctx.recipe.path.stem}-{ctx.name}"),
        max_length=cfg.max_length,
        completion_only_loss=cfg.completion_only_loss if "prompt" in train_rows[0] else None,
        disable_tqdm=not ctx.is_main,
        gradient_checkpointing=False,  # TRL turns it on by default; a recurrence has no per-layer blocks to redo
    )
    logger = MetricsLogger(ctx.stage_dir, ctx.name, [], enabled=ctx.is_main)
    time_budget = _TimeBudget(budget)
    trainer = SFTTrainer(
        model=model, args=args, processing_class=tok,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(held_rows) if held_rows else None,
        callbacks=[MetricsCallback(logger), time_budget],
    )
    initial_path = ctx.stage_dir / "initial_eval.json"
    if held_rows and not initial_path.exists():
        initial = trainer.evaluate()["eval_loss"]
        if ctx.is_main:
            initial_path.write_text(json.dumps({"eval/loss": initial}))
    t0 = time.time()
    train_or_resume(trainer, ctx.stage_dir)
    summary = {"train/steps": trainer.state.global_step, "train/examples": len(train_rows),
               "train/budget": "steps" if budget is None else "wall_clock",
               "train/wall_s": time.time() - t0, "train/time_budget_s": budget if budget is not None else float("nan"),
               "train/stopped_by_time_budget": time_budget.stopped,
               "model/params": sum(p.numel() for p in model.parameters())}
    if held_rows:
        summary.update(held_out_loss(trainer, initial_path, len(held_rows), ctx.name))
    return finish_stage(trainer, tok, ctx, summary, logger,
                        lambda: build_model(cfg.rnn, tok, cfg.max_length, ctx.seed))
