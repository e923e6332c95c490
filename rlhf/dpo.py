"""Direct preference optimisation stage (``type: dpo``), on TRL's ``DPOTrainer``.

DPO (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290) trains the
policy on preference pairs directly, without a reward model or sampling:
loss = -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) -
(log pi(y_l|x) - log pi_ref(y_l|x))]) for the default ``sigmoid`` loss; every
other loss TRL offers (``ipo``, ``hinge``, ``robust``, ...) is chosen by name.
The bracket, times beta, is the policy's *implicit reward* margin.

Data: the reward stage's preference sources (JSONL/CSV/hub files, Anthropic-HH
transcripts, chat messages, a labeling-database URL), read by the same code.

We tokenize the pairs ourselves, as the reward stage does: TRL's DPO
preprocessing drops every pair whose prompt alone reaches ``max_length`` and
cuts the rest on the right (``keep_start``), which can remove the responses
being compared. Here an over-long pair loses prompt tokens from the left (both
responses are kept whole), nothing is dropped, and the stage counts what it
truncated. The held-out implicit-reward accuracy is our own pass over every
held-out pair. With LoRA the reference is the policy with its adapters off
(no second copy in memory); otherwise a frozen copy of ``reference`` (default:
``model``). With a gold scorer, ``eval`` samples held-out prompts from the
initial and the trained policy, as the PPO stage does.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rlhf.config import opt
from rlhf.data import DataConfig, preference_splits, render_prompt
from rlhf.errors import BadInput
from rlhf.gold import HeldOutCheck
from rlhf.models import (ModelConfig, as_model_config, context_length, load_causal_lm, load_policy,
                         load_tokenizer, peft_config)
from rlhf.ppo.core import logprobs_from_logits
from rlhf.rewards import (CombinedReward, PairStats, RewardSpec, check_source, describe_accuracy, encode_response,
                          held_out_summary)
from rlhf.sampling import SamplingConfig, sample
from rlhf.tracking import MetricsCallback, MetricsLogger, write_summary
from rlhf.training import TrainingConfig, finish_stage, hf_kwargs, quiet_trl_config, train_or_resume

log = logging.getLogger(__name__)

# TRL 1.x DPOConfig.loss_type values (its docstring), checked here so a typo is
# a recipe error naming the key rather than a ValueError from inside TRL.
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


@dataclass
class Config:
    """DPO stage."""

    model: str | ModelConfig = opt("tiny", "policy init, usually the SFT stage's final/ (LoRA: the reference is "
                                           "this model with the adapters off)")
    reference: str | ModelConfig | None = opt(None, "reference policy of the implicit reward; null = `model`")
    data: DataConfig = opt(DataConfig(), "preference pairs, in any format the reward stage reads")
    train: TrainingConfig = opt(TrainingConfig(), "optimisation (real models: a learning rate near 5e-7 to 5e-6)")
    max_length: int = opt(256, "tokens per (prompt + response); longer pairs lose prompt tokens from the left")
    beta: float = opt(0.1, "strength of the tie to the reference (the KL coefficient; IPO: its regulariser tau)")
    loss_type: list[str] = opt(["sigmoid"], f"TRL's DPO losses by name: {', '.join(LOSS_TYPES)}; several are "
                                            "summed with loss_weights")
    loss_weights: list[float] | None = opt(None, "one weight per loss_type (null = 1 each)")
    label_smoothing: float = opt(0.0, "assumed rate of flipped labels, in [0, 0.5) (cDPO; the robust loss)")
    generation: SamplingConfig = opt(SamplingConfig(), "sampling for the held-out gold check")
    eval: HeldOutCheck = opt(HeldOutCheck(), "held-out gold check at the end: initial vs trained policy")

    def check(self, fail):
        if self.max_length < 4:
            raise fail("max_length", f"expected >= 4, got {self.max_length}")
        if not 0 < self.beta < float("inf"):
            raise fail("beta", f"expected a finite number > 0, got {self.beta}")
        unknown = [t for t in self.loss_type if t not in LOSS_TYPES]
        if unknown or not self.loss_type:
            raise fail("loss_type", f"unknown loss {unknown[0] if unknown else '(none)'!r}; expected one or more "
                                    f"of {', '.join(LOSS_TYPES)}")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise fail("loss_weights", f"expected {len(self.loss_type)} weights (one per loss_type), got "
                                       f"{len(self.loss_weights)}")
        if not 0 <= self.label_smoothing < 0.5:
            raise fail("label_smoothing", f"expected a number in [0, 0.5), got {self.label_smoothing}")


def validate(cfg: Config, ctx) -> None:
    model_cfg = as_model_config(cfg.model)
    source = ctx.loadable(model_cfg)
    tok = load_tokenizer(source)
    if cfg.reference is not None:
        ref_tok = load_tokenizer(ctx.loadable(as_model_config(cfg.reference)))
        if ref_tok.get_vocab() != tok.get_vocab():
            raise BadInput(f"stages.{ctx.name}.reference: its tokenizer differs from the policy's (the implicit "
                           "reward compares the two models' log-probs of the same tokens)")
    paths = [cfg.data.path] + ([cfg.data.eval_path] if cfg.data.eval_path else [])
    if not any(ctx.produces(p) and not Path(p).exists() for p in paths):
        preference_splits(cfg.data, ctx.seed)  # an earlier stage of this recipe writes them: read when it has
    limit = context_length(source)
    if limit is not None and cfg.max_length > limit:
        raise BadInput(f"stages.{ctx.name}.max_length: {cfg.max_length} exceeds the model's context of {limit}")
    if cfg.eval.gold:
        check_source(cfg.eval.gold)


# ---------------------------------------------------------------- data


def fit_pair(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int,
             stats: PairStats | None = None) -> tuple[list[int], list[int], list[int]]:
    """One shared prompt and two responses within ``max_length`` per side.

    Prompt tokens go first, from the left (the responses are what is being
    compared); a response that alone does not fit keeps one prompt token and
    loses its end (counted separately). Nothing is dropped.
    """
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= max_length:
        return prompt, chosen, rejected
    keep = max_length - longest
    if keep >= 1:
        if stats:
            stats.prompt_truncated += 1
        return prompt[-keep:], chosen, rejected
    if stats:
        stats.response_truncated += 1
    return prompt[-1:], chosen[: max_length - 1], rejected[: max_length - 1]


def tokenize_dpo(rows: list[dict], tok, max_length: int) -> tuple[list[dict], PairStats]:
    """Rows ``{prompt, chosen, rejected}`` -> ``{prompt_ids, chosen_ids,
    rejected_ids}`` (TRL's tokenized DPO format), read as the reward model
    reads them (``rlhf.rewards.encode_response``: chat template, EOS)."""
    stats, out = PairStats(), []
    for row in rows:
        stats.pairs += 1
        p_c, chosen = encode_response(tok, row["prompt"], row["chosen"])
        p_r, rejected = encode_response(tok, row["prompt"], row["rejected"])
        # A chat template may render the prompt differently before each side;
        # DPO needs one prompt, so keep the tokens the two share.
        n = next((i for i, (a, b) in enumerate(zip(p_c, p_r)) if a != b), min(len(p_c), len(p_r)))
        prompt, chosen, rejected = fit_pair(p_c[:n], p_c[n:] + chosen, p_r[n:] + rejected, max_length, stats)
        stats.identical += chosen == rejected
        out.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return out, stats


# ---------------------------------------------------------------- implicit reward


@torch.no_grad()
def response_logps(model, pairs: list[dict], side: str, pad_id: int, batch_size: int = 32) -> torch.Tensor:
    """Summed log-probs of each pair's ``side`` response given its prompt.

    Shape: n pairs -> (n,), fp32. Right-padded batches.
    """
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        seqs = [p["prompt_ids"] + p[side] for p in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        resp = torch.zeros_like(ids, dtype=torch.bool)
        for j, (s, p) in enumerate(zip(seqs, chunk)):
            ids[j, :len(s)] = torch.tensor(s)
            resp[j, len(p["prompt_ids"]):len(s)] = True
        attn = (torch.arange(width) < torch.tensor([len(s) for s in seqs])[:, None]).long()
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits[:, :-1]
        lp = logprobs_from_logits(logits, ids[:, 1:].to(device))
        out.append((lp * resp[:, 1:].to(device)).sum(1).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def implicit_reward_accuracy(policy: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                             beta: float) -> dict[str, float]:
    """Held-out accuracy of DPO's implicit reward r = beta * (log pi - log pi_ref):
    the share of pairs where r(chosen) > r(rejected), ties counting half (so
    the untrained policy, equal to its reference, scores 0.5), and the mean margin.

    Shape: each dict maps ``chosen_ids`` / ``rejected_ids`` to (n,) summed log-probs.
    """
    margin = beta * ((policy["chosen_ids"] - reference["chosen_ids"])
                     - (policy["rejected_ids"] - reference["rejected_ids"]))
    acc = ((margin > 0).float() + 0.5 * (margin == 0).float()).mean().item()
    return {"accuracy": acc, "margin": margin.mean().item(), "pairs": int(margin.numel())}


def _logps(model, pairs: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    was_training = model.training
    model.eval()
    try:
        return {side: response_logps(model, pairs, side, pad_id) for side in ("chosen_ids", "rejected_ids")}
    finally:
        model.train(was_training)


# ---------------------------------------------------------------- train


def _trainer_class():
    from trl import DPOTrainer

    class PreTokenizedDPOTrainer(DPOTrainer):
        """TRL's DPOTrainer fed pairs already tokenized and fitted by
        ``tokenize_dpo``: its own preparation would re-tokenize the text and
        drop pairs whose prompt fills ``max_length`` (see the module docstring)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return PreTokenizedDPOTrainer


def _reference_config(cfg: Config) -> ModelConfig:
    base = as_model_config(cfg.model if cfg.reference is None else cfg.reference)
    return dataclasses.replace(base, lora=None)


def _log_truncation(split: str, st: PairStats, dropped: int, cfg: Config) -> None:
    if st.prompt_truncated or st.response_truncated or st.identical or dropped:
        log.warning("%s: %d pairs kept, %d invalid dropped (on_invalid: %s); %d lost prompt tokens on the left "
                    "and %d had both responses cut to fit max_length=%d; %d pairs became identical", split,
                    st.pairs, dropped, cfg.data.on_invalid, st.prompt_truncated, st.response_truncated,
                    cfg.max_length, st.identical)


def train(cfg: Config, ctx) -> Path:
    from datasets import Dataset
    from trl import DPOConfig

    model_cfg = as_model_config(cfg.model)
    tok = load_tokenizer(model_cfg)
    model = load_causal_lm(dataclasses.replace(model_cfg, lora=None), tok, seed=ctx.seed)
    # With LoRA and no other reference, TRL takes the policy with adapters off.
    ref_model = None if model_cfg.lora and cfg.reference is None else \
        load_causal_lm(_reference_config(cfg), tok, seed=ctx.seed)
    data = preference_splits(cfg.data, ctx.seed, use_margin=False)
    train_rows, held_rows, dropped = data.train, data.held, data.dropped
    train_pairs, train_stats = tokenize_dpo(train_rows, tok, cfg.max_length)
    held_pairs, held_stats = tokenize_dpo(held_rows, tok, cfg.max_length)
    _log_truncation("train", train_stats, dropped[0], cfg)
    _log_truncation("held-out", held_stats, dropped[1], cfg)
    args = quiet_trl_config(lambda: DPOConfig(
        **hf_kwargs(cfg.train, ctx.stage_dir, ctx.seed, ctx.report_to, f"{ctx.recipe.path.stem}-{ctx.name}"),
        gradient_checkpointing=model_cfg.gradient_checkpointing,
        max_length=None,  # fitted above; TRL would cut responses or drop pairs
        beta=cfg.beta, loss_type=list(cfg.loss_type), loss_weights=cfg.loss_weights,
        label_smoothing=cfg.label_smoothing, disable_tqdm=not ctx.is_main,
    ))
    # The reference's held-out log-probs never change: taken once, before training.
    ref_held = _logps(ref_model if ref_model is not None else model, held_pairs, tok.pad_token_id) \
        if held_pairs else None
    # Without another reference the untrained policy is the reference: no second pass.
    before = implicit_reward_accuracy(ref_held if cfg.reference is None else
                                      _logps(model, held_pairs, tok.pad_token_id), ref_held, cfg.beta) \
        if held_pairs else None
    logger = MetricsLogger(ctx.stage_dir, ctx.name, [], enabled=ctx.is_main)
    trainer = _trainer_class()(
        model=model, ref_model=ref_model, args=args, processing_class=tok,
        train_dataset=Dataset.from_list(train_pairs),
        eval_dataset=Dataset.from_list(held_pairs) if held_pairs else None,
        peft_config=peft_config(model_cfg.lora, "CAUSAL_LM", model) if model_cfg.lora else None,
        callbacks=[MetricsCallback(logger)],
    )
    with warnings.catch_warnings():
        # TRL 1.16 reads a transformers attribute deprecated in 5.x, once per run.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
        train_or_resume(trainer, ctx.stage_dir)
    summary = {"model/init": model_cfg.name, "train/steps": trainer.state.global_step,
               "train/pairs": len(train_pairs), "dist/world_size": trainer.args.world_size,
               "dpo/beta": cfg.beta, "dpo/loss_type": "+".join(cfg.loss_type),
               "data/train_dropped_invalid": dropped[0], "data/eval_dropped_invalid": dropped[1],
               "data/train_prompt_truncated": train_stats.prompt_truncated,
               "data/train_response_truncated": train_stats.response_truncated,
               "data/eval_prompt_truncated": held_stats.prompt_truncated,
               "data/eval_response_truncated": held_stats.response_truncated}
    if held_pairs:
        after = implicit_reward_accuracy(_logps(trainer.accelerator.unwrap_model(trainer.model), held_pairs,
                                                tok.pad_token_id), ref_held, cfg.beta)
        summary.update({"eval/accuracy_before": before["accuracy"], "eval/accuracy": after["accuracy"],
                        "eval/margin": after["margin"], "eval/pairs": after["pairs"]})
        summary.update(held_out_summary(after["accuracy"], after["pairs"], data.held_available))
        log.info("DPO implicit-reward accuracy on held-out pairs: %.3f before -> %s", before["accuracy"],
                 describe_accuracy(summary))
    final = finish_stage(trainer, tok, ctx, summary, logger, lambda: load_policy(model_cfg, tok, ctx.seed))
    if cfg.eval.prompts and ctx.is_main:
        summary.update(_gold_check(cfg, ctx, tok, final))
        write_summary(ctx.stage_dir, summary)
    return final


def _gold_check(cfg: Config, ctx, tok, final: Path) -> dict[str, float]:
    """Held-out prompts sampled from the initial and the trained policy (the
    saved final/, so any sharding is undone): gold score, length, and
    KL(trained || initial) per sequence, as the PPO stage reports them."""
    from rlhf.data import normalize_prompts, read_records

    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompts = normalize_prompts(read_records(cfg.eval.prompts, "test", cfg.data.columns, cfg.eval.max_prompts))
    texts = [render_prompt(tok, p) for p in prompts]
    sampling = dataclasses.replace(cfg.generation, batch_size=cfg.eval.batch_size, samples_per_prompt=1)
    seed = cfg.generation.seed if cfg.generation.seed is not None else ctx.seed
    tok.padding_side = "left"
    initial = load_causal_lm(_reference_config(cfg), tok, seed=ctx.seed).to(device).eval()
    trained = load_causal_lm(ModelConfig(name=str(final)), tok, seed=ctx.seed).to(device).eval()
    before = sample(initial, tok, texts, sampling, seed, device)
    after = sample(trained, tok, texts, sampling, seed, device, reference=initial)
    out = {}
    gold = CombinedReward([RewardSpec(source=cfg.eval.gold)], device=device) if cfg.eval.gold else None
    for name, got in (("sft", before), ("dpo", after)):
        if gold is not None:
            out[f"gold/{name}"] = float(np.mean(gold(prompts, got.texts)))
        out[f"response_length/{name}"] = float(np.mean(got.lengths))
    out["kl/dpo"] = float(np.mean(after.kl))
    log.info("held-out gold score: %.4f (initial) -> %.4f (dpo), KL(dpo || initial) = %.3f nats",
             out.get("gold/sft", float("nan")), out.get("gold/dpo", float("nan")), out["kl/dpo"])
    return out
