"""Sampling from a causal LM: one config, one ``generate``, one decode, one
response log-prob path. PPO's rollout, ``rlhf eval`` and ``rlhf label pairs``
all sample through here, so a response means the same thing everywhere:

- prompts are left-padded, with position ids counted from each row's first
  real token (``position_ids_from``);
- a response ends at its first EOS or right after the last token of a
  configured stop string; everything after is padding, outside the mask, and
  never scored, trained on or counted in the KL;
- log-probs are fp32, at the sampling temperature.

Plain temperature sampling by default: top-k / top-p make the sampling
distribution differ from the policy's, so the KL estimate and PPO's ratio are
biased (docs/ppo.md).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rlhf.config import opt, require_positive
from rlhf.ppo.core import logprobs_from_logits, truncate_after_eos


@dataclass
class SamplingConfig:
    """How responses are sampled (PPO rollouts, eval, labeling pairs)."""

    max_new_tokens: int = opt(32, "response length cap; responses also stop at EOS or a stop string")
    temperature: float = opt(1.0, "sampling temperature; log-probs (ratio, KL) use the same one")
    top_k: int = opt(0, "0 = off; anything else biases the KL estimate and PPO's ratio")
    top_p: float = opt(1.0, "1.0 = off; anything else biases the KL estimate and PPO's ratio")
    stop_strings: list[str] | None = opt(None, "extra stop strings besides EOS; the response ends with the string")
    samples_per_prompt: int = opt(1, "responses sampled per prompt (eval: per checkpoint)")
    batch_size: int = opt(64, "sequences per generate() call (a memory setting)")
    seed: int | None = opt(None, "sampling seed (default: the recipe seed; rlhf eval: --seed)")

    def check(self, fail):
        require_positive(self, fail, "max_new_tokens", "samples_per_prompt", "batch_size")
        if not 0 < self.temperature < float("inf"):
            raise fail("temperature", f"expected a finite number > 0 (sampling is required), got {self.temperature}")
        if self.top_k < 0:
            raise fail("top_k", f"expected >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise fail("top_p", f"expected in (0, 1] (1 = off), got {self.top_p}")
        if self.stop_strings is not None and not all(isinstance(s, str) and s for s in self.stop_strings):
            raise fail("stop_strings", "expected a list of non-empty strings")


@dataclass
class Generated:
    """One batch of sampled responses.

    Shapes: query_ids, query_mask (b, q) left-padded; response_ids (b, r)
    padded after the end; response_mask (b, r) bool, True up to and including
    the last response token; finished (b,) bool: ended by EOS or a stop string
    rather than by ``max_new_tokens``; texts: the decoded responses.
    """

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    finished: torch.Tensor
    texts: list[str]

    @property
    def input_ids(self) -> torch.Tensor:
        """Prompt + response, (b, q + r)."""
        return torch.cat([self.query_ids, self.response_ids], 1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask.long()], 1)


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists. Shape: -> ids (b, max_len), mask (b, max_len)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def decode(tok, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
    """The visible text of each response (special tokens dropped)."""
    return [tok.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(response_ids, response_mask)]


def _stop_length(tok, ids: list[int], stop_strings: list[str]) -> int | None:
    """Tokens up to and including the end of the first stop string in ``ids``.

    A stop string may span several tokens, and a token may hold more than the
    string's end; the answer is the shortest prefix whose text contains a stop
    string (containment is monotone in the prefix length: binary search).
    """
    def contains(n: int) -> bool:
        text = tok.decode(ids[:n], skip_special_tokens=True)
        return any(s in text for s in stop_strings)

    if not ids or not contains(len(ids)):
        return None
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if contains(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def end_responses(tok, response_ids: torch.Tensor, stop_strings: list[str] | None = None):
    """Cut each response after its first EOS or after its first stop string,
    whichever comes first; pad the rest.

    Shape: response_ids (b, r) -> ids (b, r), mask (b, r) bool, finished (b,) bool.
    Batched generation keeps sampling (or pads) rows that already ended: those
    tokens must not be scored, trained on or counted in the KL.
    """
    ids, mask, finished = truncate_after_eos(response_ids, tok.eos_token_id, tok.pad_token_id)
    if not stop_strings:
        return ids, mask, finished
    for i in range(ids.size(0)):
        length = _stop_length(tok, ids[i][mask[i]].tolist(), stop_strings)
        if length is not None:  # length <= the row's tokens: cutting there is a no-op when equal
            mask[i, length:] = False
            ids[i, length:] = tok.pad_token_id
            finished[i] = True
    return ids, mask, finished


@torch.no_grad()
def generate(model, tok, prompt_texts: list[str], cfg: SamplingConfig, device,
             synced_gpus: bool = False, max_prompt_tokens: int | None = None) -> Generated:
    """Sample one response per prompt text, in one ``generate`` call.

    ``max_prompt_tokens``: keep only each prompt's last tokens (the ones the
    response continues); None = whole prompts.
    Draws from the global torch RNG (seed it, or fork it, around the call).
    ``synced_gpus``: for a sharded model whose weights are not gathered, every
    rank keeps calling forward until all ranks are done (transformers' ZeRO-3 mode).
    """
    encoded = [tok(t, add_special_tokens=False, verbose=False)["input_ids"] for t in prompt_texts]
    if max_prompt_tokens is not None:
        encoded = [ids[-max_prompt_tokens:] for ids in encoded]
    query, query_mask = pad_left(encoded, tok.pad_token_id)
    query, query_mask = query.to(device), query_mask.to(device)
    kwargs = dict(do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                  max_new_tokens=cfg.max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                  use_cache=True, synced_gpus=synced_gpus)
    if cfg.stop_strings:
        kwargs.update(stop_strings=cfg.stop_strings, tokenizer=tok)
    out = model.generate(input_ids=query, attention_mask=query_mask, **kwargs)
    response = out[:, query.size(1):]
    if response.size(1) == 0:
        response = torch.full((query.size(0), 1), tok.pad_token_id, device=device, dtype=torch.long)
    response, mask, finished = end_responses(tok, response, cfg.stop_strings)
    return Generated(query, query_mask, response, mask, finished, decode(tok, response, mask))


def position_ids_from(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions for left-padded rows: 0 at each row's first real token.

    Shape: (b, s) -> (b, s). Without this a left-padded prompt shifts every
    position and the model sees inputs unlike its training data (docs/ppo.md).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@functools.lru_cache(maxsize=None)
def _accepts_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def response_logits(model: nn.Module, input_ids, attention_mask, position_ids, response_length: int, **kwargs):
    """The causal LM's output and the logits at the positions predicting the
    response: ``(out, logits)``. Shape: input_ids (b, s) -> logits (b, r, v),
    r = response_length.

    Logits at position i predict token i+1, so the response (the last r tokens)
    is predicted from the last r+1 positions minus the very last. Passing
    ``logits_to_keep`` (transformers causal LMs) skips the LM head over the
    prompt, in the forward and in the backward; a model without it returns all
    positions and the same slice is taken.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if _accepts_logits_to_keep(type(base)):
        kwargs["logits_to_keep"] = response_length + 1
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                **kwargs)
    return out, out.logits[:, -(response_length + 1):-1]


