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

Also home of ``RewardModel``: score (prompt, response) text with a trained
checkpoint; PPO and eval use it as a reward source.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf.config import opt
from rlhf.data import DataConfig, load_splits, normalize_preferences, render_pair
from rlhf.errors import BadInput
from rlhf.models import (ModelConfig, as_model_config, context_length, load_sequence_classifier,
                         load_tokenizer, peft_config, with_lora)
from rlhf.tracking import MetricsCallback, MetricsLogger
from rlhf.sharding import unpartitioned
from rlhf.training import TrainingConfig, finish_stage, hf_kwargs, train_or_resume

log = logging.getLogger(__name__)


@dataclass
class Config:
    """Reward-model stage."""

    model: str | ModelConfig = opt("tiny", "initial model: usually the SFT stage's final/ (a new score head is added)")
    data: DataConfig = opt(DataConfig(), "preference pairs")
    train: TrainingConfig = opt(TrainingConfig(), "optimisation")
    max_length: int = opt(256, "tokens per (prompt + response); longer pairs lose prompt tokens from the left")
    use_margin: bool = opt(True, "use the data's `margin` column when present (Llama 2 style margin loss)")
    center_rewards_coefficient: float | None = opt(
        None, "penalise squared mean reward so scores stay centred (Eisenstein et al. 2023)")

    def check(self, fail):
        if self.max_length < 4:
            raise fail("max_length", f"expected >= 4, got {self.max_length}")


@dataclass
class PairStats:
    pairs: int = 0
    prompt_truncated: int = 0  # lost prompt tokens on the left
    response_truncated: int = 0  # response alone exceeded max_length: kept its start


def truncate_pair(prompt_ids: list[int], response_ids: list[int], max_length: int,
                  stats: PairStats | None = None) -> list[int]:
    """prompt + response within ``max_length``, dropping prompt tokens from the left.

    If the response alone does not fit, one prompt token is kept and the
    response is cut on the right (counted separately); nothing is dropped.
    """
    if len(prompt_ids) + len(response_ids) <= max_length:
        return prompt_ids + response_ids
    keep = max_length - len(response_ids)
    if keep >= 1:
        if stats:
            stats.prompt_truncated += 1
        return prompt_ids[-keep:] + response_ids
    if stats:
        stats.response_truncated += 1
    return prompt_ids[-1:] + response_ids[: max_length - 1]


