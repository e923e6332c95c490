"""The models PPO trains and queries: policy + value in one module, reference.

Policy and value are wrapped in one ``nn.Module`` so Accelerate prepares one
DDP/DeepSpeed/FSDP model and one optimizer steps both (the value loss is added
to the policy loss with ``vf_coef``, docs/ppo.md).

Value model choices (the PPO stage's ``value_model`` key, docs/ppo.md):
- ``reward`` (default): a separate scalar-head model (``ScalarHeadModel``)
  initialised from the first reward-model checkpoint (InstructGPT, N+),
  queried at every response position;
- ``policy_head``: a zero-initialised linear head on the policy's last hidden
  state (one forward pass serves both; ``value_model=None`` here), also the
  ``reward`` choice when no reward model exists;
- none (``value_head=False``): RLOO and GRPO need no value;
- a checkpoint directory: a scalar-head model initialised from it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch
from torch import nn

from rlhf.ppo.core import logprobs_from_logits
from rlhf.sampling import position_ids_from, response_logits, response_logprobs

log = logging.getLogger(__name__)


def value_init_problem(source: str, policy_tok) -> str | None:
    """Why reward checkpoint ``source`` cannot start a value model for a policy
    with tokenizer ``policy_tok``, or None when it can.

    The value model reads the policy's token ids and gives a value at every
    position from what precedes it: an encoder (BERT, MiniLM, ...) sees the
    tokens after each position too and reads text as a (prompt, response)
    pair, and a model with another vocabulary cannot read the policy's ids.
    """
    from rlhf.models import ModelConfig, is_encoder, load_tokenizer
    from rlhf.rewards import read_settings

    saved = read_settings(source)
    if (saved is not None and saved.text_pair) or (saved is None and is_encoder(ModelConfig(name=source))):
        return "it is a bidirectional encoder (it would see each position's future tokens)"
    if load_tokenizer(ModelConfig(name=source), require_eos=False).get_vocab() != policy_tok.get_vocab():
        return "its tokenizer differs from the policy's (it cannot read the policy's token ids)"
    return None


def value_source(value_model: str, critic_free: bool, specs: list,
                 problem: Callable[[str], str | None]) -> str | None:
    """The checkpoint the value model starts from, or None for a value head on
    the policy (or for no value at all: rloo/grpo). The trainer and ``rlhf
    plan`` both ask this, so the plan sizes the model the run builds.

    ``value_model: reward`` takes the first reward model for which
    ``problem(source)`` (``value_init_problem`` with the policy's tokenizer)
    finds nothing wrong; a classifier picked by ``label`` (e.g. a sentiment
    model) has its own tokenizer and heads and is never one. With none (only
    function rewards, or encoders), a second copy of the policy's trunk would
    cost ~1.6x the step time and its memory for nothing a head on the
    policy's trunk cannot learn: a head it is."""
    from rlhf.rewards import is_function

    if critic_free or value_model == "policy_head":
        return None
    if value_model != "reward":
        return value_model
    for src in [s.source for s in specs if not is_function(s.source) and s.label is None]:
        why = problem(src)
        if why is None:
            return src
        log.info("value model: not initialised from reward model %s: %s", src, why)
    return None


class ScalarHeadModel(nn.Module):
    """A transformer trunk and a linear head giving one value per position.

    Built from any HF ``*ForSequenceClassification`` model (the reward model):
    its trunk (``base_model``) and its ``score`` head, applied to every
    position instead of only the last.
    """

    def __init__(self, seq_classifier: nn.Module):
        super().__init__()
        self.trunk = seq_classifier.base_model
        self.head = seq_classifier.score
        self.config = seq_classifier.config

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids).last_hidden_state
        return self.head(hidden).squeeze(-1).float()  # (b, s)


class PolicyAndValue(nn.Module):
    """Policy LM plus value model; ``forward`` returns per-response-token
    log-probs, values and (optionally) entropies."""

    def __init__(self, policy: nn.Module, value_model: ScalarHeadModel | None, value_head: bool = True):
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        if value_model is None and value_head:  # value head on the policy trunk
            hidden = policy.config.get_text_config().hidden_size
            self.value_head = nn.Linear(hidden, 1)
            # A new head starts at zero (docs/ppo.md): the first advantages are then
            # the plain discounted rewards, not noise from a random head.
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        else:
            self.value_head = None

    def tie_weights(self, *args, **kwargs) -> None:
        """Re-tie the policy's shared input/output embeddings. Accelerate's FSDP2
        preparation moves the model to the meta device and calls this on the
        root it was given; without it a tied LM head becomes a separate,
        untrained copy of the embeddings."""
        self.policy.tie_weights(*args, **kwargs)

    @property
    def _no_split_modules(self) -> list[str]:
        """The transformer block classes of policy and value model: FSDP's
        transformer-based auto-wrap shards each block as one unit (read by
        Accelerate, as on a transformers model)."""
        parts = [self.policy] + ([self.value_model.trunk] if self.value_model is not None else [])
        names: list[str] = []
        for part in parts:
            base = part.get_base_model() if hasattr(part, "get_base_model") else part
            names += [n for n in getattr(base, "_no_split_modules", None) or [] if n not in names]
        return names

    def forward(self, input_ids, attention_mask, context_length: int, temperature: float,
                with_entropy: bool = False, with_values: bool = True, entropy_grad: bool = True):
        """Shape: input_ids (b, s) = left-padded prompt (width context_length)
        + right-padded response; returns logprobs (b, r), values (b, r) or
        None, entropy (b, r) or None, with r = s - context_length.

        ``entropy_grad=False``: the entropy is for logging only (no entropy
        bonus), so no graph is kept through its softmax over the vocabulary.
        """
        from rlhf.ppo.core import entropy_from_logits

        position_ids = position_ids_from(attention_mask)
        r = input_ids.size(1) - context_length
        # Logits at position i predict token i+1: the response tokens are
        # predicted from positions context_length-1 .. s-2.
        out, logits = response_logits(self.policy, input_ids, attention_mask, position_ids, r,
                                      output_hidden_states=self.value_head is not None and with_values)
        logprobs = logprobs_from_logits(logits, input_ids[:, context_length:], temperature)
        entropy = None
        if with_entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                entropy = entropy_from_logits(logits if temperature == 1.0 else logits.float() / temperature)
        values = None
        if with_values and (self.value_head is not None or self.value_model is not None):
            if self.value_head is not None:
                hidden = out.hidden_states[-1][:, context_length - 1:-1]
                values = self.value_head(hidden).squeeze(-1).float()
            else:
                values = self.value_model(input_ids, attention_mask, position_ids)[:, context_length - 1:-1]
        return logprobs, values, entropy


class Reference:
    """The frozen reference policy: a separate copy, or (LoRA) the policy's own
    base with adapters disabled, so no second copy sits in memory."""

    def __init__(self, model: nn.Module | None):
        self.model = model  # None: use the policy with adapters disabled

    @torch.no_grad()
    def logprobs(self, policy: nn.Module, input_ids, attention_mask, context_length: int,
                 temperature: float) -> torch.Tensor:
        model = self.model if self.model is not None else policy
        ctx = policy.disable_adapter() if self.model is None else contextlib.nullcontext()
        with ctx:
            return response_logprobs(model, input_ids, attention_mask, context_length, temperature)
