"""Reward-model stage (``type: reward``), on TRL's ``RewardTrainer``.

Trains a scalar ``AutoModelForSequenceClassification`` on preference pairs with
the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected [- margin])
(Ouyang et al. 2022, eq. 1).

We tokenize the pairs ourselves instead of letting TRL do it: TRL's
``RewardTrainer`` silently *filters out* pairs longer than ``max_length``,
from training and from evaluation, so its accuracy can cover only part of the
held-out set. Here an over-long pair is truncated from the left of the prompt
(the response, which is what is being judged, is kept), every pair is kept,
and the number truncated is reported. Held-out pairwise accuracy is computed
by our own pass over every held-out pair.

How the model reads text (max length, the truncation rule, EOS after the
response) is saved with the checkpoint in ``final/reward_config.json``; PPO,
eval and labeling score through ``rlhf.rewards.RewardModel``, which reads it,
so every consumer scores exactly as this stage's held-out evaluation does.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf.config import opt
from rlhf.data import DataConfig, preference_splits
from rlhf.errors import BadInput
from rlhf.models import (ModelConfig, as_model_config, context_length, load_sequence_classifier,
                         load_tokenizer, peft_config, with_lora)
from rlhf.rewards import (READ_SETTINGS_FILE, ReadSettings, length_bias, pair_member_scores, pairwise_accuracy,
                          pairwise_stats, tokenize_pairs)
from rlhf.tracking import MetricsCallback, MetricsLogger
from rlhf.sharding import unpartitioned
from rlhf.training import TrainingConfig, finish_stage, hf_kwargs, quiet_trl_config, train_or_resume

log = logging.getLogger(__name__)


@dataclass
class Config:
    """Reward-model stage."""

    model: str | ModelConfig = opt("tiny", "initial model: usually the SFT stage's final/ (a new score head is added)")
    warm_start: str | None = opt(None, "start instead from this trained reward model (its head kept), when not "
                                       "null: e.g. ${previous.reward} in rounds, null in round 1")
    data: DataConfig = opt(DataConfig(), "preference pairs")
    train: TrainingConfig = opt(TrainingConfig(), "optimisation")
    max_length: int = opt(256, "tokens per (prompt + response); longer pairs lose prompt tokens from the left")
    use_margin: bool = opt(True, "use the data's `margin` column when present (Llama 2 style margin loss)")
    center_rewards_coefficient: float | None = opt(
        None, "penalise squared mean reward so scores stay centred (Eisenstein et al. 2023)")
    ensemble: int = opt(1, "train k reward models at once: k scalar heads on one trunk, each from its own "
                           "random init, the loss averaged over heads; the checkpoint scores as their mean, "
                           "and PPO can use mean - lambda * std or min (reward.aggregate)")

    def check(self, fail):
        if self.max_length < 4:
            raise fail("max_length", f"expected >= 4, got {self.max_length}")
        if self.ensemble < 1:
            raise fail("ensemble", f"expected a positive integer (1 = one reward model), got {self.ensemble}")
        c = self.center_rewards_coefficient
        if c is not None and not 0 <= c < float("inf"):  # NaN fails the comparison too
            raise fail("center_rewards_coefficient", f"expected a finite number >= 0, or null; got {c}")


def _pairs(cfg: Config, seed: int):
    return preference_splits(cfg.data, seed, cfg.use_margin)


def _model_config(cfg: Config) -> ModelConfig:
    """``model``, or ``warm_start`` with ``model``'s other settings (dtype, LoRA, ...)."""
    base = as_model_config(cfg.model)
    return base if cfg.warm_start is None else dataclasses.replace(base, name=cfg.warm_start, gguf_file=None)


def validate(cfg: Config, ctx) -> None:
    source = ctx.loadable(_model_config(cfg))
    paths = [cfg.data.path] + ([cfg.data.eval_path] if cfg.data.eval_path else [])
    if not any(ctx.produces(p) and not Path(p).exists() for p in paths):
        _pairs(cfg, ctx.seed)  # an earlier stage of this recipe writes them: read when it has
    limit = context_length(source)
    if limit is not None and cfg.max_length > limit:
        raise BadInput(f"stages.{ctx.name}.max_length: {cfg.max_length} exceeds the model's context of {limit}")
    load_tokenizer(source)


def _length_bias(chosen: torch.Tensor, rejected: torch.Tensor, rows: list[dict]) -> dict:
    """``eval/length_*``: how far the trained model's held-out scores (n,)
    follow response length (words), ``rlhf.rewards.length_bias``."""
    words = lambda text: len(text.split()) if isinstance(text, str) else len(str(text).split())  # noqa: E731
    got = length_bias(chosen.tolist(), rejected.tolist(), [words(r["chosen"]) for r in rows],
                      [words(r["rejected"]) for r in rows])
    log.info("length bias on held-out pairs: score-length correlation %s; accuracy %s where the chosen response "
             "is shorter (%d pairs), %s where it is longer (%d pairs)",
             *(f"{got[k]:.3f}" if got[k] is not None else "n/a" for k in ("length_corr", "accuracy_chosen_shorter")),
             got["pairs_chosen_shorter"],
             f"{got['accuracy_chosen_longer']:.3f}" if got["accuracy_chosen_longer"] is not None else "n/a",
             got["pairs_chosen_longer"])
    return {f"eval/{k}": v for k, v in got.items()}


