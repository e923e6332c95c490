"""rlhf.ppo.policy pieces that docs/ppo.md names: position ids for left-padded
rows, a zero-initialised value head, a left-padded prompt scoring like an
unpadded one, and dropout off in the presets. Tiny models, under a second."""

from __future__ import annotations

import torch

from rlhf.models import ModelConfig, load_causal_lm, load_tokenizer
from rlhf.ppo.policy import PolicyAndValue, position_ids_from


def _tiny():
    tok = load_tokenizer(ModelConfig("tiny"))
    return tok, load_causal_lm(ModelConfig("tiny"), tok, seed=0).eval()


def test_position_ids_start_at_each_rows_first_real_token():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]])
    assert position_ids_from(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 1, 2, 2]]


def test_left_padding_does_not_change_response_logprobs_and_value_head_starts_at_zero():
    tok, policy = _tiny()
    model = PolicyAndValue(policy, value_model=None).eval()
    prompt, response = torch.tensor([[5, 6, 7]]), torch.tensor([[8, 9]])
    pad = torch.full((1, 2), tok.pad_token_id)
    plain = torch.cat([prompt, response], 1)
    padded = torch.cat([pad, prompt, response], 1)
    with torch.no_grad():
        lp_plain, v_plain, _ = model(plain, torch.ones_like(plain), context_length=3, temperature=0.7)
        lp_pad, v_pad, _ = model(padded, (padded != tok.pad_token_id).long(), context_length=5, temperature=0.7)
    torch.testing.assert_close(lp_pad, lp_plain, atol=1e-5, rtol=0)
    assert lp_plain.dtype == torch.float32 and lp_plain.shape == (1, 2)
    assert torch.count_nonzero(v_plain) == 0 and torch.count_nonzero(v_pad) == 0


def test_presets_have_dropout_off():
    _, policy = _tiny()
    assert all(m.p == 0.0 for m in policy.modules() if isinstance(m, torch.nn.Dropout))
