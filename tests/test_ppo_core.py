"""Hand-computed checks for rlhf.ppo.core (pure functions, milliseconds each)."""

import math

import pytest
import torch

from rlhf.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    entropy_from_logits,
    first_true_indices,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    truncate_after_eos,
    value_loss,
)

LN_1_5 = math.log(1.5)  # 0.405465...


def close(actual, expected, atol=1e-6):
    actual, expected = torch.as_tensor(actual).float(), torch.as_tensor(expected).float()
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# --- masked statistics ------------------------------------------------------


@pytest.mark.parametrize("as_float", [False, True])
def test_masked_mean_bool_and_float_masks(as_float):
    x = torch.tensor([[1.0, 2.0, 99.0], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    if as_float:
        mask = mask.float()
    close(masked_mean(x, mask), 3.0)  # (1+2+3+4+5)/5
    close(masked_mean(x, mask, dim=1), [1.5, 4.0])  # (1+2)/2, (3+4+5)/3


def test_masked_mean_empty_mask_is_zero_not_nan():
    close(masked_mean(torch.tensor([[5.0, 7.0]]), torch.zeros(1, 2)), 0.0)


def test_masked_var_hand_values():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # mean 2, squared deviations 1 + 0 + 1 = 2
    close(masked_var(x, mask, unbiased=True), 1.0)  # 2 / (3-1)
    close(masked_var(x, mask, unbiased=False), 2.0 / 3.0)  # 2 / 3


def test_masked_var_single_element_is_zero_not_nan():
    var = masked_var(torch.tensor([[4.0, 9.0]]), torch.tensor([[1, 0]]), unbiased=True)
    assert not torch.isnan(var)
    close(var, 0.0)


def test_masked_whiten_hand_values_and_padding_ignored():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    # mean 2, unbiased var 1 -> (x - 2) / 1; padding is zeroed, not whitened
    close(masked_whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]], atol=1e-5)
    # shift_mean=False only rescales: (x - 2) / 1 + 2
    close(masked_whiten(x, mask, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]], atol=1e-5)


def test_masked_whiten_zero_mean_unit_variance_over_valid_tokens():
    torch.manual_seed(0)
    x = torch.randn(4, 6) * 3 + 5
    lengths = torch.tensor([6, 3, 1, 4])
    mask = torch.arange(6) < lengths.unsqueeze(1)
    padded = x.clone()
    padded[~mask] = 1e4  # garbage on padding must not move the statistics
    w = masked_whiten(padded, mask)
    close(masked_mean(w, mask), 0.0, atol=1e-5)
    close(masked_var(w, mask), 1.0, atol=1e-5)
    close(w, masked_whiten(x, mask))
    assert (w[~mask] == 0).all()


def test_masked_whiten_single_valid_element_no_nan():
    w = masked_whiten(torch.tensor([[3.0, 8.0]]), torch.tensor([[1, 0]]))
    assert torch.isfinite(w).all()
    close(w, [[0.0, 0.0]])  # (3 - 3) / sqrt(0 + eps)


# --- KL and rewards -----------------------------------------------------------


def test_kl_penalty_k1_and_k3_hand_values():
    logprobs = torch.tensor([[-1.0, -2.0, -2.0]])
    ref_logprobs = torch.tensor([[-1.5, -2.0, -1.0]])
    # k1 = logp - logp_ref: 0.5, 0, -1 (k1 can go negative per token)
    close(kl_penalty(logprobs, ref_logprobs, "k1"), [[0.5, 0.0, -1.0]])
    # k3 with d = logp_ref - logp = (-0.5, 0, 1): (e^d - 1) - d
    #   e^-0.5 - 1 + 0.5 = 0.6065307 - 0.5 = 0.1065307;  0;  e - 1 - 1 = 0.7182818
    close(kl_penalty(logprobs, ref_logprobs, "k3"), [[0.1065307, 0.0, 0.7182818]])


