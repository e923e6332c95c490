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
from typing import Literal

import torch

from rlhf.config import opt
from rlhf.data import DataConfig, PreferenceSplits, preference_splits
from rlhf.errors import BadInput
from rlhf.encoders import freeze_trunk, has_segment_ids, score_layer
from rlhf.models import (ModelConfig, as_model_config, context_length, is_encoder, load_config,
                         load_sequence_classifier, load_tokenizer, num_layers, peft_config, save_checkpoint,
                         with_lora)
from rlhf.pair_baselines import pair_baselines
from rlhf.reward_head import best_step_callback, train_head
from rlhf.rewards import (READ_SETTINGS_FILE, ReadSettings, describe_accuracy, encoder_reading, held_out_summary,
                          length_bias, pair_member_scores, pairwise_accuracy, pairwise_stats, read_settings,
                          tokenize_pairs)
from rlhf.tracking import MetricsCallback, MetricsLogger, write_summary
from rlhf.sharding import unpartitioned
from rlhf.training import TrainingConfig, finish_stage, hf_kwargs, quiet_trl_config, train_or_resume

log = logging.getLogger(__name__)


@dataclass
class Config:
    """Reward-model stage."""

    model: str | ModelConfig = opt("tiny", "initial model: usually the SFT stage's final/ (a new score head is "
                                           "added), or an encoder (BERT, MiniLM, DeBERTa: a dir, hub id or "
                                           "pkg://) read with its own tokenizer")
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
    trunk: Literal["full", "frozen"] = opt(
        "full", "full: train the trunk (all of it, or its last_n_layers) and the head; frozen: train the score "
                "head only, on features of each text computed once (seconds; small data)")
    last_n_layers: int | None = opt(None, "trunk: full: train only the last k transformer layers (and what "
                                          "follows them) plus the head; embeddings and lower layers stay fixed")
    pooling: Literal["auto", "model", "mean", "cls"] = opt(
        "auto", "encoders: how the text becomes one vector. auto: a sentence-transformers checkpoint's own "
                "pooling, else mean when the checkpoint has no trained pooler, else model (its own head)")
    eval_before: bool = opt(True, "score the held-out pairs before training too (eval/accuracy_before)")
    eval_every: int = opt(0, "score the held-out pairs every N steps and keep the best step's weights as "
                             "final/ (0: keep the last)")
    patience: int | None = opt(None, "with eval_every: stop after this many evaluations without a gain")

    def check(self, fail):
        if self.max_length < 4:
            raise fail("max_length", f"expected >= 4, got {self.max_length}")
        if self.ensemble < 1:
            raise fail("ensemble", f"expected a positive integer (1 = one reward model), got {self.ensemble}")
        c = self.center_rewards_coefficient
        if c is not None and not 0 <= c < float("inf"):  # NaN fails the comparison too
            raise fail("center_rewards_coefficient", f"expected a finite number >= 0, or null; got {c}")
        if self.last_n_layers is not None and self.last_n_layers < 1:
            raise fail("last_n_layers", f"expected a positive integer or null, got {self.last_n_layers}")
        if self.last_n_layers is not None and self.trunk == "frozen":
            raise fail("last_n_layers", "applies to trunk: full (trunk: frozen trains the score head only)")
        if self.trunk == "frozen" and isinstance(self.model, ModelConfig) and self.model.lora:
            raise fail("trunk", "frozen trains the score head only: drop model.lora, or use trunk: full")
        if self.eval_every < 0:
            raise fail("eval_every", f"expected 0 (keep the last step) or a positive integer, got {self.eval_every}")
        if self.patience is not None and (self.patience < 1 or not self.eval_every):
            raise fail("patience", "expected a positive integer, with eval_every > 0" if self.eval_every
                       else "stops on held-out evaluations: set eval_every too")