def response_logprobs(model: nn.Module, input_ids, attention_mask, context_length: int,
                      temperature: float) -> torch.Tensor:
    """fp32 log p(response tokens) under ``model`` at the sampling temperature.

    Shape: input_ids (b, s) = left-padded prompt (width context_length) +
    right-padded response -> (b, s - context_length).
    """
    _, logits = response_logits(model, input_ids, attention_mask, position_ids_from(attention_mask),
                                input_ids.size(1) - context_length)
    return logprobs_from_logits(logits, input_ids[:, context_length:], temperature)


def sequence_kl(logprobs, ref_logprobs, mask) -> np.ndarray:
    """Monte-Carlo estimate of KL(policy || reference) per sampled sequence.

    For y ~ policy, sum_t log p(y_t | ...) - log p_ref(y_t | ...) is an unbiased
    estimate of KL(p(.|x) || p_ref(.|x)) over whole responses (k1 in Schulman
    2020, http://joschu.net/blog/kl-approx.html; PPO's ``objective/kl`` is the same sum). One sequence can be
    negative; the mean over many is not, in expectation. float64 sums.

    Shape: logprobs (b, t), ref_logprobs (b, t), mask (b, t) -> (b,).
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    ref = np.asarray(ref_logprobs, dtype=np.float64)
    m = np.asarray(mask, dtype=np.float64)
    return ((lp - ref) * m).sum(axis=-1)


@dataclass
class Samples:
    """Responses to a prompt list, in prompt order (each prompt repeated
    ``samples_per_prompt`` times); ``kl`` per sequence when a reference was given."""

    texts: list[str]
    lengths: list[int]
    finished: list[bool]
    kl: list[float] | None


@torch.no_grad()
def sample(model, tok, prompt_texts: list[str], cfg: SamplingConfig, seed: int, device, reference=None,
           synced_gpus: bool = False, max_prompt_tokens: int | None = None) -> Samples:
    """Sample every prompt ``cfg.samples_per_prompt`` times in batches of
    ``cfg.batch_size``; with ``reference``, the KL of each sequence,
    sum_t log pi(y_t|.) - log pi_ref(y_t|.) (a Monte-Carlo estimate of KL(pi || pi_ref)).

    The sampling RNG is seeded with ``seed`` inside a forked RNG state: every
    model sampled with the same seed draws the same random numbers, and the
    caller's RNG stream is left as it was.
    """
    repeated = [p for p in prompt_texts for _ in range(cfg.samples_per_prompt)]
    out = Samples([], [], [], [] if reference is not None else None)
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for i in range(0, len(repeated), cfg.batch_size):
            gen = generate(model, tok, repeated[i:i + cfg.batch_size], cfg, device, synced_gpus=synced_gpus,
                           max_prompt_tokens=max_prompt_tokens)
            out.texts += gen.texts
            out.lengths += gen.response_mask.sum(1).tolist()
            out.finished += gen.finished.tolist()
            if reference is not None:
                q = gen.query_ids.size(1)
                ids, attn = gen.input_ids, gen.attention_mask
                lp = response_logprobs(model, ids, attn, q, cfg.temperature)
                ref_lp = response_logprobs(reference, ids, attn, q, cfg.temperature)
                out.kl += sequence_kl(lp.cpu().numpy(), ref_lp.cpu().numpy(),
                                      gen.response_mask.cpu().numpy()).tolist()
    return out