def test_kl_penalty_k3_nonnegative_and_zero_when_identical():
    torch.manual_seed(0)
    logp, ref = -torch.rand(8, 16) * 5, -torch.rand(8, 16) * 5
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    assert (kl_penalty(logp, logp, "k3") == 0).all()
    assert (kl_penalty(logp, logp, "k1") == 0).all()


def test_kl_penalty_unknown_estimator():
    with pytest.raises(ValueError):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k2")


def test_per_token_rewards_score_at_last_valid_token():
    scores = torch.tensor([1.0, 2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    rewards, non_score = per_token_rewards(scores, kl, 0.5, mask)
    # -0.5 * kl on valid tokens, 0 on padding
    close(non_score, [[-0.05, -0.10, 0.0], [-0.20, -0.25, -0.30]])
    # score added at index mask.sum(1) - 1 = 1 and 2: -0.1 + 1 = 0.9, -0.3 + 2 = 1.7
    close(rewards, [[-0.05, 0.90, 0.0], [-0.20, -0.25, 1.70]])


# --- GAE ------------------------------------------------------------------------


def test_gae_1x3_gamma1_lam095():
    values = torch.tensor([[0.5, 0.5, 0.5]])
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    mask = torch.ones(1, 3)
    adv, ret = compute_gae(values, rewards, mask, gamma=1.0, lam=0.95)
    # t=2: delta = 1 + 0 - 0.5 = 0.5 (V beyond the end is 0); A2 = 0.5
    # t=1: delta = 0 + 0.5 - 0.5 = 0;   A1 = 0 + 0.95 * 0.5   = 0.475
    # t=0: delta = 0 + 0.5 - 0.5 = 0;   A0 = 0 + 0.95 * 0.475 = 0.45125
    close(adv, [[0.45125, 0.475, 0.5]])
    # returns = A + V
    close(ret, [[0.95125, 0.975, 1.0]])


def test_gae_discounted_1x2():
    values = torch.tensor([[1.0, 1.0]])
    rewards = torch.tensor([[1.0, 2.0]])
    adv, ret = compute_gae(values, rewards, torch.ones(1, 2), gamma=0.9, lam=0.5)
    # t=1: delta = 2 + 0 - 1 = 1;           A1 = 1
    # t=0: delta = 1 + 0.9 * 1 - 1 = 0.9;   A0 = 0.9 + 0.9 * 0.5 * 1 = 1.35
    close(adv, [[1.35, 1.0]])
    close(ret, [[2.35, 2.0]])


def test_gae_with_padding_matches_unpadded_and_zeroes_padding():
    # Row 0 is the 1x3 example above padded to 5 with garbage; row 1 is full length.
    values = torch.tensor([[0.5, 0.5, 0.5, 9.0, 9.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    rewards = torch.tensor([[0.0, 0.0, 1.0, 7.0, 7.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    adv, ret = compute_gae(values, rewards, mask, gamma=1.0, lam=0.95)
    # Row 0: V_3 = 9 is padding, so it must be treated as 0 at t=2 (same as unpadded).
    close(adv[0], [0.45125, 0.475, 0.5, 0.0, 0.0])
    close(ret[0], [0.95125, 0.975, 1.0, 0.0, 0.0])
    # Row 1: V = 0, so A_t = 0.95^(4-t) * 1
    close(adv[1], [0.95**4, 0.95**3, 0.95**2, 0.95, 1.0])


# --- losses -----------------------------------------------------------------------


def test_policy_loss_ratio_one():
    logp = torch.tensor([[-1.0, -2.0, -3.0]])
    adv = torch.tensor([[1.0, -2.0, 50.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = policy_loss(logp, logp.clone(), adv, mask)
    # ratio 1 -> loss = -masked_mean(A) = -(1 - 2) / 2 = 0.5
    close(loss, -masked_mean(adv, mask))
    close(loss, 0.5)
    close(stats.clipfrac, 0.0)
    close(stats.approx_kl, 0.0)
    close(stats.ratio_mean, 1.0)


def test_policy_loss_clipping_hand_values():
    old = torch.zeros(1, 4)
    logp = torch.tensor([[LN_1_5, 0.0, math.log(0.5), 5.0]], requires_grad=True)
    adv = torch.tensor([[2.0, -1.0, 1.0, 3.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = policy_loss(logp, old, adv, mask, clip_range=0.2)
    # tok0: ratio 1.5, A=2:  max(-3.0, -2*1.2 = -2.4)  = -2.4  (clipped, strictly greater)
    # tok1: ratio 1,   A=-1: max(1, 1)                   = 1     (tie: not counted as clipped)
    # tok2: ratio 0.5, A=1:  max(-0.5, -1*0.8 = -0.8)    = -0.5  (unclipped: pessimistic side)
    # tok3: padding.  loss = (-2.4 + 1 - 0.5) / 3 = -0.6333333
    close(loss, -1.9 / 3)
    close(stats.clipfrac, 1.0 / 3)
    # approx_kl = 0.5 * (ln1.5^2 + 0 + ln0.5^2) / 3 = 0.5 * (0.1644020 + 0.4804530) / 3 = 0.1074758
    close(stats.approx_kl, 0.5 * (LN_1_5**2 + math.log(0.5) ** 2) / 3)
    close(stats.ratio_mean, (1.5 + 1.0 + 0.5) / 3)
    loss.backward()
    # The clipped token gets no gradient; tok2: d/dlogp of -A*exp(logp) / 3 = -0.5/3
    close(logp.grad, [[0.0, 1.0 / 3, -0.5 / 3, 0.0]])


def test_value_loss_unclipped_and_clipped():
    old = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    values = torch.tensor([[1.1, 1.5, 1.5, 9.0]])
    returns = torch.tensor([[2.0, 2.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clipfrac = value_loss(values, old, returns, mask, clip_range_value=0.2)
    # tok0: V within eps of V_old: (1.1-2)^2 = 0.81 both ways               -> 0.81
    # tok1: V clipped to 1.2: max((1.5-2)^2 = 0.25, (1.2-2)^2 = 0.64)         -> 0.64 (clipped)
    # tok2: V clipped to 1.2: max((1.5-1)^2 = 0.25, (1.2-1)^2 = 0.04)         -> 0.25
    # loss = 0.5 * (0.81 + 0.64 + 0.25) / 3 = 0.2833333
    close(loss, 0.5 * 1.70 / 3)
    close(clipfrac, 1.0 / 3)


def test_value_loss_no_clipping_when_unchanged():
    values = torch.tensor([[1.0, 3.0]])
    loss, clipfrac = value_loss(values, values.clone(), torch.tensor([[2.0, 2.0]]), torch.ones(1, 2))
    close(loss, 0.5)  # 0.5 * (1 + 1) / 2
    close(clipfrac, 0.0)


# --- logits -------------------------------------------------------------------------


def test_entropy_from_logits_hand_values():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e9, -1e9], [100.0, 0.0, 0.0, 0.0]]])
    # uniform over 4: ln 4;  p = (1/4, 3/4): -(0.25 ln0.25 + 0.75 ln0.75) = 0.5623351;  near one-hot: ~0
    close(entropy_from_logits(logits), [[math.log(4.0), 0.5623351, 0.0]])
    # bf16 in, fp32 out (ln 3 itself is not representable in bf16, so compare on the uniform row)
    ent = entropy_from_logits(logits.bfloat16())
    assert ent.dtype == torch.float32 and ent.shape == (1, 3)
    close(ent[0, 0], math.log(4.0))


def test_entropy_from_logits_matches_categorical():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 11) * 4
    expected = torch.distributions.Categorical(logits=logits).entropy()
    close(entropy_from_logits(logits), expected, atol=1e-5)


def test_logprobs_from_logits_hand_values():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    labels = torch.tensor([[1]])
    # p = 3 / (1 + 3): ln 0.75 = -0.2876821
    close(logprobs_from_logits(logits, labels), [[math.log(0.75)]])
    # T=2: logits/2 = (0, ln sqrt3): p = sqrt3 / (1 + sqrt3) = 0.6339746, ln = -0.4557464
    close(logprobs_from_logits(logits, labels, temperature=2.0), [[-0.4557464]])


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_logprobs_from_logits_matches_log_softmax(temperature):
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 13) * 3
    labels = torch.randint(0, 13, (2, 5))
    expected = torch.log_softmax(logits / temperature, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    out = logprobs_from_logits(logits.bfloat16(), labels, temperature)
    assert out.dtype == torch.float32 and out.shape == (2, 5)
    close(logprobs_from_logits(logits, labels, temperature), expected, atol=1e-5)


# --- KL controllers -------------------------------------------------------------------


def test_adaptive_kl_controller_hand_values():
    ctl = AdaptiveKLController(kl_coef=0.1, target=6.0, horizon=10000)
    # KL 12: e = 12/6 - 1 = 1 -> clipped to 0.2; coef = 0.1 * (1 + 0.2 * 256/10000) = 0.100512
    ctl.update(12.0, n_steps=256)
    assert ctl.kl_coef == pytest.approx(0.100512)

    ctl = AdaptiveKLController(kl_coef=0.1, target=6.0, horizon=10000)
    # KL 3: e = -0.5 -> clipped to -0.2; coef = 0.1 * (1 - 0.00512) = 0.099488
    ctl.update(torch.tensor(3.0), n_steps=256)
    assert ctl.kl_coef == pytest.approx(0.099488)

    ctl = AdaptiveKLController(kl_coef=0.1, target=6.0, horizon=10000)
    # KL 6.6: e = 0.1 (inside the clip); coef = 0.1 * (1 + 0.1 * 256/10000) = 0.100256
    ctl.update(6.6, n_steps=256)
    assert ctl.kl_coef == pytest.approx(0.100256)


def test_kl_controllers_state_dict_roundtrip():
    ctl = AdaptiveKLController(kl_coef=0.1, target=6.0, horizon=10000)
    ctl.update(12.0, n_steps=256)
    restored = AdaptiveKLController(kl_coef=0.5, target=6.0, horizon=10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.kl_coef == ctl.kl_coef

    fixed = FixedKLController(kl_coef=0.05)
    fixed.update(100.0, n_steps=256)
    assert fixed.kl_coef == 0.05
    other = FixedKLController(kl_coef=1.0)
    other.load_state_dict(fixed.state_dict())
    assert other.kl_coef == 0.05


# --- response post-processing -----------------------------------------------------------


def test_first_true_indices():
    bools = torch.tensor([[False, True, True], [False, False, False], [True, False, False]])
    assert first_true_indices(bools).tolist() == [1, 3, 0]  # no True -> row length 3
    assert first_true_indices(bools, dtype=torch.int32).dtype == torch.int32


def test_truncate_after_eos():
    eos, pad = 2, 0
    ids = torch.tensor(
        [
            [5, 2, 7, 2],  # EOS at 1: keep [5, 2], pad the rest (including the second EOS)
            [5, 6, 7, 8],  # no EOS (hit max_new_tokens): keep everything
            [2, 9, 9, 9],  # EOS first: keep only the EOS
            [5, 6, 7, 2],  # EOS last
        ]
    )
    out, mask, has_eos = truncate_after_eos(ids, eos_token_id=eos, pad_token_id=pad)
    assert out.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0], [5, 6, 7, 2]]
    assert mask.tolist() == [
        [True, True, False, False],
        [True, True, True, True],
        [True, False, False, False],
        [True, True, True, True],
    ]
    assert mask.dtype == torch.bool
    assert has_eos.tolist() == [True, False, True, True]