def _pairs(cfg: Config, seed: int) -> PreferenceSplits:
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
    key = f"stages.{ctx.name}"
    limit = context_length(source)
    if limit is not None and cfg.max_length > limit:
        raise BadInput(f"{key}.max_length: {cfg.max_length} exceeds the model's context of {limit}")
    encoder = is_encoder(source)
    load_tokenizer(source, require_eos=not encoder)
    if cfg.pooling != "auto" and not encoder:
        raise BadInput(f"{key}.pooling: applies to encoder models (BERT, MiniLM, DeBERTa, ...); "
                       f"{source.name} is a decoder, read at its last token")
    layers = num_layers(source)
    if cfg.last_n_layers is not None and layers is not None and cfg.last_n_layers > layers:
        raise BadInput(f"{key}.last_n_layers: {cfg.last_n_layers}, but the model has {layers} layers")
    if cfg.eval_every and not (cfg.data.eval_path or cfg.data.eval_split or cfg.data.eval_fraction > 0):
        raise BadInput(f"{key}.eval_every: needs held-out pairs (data.eval_path, eval_split or eval_fraction)")


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


def _load(cfg: Config, model_cfg: ModelConfig, seed: int):
    """(tokenizer, classifier, how it reads text). An encoder keeps its own
    tokenizer and pools as ``cfg.pooling`` says (a warm start: as it was trained)."""
    encoder = is_encoder(model_cfg)
    tok = load_tokenizer(model_cfg, require_eos=not encoder)
    saved = read_settings(model_cfg.name) if cfg.warm_start is not None else None
    pooling = (saved.pooling if saved is not None and saved.text_pair else cfg.pooling) if encoder else None
    if encoder and cfg.pooling not in ("auto", pooling):
        log.warning("pooling: %s is ignored: warm_start %s was trained with %s pooling", cfg.pooling,
                    model_cfg.name, pooling)
    model = load_sequence_classifier(model_cfg, tok, seed=seed, num_labels=cfg.ensemble, pooling=pooling,
                                     segment_ids=encoder and has_segment_ids(load_config(model_cfg)))
    if encoder:
        reading = encoder_reading(cfg.max_length, model, cfg.ensemble)
        log.info("%s: encoder reward model: text pairs with its own tokenizer, %s pooling%s", model_cfg.name,
                 reading.pooling, ", segment ids" if reading.segment_ids else "")
    else:
        reading = ReadSettings(max_length=cfg.max_length, ensemble=cfg.ensemble)
    return tok, model, dataclasses.replace(reading, chat_template=bool(tok.chat_template))


def _log_data(cfg: Config, data: PreferenceSplits, stats) -> None:
    for split, st, n_dropped in (("train", stats[0], data.dropped[0]), ("held-out", stats[1], data.dropped[1])):
        if st.prompt_truncated or st.response_truncated or st.identical or n_dropped:
            log.warning("%s: %d pairs kept, %d invalid dropped (on_invalid: %s); of %d sequences %d lost prompt "
                        "tokens on the left and %d had their response cut before its end to fit max_length=%d; "
                        "%d pairs became identical after truncation (scored as ties)", split, st.pairs, n_dropped,
                        cfg.data.on_invalid, 2 * st.pairs, st.prompt_truncated, st.response_truncated,
                        cfg.max_length, st.identical)
    if len(data.held) < data.held_available and cfg.data.max_eval_samples is not None:
        log.info("held-out: a random subset of %d of %d records (max_eval_samples, drawn with the recipe seed)",
                 cfg.data.max_eval_samples, data.held_available)


def train(cfg: Config, ctx) -> Path:
    model_cfg = _model_config(cfg)
    tok, model, reading = _load(cfg, model_cfg, ctx.seed)
    data = _pairs(cfg, ctx.seed)
    if cfg.ensemble > 1 and any("margin" in r for r in data.train + data.held):
        # TRL's loss subtracts a (batch,) margin from (batch, k) score differences.
        log.warning("ensemble: %d heads: the data's margin column is not used", cfg.ensemble)
        for row in data.train + data.held:
            row.pop("margin", None)
    train_pairs, train_stats = tokenize_pairs(data.train, tok, cfg.max_length, reading)
    held_pairs, held_stats = tokenize_pairs(data.held, tok, cfg.max_length, reading)
    _log_data(cfg, data, (train_stats, held_stats))
    summary = {
        "model/init": model_cfg.name, "train/trunk": cfg.trunk, "train/pairs": len(train_pairs),
        "data/dropped_invalid": sum(data.dropped),
        "data/train_dropped_invalid": data.dropped[0], "data/eval_dropped_invalid": data.dropped[1],
        "data/train_identical_after_truncation": train_stats.identical,
        "data/eval_identical_after_truncation": held_stats.identical,
        "data/train_prompt_truncated": train_stats.prompt_truncated,
        "data/train_response_truncated": train_stats.response_truncated,
        "data/eval_prompt_truncated": held_stats.prompt_truncated,
        "data/eval_response_truncated": held_stats.response_truncated,
    }
    logger = MetricsLogger(ctx.stage_dir, ctx.name, [], enabled=ctx.is_main)
    if cfg.trunk == "frozen":
        return _train_frozen(cfg, ctx, tok, model, (train_pairs, held_pairs), data, summary, logger, reading)
    return _train_trunk(cfg, ctx, model_cfg, tok, model, (train_pairs, held_pairs), data, summary, logger, reading)