def train(cfg: Config, ctx) -> Path:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    model_cfg = _model_config(cfg)
    tok = load_tokenizer(model_cfg)
    model = load_sequence_classifier(model_cfg, tok, seed=ctx.seed, num_labels=cfg.ensemble)
    train_rows, held_rows, dropped = _pairs(cfg, ctx.seed)
    if cfg.ensemble > 1 and any("margin" in r for r in train_rows + held_rows):
        # TRL's loss subtracts a (batch,) margin from (batch, k) score differences.
        log.warning("ensemble: %d heads: the data's margin column is not used", cfg.ensemble)
        for row in train_rows + held_rows:
            row.pop("margin", None)
    train_pairs, train_stats = tokenize_pairs(train_rows, tok, cfg.max_length)
    held_pairs, held_stats = tokenize_pairs(held_rows, tok, cfg.max_length)
    for split, st, n_dropped in (("train", train_stats, dropped[0]), ("held-out", held_stats, dropped[1])):
        if st.prompt_truncated or st.response_truncated or st.identical or n_dropped:
            log.warning("%s: %d pairs kept, %d invalid dropped (on_invalid: %s); of %d sequences %d lost prompt "
                        "tokens on the left and %d had their response cut before its EOS to fit max_length=%d; "
                        "%d pairs became identical after truncation (scored as ties)", split, st.pairs, n_dropped,
                        cfg.data.on_invalid, 2 * st.pairs, st.prompt_truncated, st.response_truncated,
                        cfg.max_length, st.identical)
    args = quiet_trl_config(lambda: RewardConfig(
        **hf_kwargs(cfg.train, ctx.stage_dir, ctx.seed, ctx.report_to, f"{ctx.recipe.path.stem}-{ctx.name}"),
        # TRL turns checkpointing on by default (~30% more compute); ours follows the model config.
        gradient_checkpointing=model_cfg.gradient_checkpointing,
        max_length=None,  # already truncated above; TRL would drop over-long pairs instead
        center_rewards_coefficient=cfg.center_rewards_coefficient,
        disable_tqdm=not ctx.is_main,
    ))
    logger = MetricsLogger(ctx.stage_dir, ctx.name, [], enabled=ctx.is_main)
    # TRL refuses a model whose config says num_labels != 1. An ensemble's k
    # heads are one (k, hidden) score layer whose size is fixed at init, and
    # TRL's loss (-logsigmoid(chosen - rejected)).mean() over (batch, k) scores
    # is the mean of the k members' losses: it only has to pass that check.
    model.config.num_labels = 1
    trainer = RewardTrainer(
        model=model, args=args, processing_class=tok,
        train_dataset=Dataset.from_list(train_pairs),
        eval_dataset=Dataset.from_list(held_pairs) if held_pairs else None,
        peft_config=peft_config(model_cfg.lora, "SEQ_CLS", model) if model_cfg.lora else None,
        callbacks=[MetricsCallback(logger)],
    )
    model.config.num_labels = cfg.ensemble  # what config.json records, and loaders rebuild
    trainer.model.config.num_labels = cfg.ensemble
    trainer.model.config.pad_token_id = tok.pad_token_id
    with unpartitioned(trainer.model):  # ZeRO-3 built it partitioned; HF's trainer has not wrapped it yet
        before = pairwise_accuracy(trainer.model.eval(), held_pairs, tok.pad_token_id) if held_pairs else None
    train_or_resume(trainer, ctx.stage_dir)
    summary = {
        "model/init": model_cfg.name,
        "train/steps": trainer.state.global_step, "train/pairs": len(train_pairs),
        "dist/world_size": trainer.args.world_size,
        "data/dropped_invalid": sum(dropped),
        "data/train_dropped_invalid": dropped[0], "data/eval_dropped_invalid": dropped[1],
        "data/train_identical_after_truncation": train_stats.identical,
        "data/eval_identical_after_truncation": held_stats.identical,
        "data/train_prompt_truncated": train_stats.prompt_truncated,
        "data/train_response_truncated": train_stats.response_truncated,
        "data/eval_prompt_truncated": held_stats.prompt_truncated,
        "data/eval_response_truncated": held_stats.response_truncated,
    }
    model = trainer.model.eval()
    if held_pairs:
        # Held-out pairs scored once, for the accuracy, the length statistics and the members.
        chosen, rejected = pair_member_scores(model, held_pairs, tok.pad_token_id)
        after = pairwise_stats(chosen.mean(1), rejected.mean(1))
        summary.update({"eval/accuracy": after["accuracy"], "eval/margin": after["margin"],
                        "eval/pairs": after["pairs"], "eval/accuracy_before": before["accuracy"]})
        log.info("reward model held-out accuracy: %.3f before -> %.3f after, over all %d pairs",
                 before["accuracy"], after["accuracy"], after["pairs"])
        summary.update(_length_bias(chosen.mean(1), rejected.mean(1), held_rows))
        if cfg.ensemble > 1:
            summary.update(_members(chosen, rejected))
    return finish_stage(trainer, tok, ctx, summary, logger,
                        lambda: with_lora(load_sequence_classifier(model_cfg, tok, seed=ctx.seed,
                                                                   num_labels=cfg.ensemble), model_cfg.lora, "SEQ_CLS"),
                        extra={READ_SETTINGS_FILE: ReadSettings(
                            max_length=cfg.max_length, chat_template=bool(tok.chat_template),
                            ensemble=cfg.ensemble).to_json()})


def _members(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    """An ensemble's held-out accuracy per member and how much the members
    disagree (mean over pairs of the std of their score differences), from
    the member scores (n, k) of both sides."""
    diff = chosen - rejected
    acc = ((diff > 0).float() + 0.5 * (diff == 0).float()).mean(0)
    return {**{f"eval/member_{i}_accuracy": a for i, a in enumerate(acc.tolist())},
            "eval/member_disagreement": diff.std(1, unbiased=False).mean().item()}
