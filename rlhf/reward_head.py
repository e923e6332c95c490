"""Reward-model training choices for small data: a frozen trunk whose
features are computed once, and the best step by held-out accuracy.

With ``trunk: frozen`` only the score layer (``rlhf.encoders.score_layer``)
learns, so the trunk's output for a text never changes: every distinct
sequence is embedded once (one forward pass, no graph), and the head is fit
on the cached features with the Bradley-Terry loss. On a few hundred pairs
that takes seconds, against minutes for a forward and backward pass through
the trunk per step.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf.encoders import score_layer
from rlhf.rewards import pairwise_stats
from rlhf.training import TrainingConfig

log = logging.getLogger(__name__)


@torch.no_grad()
def embed(model, sequences: list[list[int]], pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """What the score layer reads for each token sequence: its input, taken
    by a hook, at the last real token for decoders (whose score layer runs
    on every position). Shape: (n, hidden), float32 on the CPU."""
    layer = score_layer(model)
    device = next(model.parameters()).device
    seen: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    out = []
    try:
        for i in range(0, len(sequences), batch_size):
            chunk = sequences[i:i + batch_size]
            lengths = torch.tensor([len(s) for s in chunk])
            ids = torch.full((len(chunk), int(lengths.max())), pad_id, dtype=torch.long)
            for j, s in enumerate(chunk):
                ids[j, :len(s)] = torch.tensor(s)
            mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
            seen.clear()
            model(input_ids=ids.to(device), attention_mask=mask.to(device))
            x = seen[-1]
            if x.dim() == 3:  # (batch, time, hidden): right-padded, the last real token pools
                x = x[torch.arange(len(chunk)), (lengths - 1).to(x.device)]
            out.append(x.float().cpu())
    finally:
        hook.remove()
    return torch.cat(out) if out else torch.zeros(0, layer.in_features)


def embed_pairs(model, pairs: list[dict], pad_id: int, batch_size: int = 64
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features of every distinct sequence in tokenized ``pairs``, each embedded
    once, and per pair the row of its chosen and of its rejected side."""
    rows: dict[tuple[int, ...], int] = {}
    for p in pairs:
        for side in ("chosen_ids", "rejected_ids"):
            rows.setdefault(tuple(p[side]), len(rows))
    feats = embed(model, [list(s) for s in rows], pad_id, batch_size)
    chosen = torch.tensor([rows[tuple(p["chosen_ids"])] for p in pairs], dtype=torch.long)
    rejected = torch.tensor([rows[tuple(p["rejected_ids"])] for p in pairs], dtype=torch.long)
    return feats, chosen, rejected


@dataclass
class HeadFit:
    steps: int
    accuracy_before: float | None  # held-out, the head as initialised
    best_step: int | None  # the step kept (eval_every), None: the last