def _train_frozen(cfg: Config, ctx, tok, model, pairs, data: PreferenceSplits, summary: dict, logger,
                  reading: ReadSettings) -> Path:
    """``trunk: frozen``: the score head fit on cached features (``rlhf.reward_head``); final/ written here."""
    train_pairs, held_pairs = pairs
    for p in model.parameters():
        p.requires_grad_(False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fit = train_head(model.to(device).eval(), train_pairs, held_pairs, tok.pad_token_id, cfg.train, ctx.seed,
                     center=cfg.center_rewards_coefficient, eval_every=cfg.eval_every, patience=cfg.patience,
                     log_metrics=logger.log)
    trainable = sum(p.numel() for p in score_layer(model).parameters())
    summary.update({"train/steps": fit.steps, "train/trainable_params": trainable, "dist/world_size": 1})
    before = fit.accuracy_before if cfg.eval_before else None
    summary.update(_held_out(cfg, ctx, model, tok, held_pairs, data, before, fit.best_step))
    final = ctx.stage_dir / "final"
    if ctx.is_main:
        save_checkpoint(model, tok, final, {READ_SETTINGS_FILE: reading.to_json()})
        write_summary(ctx.stage_dir, summary)
        logger.log({f"summary/{k}": v for k, v in summary.items()}, step=fit.steps)
    logger.close()
    return final


def _train_trunk(cfg: Config, ctx, model_cfg: ModelConfig, tok, model, pairs, data: PreferenceSplits,
                 summary: dict, logger, reading: ReadSettings) -> Path:
    """``trunk: full`` (optionally only its last_n_layers) on TRL's RewardTrainer."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    train_pairs, held_pairs = pairs
    if cfg.last_n_layers is not None:
        trainable, total = freeze_trunk(model, cfg.last_n_layers)
        log.info("training the last %d layers and the head: %d of %d parameters", cfg.last_n_layers,
                 trainable, total)
    args = quiet_trl_config(lambda: RewardConfig(
        **hf_kwargs(cfg.train, ctx.stage_dir, ctx.seed, ctx.report_to, f"{ctx.recipe.path.stem}-{ctx.name}"),
        # TRL turns checkpointing on by default (~30% more compute); ours follows the model config.
        gradient_checkpointing=model_cfg.gradient_checkpointing,
        max_length=None,  # already truncated above; TRL would drop over-long pairs instead
        center_rewards_coefficient=cfg.center_rewards_coefficient,
        disable_tqdm=not ctx.is_main,
    ))
    # TRL refuses a model whose config says num_labels != 1. An ensemble's k
    # heads are one (k, hidden) score layer whose size is fixed at init, and
    # TRL's loss (-logsigmoid(chosen - rejected)).mean() over (batch, k) scores
    # is the mean of the k members' losses: it only has to pass that check.
    model.config.num_labels = 1
    best = best_step_callback(lambda m: pairwise_accuracy(m, held_pairs, tok.pad_token_id,
                                                          cfg.train.eval_batch_size)["accuracy"],
                              cfg.eval_every, cfg.patience, logger.log) if cfg.eval_every and held_pairs else None
    trainer = RewardTrainer(
        model=model, args=args, processing_class=tok,
        train_dataset=Dataset.from_list(train_pairs),
        eval_dataset=Dataset.from_list(held_pairs) if held_pairs else None,
        peft_config=peft_config(model_cfg.lora, "SEQ_CLS", model) if model_cfg.lora else None,
        callbacks=[MetricsCallback(logger)] + ([best] if best else []),
    )
    model.config.num_labels = cfg.ensemble  # what config.json records, and loaders rebuild
    trainer.model.config.num_labels = cfg.ensemble
    trainer.model.config.pad_token_id = tok.pad_token_id
    before = None
    if held_pairs and cfg.eval_before:
        with unpartitioned(trainer.model):  # ZeRO-3 built it partitioned; HF's trainer has not wrapped it yet
            before = pairwise_accuracy(trainer.model.eval(), held_pairs, tok.pad_token_id)["accuracy"]
    train_or_resume(trainer, ctx.stage_dir)
    best_step = _keep_best(trainer, best, held_pairs, tok.pad_token_id, cfg.train.eval_batch_size)
    summary.update({"train/steps": trainer.state.global_step, "dist/world_size": trainer.args.world_size,
                    "train/trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)})
    summary.update(_held_out(cfg, ctx, trainer.model.eval(), tok, held_pairs, data, before, best_step))
    pooling = reading.pooling if reading.text_pair else None
    fresh = lambda: with_lora(load_sequence_classifier(  # noqa: E731
        model_cfg, tok, seed=ctx.seed, num_labels=cfg.ensemble, pooling=pooling, segment_ids=reading.segment_ids),
        model_cfg.lora, "SEQ_CLS")
    return finish_stage(trainer, tok, ctx, summary, logger, fresh, extra={READ_SETTINGS_FILE: reading.to_json()})


def _keep_best(trainer, best, held_pairs: list[dict], pad_id: int, batch_size: int) -> int | None:
    """With ``eval_every``: put back the best evaluated step's weights unless
    the last step scores at least as well. Returns the step kept."""
    if best is None:
        return None
    last = pairwise_accuracy(trainer.model.eval(), held_pairs, pad_id, batch_size)["accuracy"]
    if best.best is None or last >= best.best[0]:
        return trainer.state.global_step
    best.restore(trainer.model)
    log.info("keeping step %d (held-out accuracy %.3f) over the last step %d (%.3f)", best.best[1],
             best.best[0], trainer.state.global_step, last)
    return best.best[1]


def _held_out(cfg: Config, ctx, model, tok, held_pairs: list[dict], data: PreferenceSplits,
              before: float | None, best_step: int | None) -> dict:
    """``eval/*`` and ``baseline/*``: the trained model on every held-out pair
    (scored once: accuracy, its interval, length statistics, ensemble members)
    beside the bag-of-words and length baselines."""
    if not held_pairs:
        return {}
    chosen, rejected = pair_member_scores(model, held_pairs, tok.pad_token_id, cfg.train.eval_batch_size)
    after = pairwise_stats(chosen.mean(1), rejected.mean(1))
    out = {"eval/accuracy": after["accuracy"], "eval/margin": after["margin"], "eval/pairs": after["pairs"]}
    out.update(held_out_summary(after["accuracy"], after["pairs"], data.held_available))
    if before is not None:
        out["eval/accuracy_before"] = before
    if best_step is not None:
        out["eval/best_step"] = best_step
        log.info("final/ is step %d, the best held-out accuracy of those evaluated every %d steps (chosen on "
                 "these same held-out pairs: an optimistic estimate)", best_step, cfg.eval_every)
    out.update(pair_baselines(data.train, data.held))
    log.info("reward model held-out accuracy: %s%s", f"{before:.3f} before -> " if before is not None else "",
             describe_accuracy(out))
    if out.get("baseline/accuracy") is not None:
        log.info("baselines on the same pairs: bag of words (TF-IDF logistic regression) %.3f, longer response "
                 "wins %.3f", out["baseline/accuracy"], out["baseline/longer_wins"])
    out.update(_length_bias(chosen.mean(1), rejected.mean(1), data.held))
    if cfg.ensemble > 1:
        out.update(_members(chosen, rejected))
    return out


def _members(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    """An ensemble's held-out accuracy per member and how much the members
    disagree (mean over pairs of the std of their score differences), from
    the member scores (n, k) of both sides."""
    diff = chosen - rejected
    acc = ((diff > 0).float() + 0.5 * (diff == 0).float()).mean(0)
    return {**{f"eval/member_{i}_accuracy": a for i, a in enumerate(acc.tolist())},
            "eval/member_disagreement": diff.std(1, unbiased=False).mean().item()}
