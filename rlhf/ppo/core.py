"""PPO math for language models: small pure torch functions, no models, no I/O.

Shapes: ``b`` = batch, ``t`` = response length, ``v`` = vocabulary size.
Responses are left-aligned: valid tokens occupy positions ``0..L-1`` of a row,
padding follows. Masks are bool or 0/1 float tensors of shape (b, t).

References used throughout:
- [PPO] Schulman et al. 2017, "Proximal Policy Optimization Algorithms",
  https://arxiv.org/abs/1707.06347
- [GAE] Schulman et al. 2016, "High-Dimensional Continuous Control Using
  Generalized Advantage Estimation", https://arxiv.org/abs/1506.02438
- [Ziegler] Ziegler et al. 2019, "Fine-Tuning Language Models from Human
  Preferences", https://arxiv.org/abs/1909.08593
- [InstructGPT] Ouyang et al. 2022, https://arxiv.org/abs/2203.02155
- [N-details] Huang et al. 2023, "The N Implementation Details of RLHF with
  PPO", https://huggingface.co/blog/the_n_implementation_details_of_rlhf_with_ppo
- [N+] Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO: A
  Case Study on TL;DR Summarization", https://arxiv.org/abs/2403.17031
- [KL-approx] Schulman 2020, "Approximating KL Divergence",
  http://joschu.net/blog/kl-approx.html
- [RLOO] Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style
  Optimization for Learning from Human Feedback in LLMs",
  https://arxiv.org/abs/2402.14740
- [GRPO] Shao et al. 2024, "DeepSeekMath", https://arxiv.org/abs/2402.03300
- [Dr.GRPO] Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical
  Perspective", https://arxiv.org/abs/2503.20783
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, Protocol

import torch
from torch import Tensor

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "KLController",
    "PolicyLossStats",
    "compute_gae",
    "entropy_from_logits",
    "aggregate_loss",
    "clipped_surrogate",
    "first_true_indices",
    "group_normalized_advantages",
    "kl_penalty",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "per_token_rewards",
    "rloo_advantages",
    "policy_loss",
    "truncate_after_eos",
    "value_loss",
]


# ---------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is set.

    Shape: x (b, t), mask (b, t) -> scalar if ``dim`` is None, else ``x`` with
    ``dim`` reduced (e.g. ``dim=1`` -> (b,)).

    An all-masked slice gives 0 rather than NaN, so an empty row cannot poison
    a loss. Reference: [N-details] (losses are averaged over response tokens).
    """
    mask = mask.to(x.dtype)
    total = (x * mask).sum() if dim is None else (x * mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all positions where ``mask`` is set.

    Shape: x (b, t), mask (b, t) -> scalar.

    Bessel's correction n/(n-1) is applied only when n > 1: with a single valid
    element (a minibatch of one short response) it would divide by zero and
    NaN the whitened advantages, a failure reported in public PPO trackers.
    Reference: [N-details] (advantage whitening).
    """
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        # torch.where keeps this sync-free on GPU (no Python `if` on a tensor).
        var = torch.where(count > 1, var * count / (count - 1).clamp(min=1), var)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise ``x`` to zero mean and unit variance over valid positions.

    Shape: x (b, t), mask (b, t) -> (b, t).

    Statistics are taken over the whole batch's valid tokens; padded positions
    neither contribute nor keep their values (they are set to 0). With
    ``shift_mean=False`` the mean is added back, i.e. only the scale changes
    (used for rewards in [Ziegler]). ``eps`` guards a zero variance, so a single
    valid element whitens to 0 instead of NaN.
    Reference: [N-details] (reward and advantage whitening); [Ziegler].
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


# ---------------------------------------------------------------------------
# KL penalty and rewards
# ---------------------------------------------------------------------------


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: Literal["k1", "k3"] = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens.

    Shape: logprobs (b, t), ref_logprobs (b, t) -> (b, t).

    ``k1`` = logp - logp_ref is unbiased but can be negative per token; ``k3`` =
    (exp(logp_ref - logp) - 1) - (logp_ref - logp) is unbiased and always >= 0.
    Reference: [KL-approx]; [Ziegler] uses k1.
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        # expm1 is exact near 0, where policy and reference nearly agree.
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1' or 'k3'")


def per_token_rewards(
    scores: Tensor, kl: Tensor, kl_coef: float | Tensor, mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Dense PPO rewards: a KL penalty on every token, the score on the last.

    r_t = -kl_coef * kl_t on valid tokens (0 on padding), and the sequence score
    is added at the last valid token L-1 = mask.sum(1) - 1 (the EOS token, or
    the final token of a truncated response).

    Shape: scores (b,), kl (b, t), mask (b, t) -> rewards (b, t),
    non_score_reward (b, t).
    Reference: [InstructGPT] eq. 2; [Ziegler] sec. 2.2; [N-details].
    """
    maskf = mask.to(kl.dtype)
    non_score_reward = -kl_coef * kl * maskf
    lengths = maskf.sum(1).long()
    last = (lengths - 1).clamp(min=0).unsqueeze(1)
    # A row with no valid token gets no score instead of one at position 0.
    score = (scores.to(kl.dtype) * (lengths > 0)).unsqueeze(1)
    rewards = non_score_reward.scatter_add(1, last, score)
    return rewards, non_score_reward


# ---------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------


def compute_gae(
    values: Tensor, rewards: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over response tokens.

    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1};
    V beyond the last valid token is 0 (the episode ends there). Returns are
    R_t = A_t + V_t, taken before any advantage whitening.

    Shape: values (b, t), rewards (b, t), mask (b, t) -> advantages (b, t),
    returns (b, t); both are 0 on padded positions.
    Reference: [GAE] eq. 16; [N-details].
    """
    maskf = mask.to(values.dtype)
    # Zeroing padding makes V_{L} = 0 and r = 0 past the end, so the recursion
    # needs no special case for where each row stops.
    values = values * maskf
    rewards = rewards * maskf
    t = values.size(1)
    advantages = torch.zeros_like(values)
    next_advantage = torch.zeros_like(values[:, 0])
    for i in reversed(range(t)):
        next_value = values[:, i + 1] if i + 1 < t else torch.zeros_like(values[:, i])
        delta = rewards[:, i] + gamma * next_value - values[:, i]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, i] = next_advantage
    returns = advantages + values
    return advantages * maskf, returns * maskf


def _groups(scores: Tensor, k: int) -> Tensor:
    if k < 2 or scores.dim() != 1 or scores.numel() % k:
        raise ValueError(f"expected a (n * k,) score vector with k >= 2 samples per prompt, got shape "
                         f"{tuple(scores.shape)} and k={k}")
    return scores.view(-1, k)


def rloo_advantages(scores: Tensor, k: int) -> Tensor:
    """REINFORCE leave-one-out: each sample's baseline is the mean score of the
    other k-1 samples of its prompt.

    A_i = s_i - (sum_j s_j - s_i) / (k - 1) = k / (k - 1) * (s_i - mean(s)).
    The baseline does not depend on s_i, so the estimate stays unbiased and no
    value model is needed.

    Shape: scores (n * k,), the k samples of a prompt consecutive -> (n * k,).
    Reference: [RLOO] eq. 8 (Kool et al. 2019's leave-one-out baseline).
    """
    g = _groups(scores, k)
    baseline = (g.sum(1, keepdim=True) - g) / (k - 1)
    return (g - baseline).reshape(-1)


def group_normalized_advantages(scores: Tensor, k: int, scale: Literal["group", "batch", "none"] = "group",
                                eps: float = 1e-4) -> Tensor:
    """GRPO's outcome advantages: each score minus its prompt's mean, divided
    by the prompt's (``group``, GRPO) or the whole batch's (``batch``) sample
    std, or not divided (``none``: Dr. GRPO, whose authors show the division
    up-weights prompts that are too easy or too hard).

    A_i = (s_i - mean_group(s)) / (std(s) + eps); std with Bessel's correction
    and eps = 1e-4, as TRL's GRPOTrainer.

    Shape: scores (n * k,), the k samples of a prompt consecutive -> (n * k,).
    Reference: [GRPO] sec. 4.1.2 (outcome supervision); [Dr.GRPO] sec. 3.1.
    """
    g = _groups(scores, k)
    centered = g - g.mean(1, keepdim=True)
    if scale == "none":
        return centered.reshape(-1)
    if scale == "group":
        std = g.std(1, keepdim=True)
    elif scale == "batch":
        std = scores.std()
    else:
        raise ValueError(f"unknown scale {scale!r}; expected 'group', 'batch' or 'none'")
    return (centered / (std + eps)).reshape(-1)


# ---------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------


class PolicyLossStats(NamedTuple):
    """Detached scalars logged as ``ppo/clipfrac``, ``ppo/approx_kl``, ``ppo/ratio``."""

    clipfrac: Tensor
    approx_kl: Tensor
    ratio_mean: Tensor


def aggregate_loss(per_token: Tensor, mask: Tensor, how: Literal["token_mean", "sequence_mean", "constant"],
                   *, tokens: float | Tensor | None = None, sequences: int | None = None,
                   max_len: int | None = None) -> Tensor:
    """One loss from per-token losses; the choice weighs long and short
    responses differently, which is where GRPO variants differ.

    - ``token_mean``: sum / tokens, every token counts alike (PPO as in
      [N-details]; DAPO; TRL's ``bnpo``/``dapo``).
    - ``sequence_mean``: mean over sequences of each sequence's token mean
      (the original [GRPO] objective; a token of a short response weighs more,
      which biases toward short correct and long wrong answers).
    - ``constant``: sum / (sequences * max_len), a constant divisor ([Dr.GRPO],
      TRL's ``dr_grpo``; unbiased in length).

    ``tokens`` and ``sequences`` are the whole minibatch's counts when
    ``per_token`` is one micro-batch of it (so the gradient is the same for any
    micro-batch size); by default they are this batch's own.

    Shape: per_token (b, t), mask (b, t) -> scalar.
    """
    maskf = mask.to(per_token.dtype)
    total = (per_token * maskf).sum()
    sequences = per_token.size(0) if sequences is None else sequences
    if how == "token_mean":
        # sum / tokens, computed as this batch's token mean times its share of
        # the tokens: the order of operations the PPO stage has always used,
        # so its runs reproduce to the last bit.
        own = masked_mean(per_token, mask)
        return own if tokens is None else own * maskf.sum() / torch.as_tensor(tokens).clamp(min=1)
    if how == "sequence_mean":
        per_seq = (per_token * maskf).sum(1) / maskf.sum(1).clamp(min=1)
        return per_seq.sum() / max(sequences, 1)
    if how == "constant":
        if not max_len:
            raise ValueError("aggregate_loss('constant') needs max_len (the generation's max_new_tokens)")
        return total / (max(sequences, 1) * max_len)
    raise ValueError(f"unknown aggregation {how!r}; expected 'token_mean', 'sequence_mean' or 'constant'")


def clipped_surrogate(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_range: float = 0.2
) -> tuple[Tensor, PolicyLossStats]:
    """PPO's clipped surrogate per token, before any aggregation.

    loss_t = max(-A_t ratio_t, -A_t clip(ratio_t, 1-eps, 1+eps)),
    ratio_t = exp(logp_t - logp_old_t); ``advantages`` may be (b, t) or (b, 1)
    (one sequence-level advantage broadcast over the tokens, RLOO/GRPO).
    Statistics as in ``policy_loss``.

    Shape: logprobs, old_logprobs, mask (b, t) -> loss (b, t).
    Reference: [PPO] eq. 7; [GRPO] eq. 3 (the same surrogate per token).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    with torch.no_grad():
        stats = PolicyLossStats(
            clipfrac=masked_mean((clipped > unclipped).to(logprobs.dtype), mask),
            approx_kl=0.5 * masked_mean(log_ratio**2, mask),
            ratio_mean=masked_mean(ratio, mask),
        )
    return torch.maximum(unclipped, clipped), stats


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_range: float = 0.2
) -> tuple[Tensor, PolicyLossStats]:
    """PPO clipped surrogate loss, averaged over valid tokens.

    loss = masked_mean(max(-A ratio, -A clip(ratio, 1-eps, 1+eps))),
    ratio = exp(logp - logp_old).

    ``clipfrac`` is the fraction of valid tokens where the clipped term is
    strictly larger (so ratio == 1 gives 0). ``approx_kl`` = 0.5 * mean of the
    squared log-ratio between consecutive policies (the k2 estimator), not the
    policy-vs-reference KL.

    Shape: logprobs, old_logprobs, advantages, mask (b, t) -> loss scalar.
    Reference: [PPO] eq. 7; [KL-approx] for approx_kl; [N-details].
    """
    per_token, stats = clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_range)
    return masked_mean(per_token, mask), stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range_value: float = 0.2
) -> tuple[Tensor, Tensor]:
    """Clipped value loss, averaged over valid tokens.

    loss = 0.5 * masked_mean(max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)).
    ``value_clipfrac`` is the fraction of valid tokens where the clipped term is
    strictly larger.

    Shape: values, old_values, returns, mask (b, t) -> loss scalar,
    value_clipfrac scalar (detached).
    Reference: [N-details] (value clipping, as in OpenAI's lm-human-preferences);
    Huang et al. 2022, "The 37 Implementation Details of PPO",
    https://iclr-blog-track.github.io/2022/03/25/ppo-implementation-details/
    """
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        value_clipfrac = masked_mean((loss_clipped > loss_unclipped).to(values.dtype), mask)
    return loss, value_clipfrac


# ---------------------------------------------------------------------------
# Logits -> per-token quantities
# ---------------------------------------------------------------------------


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var(returns - values) / Var(returns) over valid tokens.

    1 is a perfect value function, 0 one no better than predicting the mean
    return, negative worse than that. NaN when the returns do not vary (the
    ratio is undefined). Shape: (b, t) x 3 -> scalar.
    Reference: CleanRL ppo.py (``losses/explained_variance``).
    """
    var_returns = masked_var(returns, mask, unbiased=False)
    if var_returns == 0:
        return torch.tensor(float("nan"))
    return 1 - masked_var(returns - values, mask, unbiased=False) / var_returns


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution at each position.

    H = logsumexp(z) - sum_i softmax(z)_i z_i. logsumexp avoids overflowing
    exp(z); fp32 because bf16 keeps ~3 significant digits, too few for sums
    over a vocabulary of tens of thousands, and fp16 overflows.

    Shape: logits (b, t, v) -> (b, t), fp32.
    Reference: [PPO] eq. 9 (entropy bonus).
    """
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """log p(label) under softmax(logits / temperature), in fp32.

    The temperature must be the one used for sampling, in rollout and in every
    training forward pass, for policy and reference alike; a mismatch makes the
    KL negative ([N-details], scaling logits by the sampling temperature).
    Only the (b, t) logsumexp and the gathered logits are kept, not a full
    (b, t, v) log-softmax.

    Shape: logits (b, t, v), labels (b, t) long -> (b, t), fp32.
    Reference: [N-details]; [N+] (fp32 log-probs).
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


# ---------------------------------------------------------------------------
# KL coefficient controllers
# ---------------------------------------------------------------------------


class KLController(Protocol):
    """What the PPO loop needs from a KL coefficient schedule."""

    kl_coef: float

    def update(self, current_kl: float | Tensor, n_steps: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class AdaptiveKLController:
    """Proportional controller steering the policy-vs-reference KL to ``target``.

    e = clip(KL / target - 1, -0.2, 0.2);  kl_coef <- kl_coef * (1 + e * n / horizon),
    with n the number of episodes in the update. The clip bounds the step when
    KL is far from target.
    Reference: [Ziegler] sec. 2.2, eq. 2.
    """

    def __init__(self, kl_coef: float, target: float, horizon: float) -> None:
        self.kl_coef = float(kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.kl_coef *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        # target and horizon come from the config; only the coefficient evolves.
        return {"kl_coef": self.kl_coef}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl_coef = float(state["kl_coef"])


class FixedKLController:
    """Constant KL coefficient; same interface as ``AdaptiveKLController``."""

    def __init__(self, kl_coef: float) -> None:
        self.kl_coef = float(kl_coef)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"kl_coef": self.kl_coef}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl_coef = float(state["kl_coef"])


# ---------------------------------------------------------------------------
# Response post-processing
# ---------------------------------------------------------------------------


def first_true_indices(bools: Tensor, dtype: torch.dtype = torch.long) -> Tensor:
    """Index of the first True in each row, or the row length if there is none.

    Shape: bools (b, t) -> (b,).
    Reference: [N+] (locating the EOS token in sampled responses).
    """
    t = bools.size(-1)
    positions = torch.arange(t, dtype=dtype, device=bools.device).expand_as(bools)
    return torch.where(bools, positions, torch.full_like(positions, t)).min(-1).values


def truncate_after_eos(
    response_ids: Tensor, eos_token_id: int, pad_token_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Keep each response up to and including its first EOS, pad the rest.

    Batched generation keeps sampling for rows that already finished, so
    anything after the first EOS is noise that must not be scored or trained on.
    Rows without EOS (hit ``max_new_tokens``) are kept whole.

    Shape: response_ids (b, t) -> ids (b, t), mask (b, t) bool, has_eos (b,) bool.
    Reference: [N-details] (truncating at the stop token); [N+] (EOS handling).
    """
    t = response_ids.size(1)
    eos_index = first_true_indices(response_ids == eos_token_id)
    has_eos = eos_index < t
    mask = torch.arange(t, device=response_ids.device).unsqueeze(0) <= eos_index.unsqueeze(1)
    ids = torch.where(mask, response_ids, torch.full_like(response_ids, pad_token_id))
    return ids, mask, has_eos