def encode_response(tok, prompt, response) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the response (with EOS for plain text).

    The reward model always sees ``prompt_ids + response_ids`` where the
    response ends in EOS, exactly what the PPO policy produces when it stops.
    """
    p_text, r_text = render_pair(tok, prompt, response)
    # verbose=False: over-long pairs are truncated and counted by truncate_pair,
    # so transformers' "sequence length is longer than..." warning is noise.
    p_ids = tok(p_text, add_special_tokens=False, verbose=False)["input_ids"]
    r_ids = tok(r_text, add_special_tokens=False, verbose=False)["input_ids"]
    if isinstance(response, str) and (not r_ids or r_ids[-1] != tok.eos_token_id):
        r_ids = r_ids + [tok.eos_token_id]
    return p_ids, r_ids


def tokenize_pairs(rows: list[dict], tok, max_length: int) -> tuple[list[dict], PairStats]:
    stats = PairStats()
    out = []
    for row in rows:
        stats.pairs += 1
        p_c, r_c = encode_response(tok, row["prompt"], row["chosen"])
        p_r, r_r = encode_response(tok, row["prompt"], row["rejected"])
        item = {"chosen_ids": truncate_pair(p_c, r_c, max_length, stats),
                "rejected_ids": truncate_pair(p_r, r_r, max_length, stats)}
        if "margin" in row:
            item["margin"] = row["margin"]
        out.append(item)
    return out, stats


@torch.no_grad()
def score_ids(model, sequences: list[list[int]], pad_id: int, batch_size: int = 64, label: int = 0) -> torch.Tensor:
    """Scalar scores of token sequences: the logit of output ``label``. Shape: (n,).

    Right-padded batches; transformers' sequence classifiers read the logit at
    the last non-pad token, which is why pad must differ from EOS.
    """
    device = next(model.parameters()).device
    scores = []
    for i in range(0, len(sequences), batch_size):
        chunk = sequences[i:i + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, s in enumerate(chunk):
            ids[j, :len(s)] = torch.tensor(s)
            mask[j, :len(s)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        scores.append(logits[:, label].float().cpu())
    return torch.cat(scores) if scores else torch.zeros(0)


def pairwise_accuracy(model, pairs: list[dict], pad_id: int, batch_size: int = 64) -> dict[str, float]:
    """Accuracy over every pair: P(score(chosen) > score(rejected)); ties count half."""
    chosen = score_ids(model, [p["chosen_ids"] for p in pairs], pad_id, batch_size)
    rejected = score_ids(model, [p["rejected_ids"] for p in pairs], pad_id, batch_size)
    wins = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
    return {"accuracy": wins.mean().item(), "margin": (chosen - rejected).mean().item(),
            "pairs": len(pairs)}


def _pairs(cfg: Config, seed: int):
    train, held = load_splits(cfg.data, seed)
    train_rows, dropped = normalize_preferences(train, cfg.data.on_invalid)
    held_rows, held_dropped = normalize_preferences(held, cfg.data.on_invalid) if held else ([], 0)
    if not cfg.use_margin:
        for row in train_rows + held_rows:
            row.pop("margin", None)
    return train_rows, held_rows, dropped + held_dropped


def validate(cfg: Config, ctx) -> None:
    source = ctx.loadable(cfg.model)
    train_rows, held_rows, _ = _pairs(cfg, ctx.seed)
    limit = context_length(source)
    if limit is not None and cfg.max_length > limit:
        raise BadInput(f"stages.{ctx.name}.max_length: {cfg.max_length} exceeds the model's context of {limit}")
    load_tokenizer(source)


def train(cfg: Config, ctx) -> Path:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    model_cfg = as_model_config(cfg.model)
    tok = load_tokenizer(model_cfg)
    model = load_sequence_classifier(model_cfg, tok, seed=ctx.seed)
    train_rows, held_rows, dropped = _pairs(cfg, ctx.seed)
    train_pairs, train_stats = tokenize_pairs(train_rows, tok, cfg.max_length)
    held_pairs, held_stats = tokenize_pairs(held_rows, tok, cfg.max_length)
    for split, st in (("train", train_stats), ("held-out", held_stats)):
        if st.prompt_truncated or st.response_truncated:
            log.warning("%s: %d of %d sequences lost prompt tokens on the left, %d had their response cut "
                        "to fit max_length=%d (no pair dropped)", split, st.prompt_truncated, 2 * st.pairs,
                        st.response_truncated, cfg.max_length)
    args = RewardConfig(
        **hf_kwargs(cfg.train, ctx.stage_dir, ctx.seed, ctx.report_to, f"{ctx.recipe.path.stem}-{ctx.name}"),
        # TRL turns checkpointing on by default (~30% more compute); ours follows the model config.
        gradient_checkpointing=model_cfg.gradient_checkpointing,
        max_length=None,  # already truncated above; TRL would drop over-long pairs instead
        center_rewards_coefficient=cfg.center_rewards_coefficient,
        disable_tqdm=not ctx.is_main,
    )
    logger = MetricsLogger(ctx.stage_dir, ctx.name, [], enabled=ctx.is_main)
    trainer = RewardTrainer(
        model=model, args=args, processing_class=tok,
        train_dataset=Dataset.from_list(train_pairs),
        eval_dataset=Dataset.from_list(held_pairs) if held_pairs else None,
        peft_config=peft_config(model_cfg.lora, "SEQ_CLS", model) if model_cfg.lora else None,
        callbacks=[MetricsCallback(logger)],
    )
    trainer.model.config.pad_token_id = tok.pad_token_id
    with unpartitioned(trainer.model):  # ZeRO-3 built it partitioned; HF's trainer has not wrapped it yet
        before = pairwise_accuracy(trainer.model.eval(), held_pairs, tok.pad_token_id) if held_pairs else None
    train_or_resume(trainer, ctx.stage_dir)
    summary = {
        "train/steps": trainer.state.global_step, "train/pairs": len(train_pairs),
        "dist/world_size": trainer.args.world_size,
        "data/dropped_invalid": dropped,
        "data/train_prompt_truncated": train_stats.prompt_truncated,
        "data/train_response_truncated": train_stats.response_truncated,
        "data/eval_prompt_truncated": held_stats.prompt_truncated,
        "data/eval_response_truncated": held_stats.response_truncated,
    }
    model = trainer.model.eval()
    if held_pairs:
        after = pairwise_accuracy(model, held_pairs, tok.pad_token_id)
        summary.update({"eval/accuracy": after["accuracy"], "eval/margin": after["margin"],
                        "eval/pairs": after["pairs"], "eval/accuracy_before": before["accuracy"]})
        log.info("reward model held-out accuracy: %.3f before -> %.3f after, over all %d pairs",
                 before["accuracy"], after["accuracy"], after["pairs"])
    return finish_stage(trainer, tok, ctx, summary, logger,
                        lambda: with_lora(load_sequence_classifier(model_cfg, tok, seed=ctx.seed), model_cfg.lora,
                                          "SEQ_CLS"))


class RewardModel:
    """A reward-model checkpoint as a reward source: (prompts, responses) -> scores.

    Two kinds of checkpoint:

    - ``label=None``: a one-output reward model, as the reward stage trains.
      It sees ``prompt_ids + response_ids + EOS``, exactly what the policy
      produces when it stops (``encode_response``).
    - ``label=k``: a trained classifier with its own head (e.g. the 2-label
      sentiment classifier ``lvwerra/distilbert-imdb``, k=1 for POSITIVE);
      the score is the logit of output k, as in the classic IMDB RLHF demo.
      An encoder tokenizer without EOS (BERT-style) encodes prompt + response
      as one text with its own special tokens (``[CLS] ... [SEP]``), truncated
      on the right; a decoder classifier is encoded as above.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dtype: str = "float32",
                 max_length: int | None = None, batch_size: int = 64, label: int | None = None,
                 revision: str | None = None):
        cfg = ModelConfig(name=str(path), dtype=dtype, revision=revision)
        self.label = label
        self.tokenizer = load_tokenizer(cfg, require_eos=label is None)
        num_labels = 1 if label is None else None  # None: keep the classifier's own head
        self.model = load_sequence_classifier(cfg, self.tokenizer, num_labels=num_labels).to(device).eval()
        if label is not None and label >= self.model.config.num_labels:
            raise BadInput(f"reward source '{path}': label {label} out of range (the classifier has "
                           f"{self.model.config.num_labels} outputs: {self.model.config.id2label})")
        self.max_length = max_length or context_length(cfg) or 1024
        self.batch_size = batch_size

    def encode(self, prompt, response) -> list[int]:
        """Token ids the classifier scores for one (prompt, response)."""
        if self.tokenizer.eos_token is None:  # encoder classifier: its own [CLS] text [SEP] format
            p_text, r_text = render_pair(self.tokenizer, prompt, response)
            return self.tokenizer(p_text + r_text, truncation=True, max_length=self.max_length,
                                  verbose=False)["input_ids"]
        p_ids, r_ids = encode_response(self.tokenizer, prompt, response)
        return truncate_pair(p_ids, r_ids, self.max_length)

    def __call__(self, prompts: list, responses: list) -> list[float]:
        seqs = [self.encode(p, r) for p, r in zip(prompts, responses)]
        return score_ids(self.model, seqs, self.tokenizer.pad_token_id, self.batch_size,
                         label=self.label or 0).tolist()