class _Head(torch.nn.Module):
    """A float32 copy of the score layer, trained on cached features."""

    def __init__(self, layer: torch.nn.Linear):
        super().__init__()
        self.weight = torch.nn.Parameter(layer.weight.detach().float().cpu().clone())
        self.bias = None if layer.bias is None else torch.nn.Parameter(layer.bias.detach().float().cpu().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


def _held_accuracy(head: _Head, feats, chosen, rejected) -> float:
    with torch.no_grad():
        scores = head(feats)
    return pairwise_stats(scores[chosen].mean(1), scores[rejected].mean(1))["accuracy"]


def train_head(model, pairs: list[dict], held: list[dict], pad_id: int, train: TrainingConfig, seed: int,
               center: float | None = None, eval_every: int = 0, patience: int | None = None,
               log_metrics=lambda metrics, step: None) -> HeadFit:
    """Fit ``model``'s score layer on frozen features of tokenized ``pairs``
    (Bradley-Terry, the data's margins, TRL's centring term) with ``train``'s
    optimiser settings, then write it back into ``model``. With
    ``eval_every``, the head with the best held-out accuracy is kept (and
    ``patience`` evaluations without a gain stop early)."""
    start = time.perf_counter()
    feats, c_all, r_all = embed_pairs(model, pairs + held, pad_id, train.eval_batch_size)
    log.info("frozen trunk: embedded %d distinct texts once in %.1fs", len(feats), time.perf_counter() - start)
    start, n = time.perf_counter(), len(pairs)
    c, r, hc, hr = c_all[:n], r_all[:n], c_all[n:], r_all[n:]
    margin = torch.tensor([p.get("margin", 0.0) for p in pairs], dtype=torch.float32)[:, None]
    head = _Head(score_layer(model))
    opt = torch.optim.AdamW(head.parameters(), lr=train.learning_rate, weight_decay=train.weight_decay)
    batch = train.batch_size * train.grad_accum
    total = train.max_steps if train.max_steps > 0 else max(1, math.ceil(train.epochs * math.ceil(n / batch)))
    from transformers import get_scheduler

    warmup = int(train.warmup * total) if train.warmup < 1 else int(train.warmup)
    schedule = get_scheduler(train.lr_scheduler, opt, num_warmup_steps=warmup, num_training_steps=total)
    before = _held_accuracy(head, feats, hc, hr) if held else None
    best = (-1.0, 0, _state(head))  # trained steps only, as with the full trunk
    stale, gen, order = 0, torch.Generator().manual_seed(seed), torch.zeros(0, dtype=torch.long)
    step = 0
    while step < total:
        if len(order) == 0:  # a new epoch: a fresh permutation; its last batch may be smaller
            order = torch.randperm(n, generator=gen)
        idx, order = order[:batch], order[batch:]
        sc, sr = head(feats[c[idx]]), head(feats[r[idx]])
        loss = -torch.nn.functional.logsigmoid(sc - sr - margin[idx]).mean()
        if center:
            loss = loss + center * ((sc + sr) ** 2).mean()
        loss.backward()
        if train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(head.parameters(), train.max_grad_norm)
        opt.step(), schedule.step(), opt.zero_grad()
        step += 1
        if step % train.logging_steps == 0 or step == total:
            log_metrics({"train/loss": loss.item(), "train/learning_rate": schedule.get_last_lr()[0]}, step)
        if held and eval_every and (step % eval_every == 0 or step == total):
            acc = _held_accuracy(head, feats, hc, hr)
            log_metrics({"eval/accuracy": acc}, step)
            best, stale = ((acc, step, _state(head)), 0) if acc > best[0] else (best, stale + 1)
            if patience and stale >= patience:
                log.info("no held-out gain in %d evaluations: stopping at step %d", patience, step)
                break
    log.info("score head: %d steps in %.1fs", step, time.perf_counter() - start)
    if held and eval_every:
        head.load_state_dict(best[2])
    _write_back(head, score_layer(model))
    return HeadFit(step, before, best[1] if held and eval_every else None)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _write_back(head: _Head, layer: torch.nn.Linear) -> None:
    with torch.no_grad():
        layer.weight.copy_(head.weight.to(layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_(head.bias.to(layer.bias.dtype))


def trainable_state(model) -> dict[str, torch.Tensor]:
    """A CPU copy of the parameters that train (what differs between steps)."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


BEST_STEP_FILE = "best_step.pt"  # in an HF checkpoint dir: the best evaluated step so far (eval_every)


def best_step_callback(score, every: int, patience: int | None, log_metrics):
    """A TrainerCallback that scores the model every ``every`` steps
    (``score(model) -> held-out accuracy``), keeps a CPU copy of the trainable
    weights of the best step (``.best``: (accuracy, step, weights)), and with
    ``patience`` stops training after that many evaluations without a gain.
    ``restore(model)`` puts the best weights back."""
    from transformers import TrainerCallback

    class BestStep(TrainerCallback):
        best: tuple[float, int, dict] | None = None
        stale = 0

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if model is None or state.global_step % every:
                return
            was_training = model.training
            acc = score(model.eval())
            model.train(was_training)
            log_metrics({"eval/accuracy": acc}, state.global_step)
            if self.best is None or acc > self.best[0]:
                self.best, self.stale = (acc, state.global_step, trainable_state(model)), 0
            else:
                self.stale += 1
                if patience and self.stale >= patience:
                    log.info("no held-out gain in %d evaluations: stopping at step %d", patience, state.global_step)
                    control.should_training_stop = True

        # The best step survives an interruption: it is saved with each
        # checkpoint and read back when training resumes from one.
        def on_save(self, args, state, control, **kwargs):
            if self.best is not None and state.is_world_process_zero:
                acc, step, weights = self.best
                torch.save({"accuracy": acc, "step": step, "weights": weights, "stale": self.stale},
                           Path(args.output_dir) / f"checkpoint-{state.global_step}" / BEST_STEP_FILE)

        def on_train_begin(self, args, state, control, **kwargs):
            saved = Path(args.output_dir) / f"checkpoint-{state.global_step}" / BEST_STEP_FILE
            if state.global_step and saved.is_file():
                d = torch.load(saved, weights_only=True)
                self.best, self.stale = (d["accuracy"], d["step"], d["weights"]), d["stale"]
                log.info("resumed: the best held-out accuracy so far is %.3f at step %d", d["accuracy"], d["step"])

        def restore(self, model) -> None:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, value in self.best[2].items():
                    params[name].copy_(value.to(params[name].device, params[name].dtype))

    return BestStep()
