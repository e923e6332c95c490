"""An LSTM or GRU causal language model that is a transformers model, so
everything that takes a causal LM takes it.

    tokens -> embedding -> num_layers x (LSTM | GRU) -> linear head (tied) -> logits

(Zaremba et al. 2014, https://arxiv.org/abs/1409.2329; tied input and output
embeddings, Press & Wolf 2017, https://arxiv.org/abs/1608.05859.)

Importing this module registers model type ``rlhf_rnn`` with ``AutoConfig``,
``AutoModel``, ``AutoModelForCausalLM`` and
``AutoModelForSequenceClassification`` (the entry points import it:
``rlhf.recipe.load_plugins``), so a
checkpoint loads with ``AutoModelForCausalLM.from_pretrained`` (safetensors),
samples with ``generate`` (the recurrent state is the cache), is scored by
``rlhf eval``, trains as a PPO policy (``value_model: policy_head``, or a
value model from an RNN reward model) and as a reward model.

Padding. An RNN reads every position, so pad tokens would leak into the
state. Each row's real tokens must be one contiguous run (left padding, right
padding, or both, as in PPO's left-padded prompt + right-padded response):
rows are rolled so the run starts at 0, packed (``pack_padded_sequence``),
run, and rolled back. Outputs at pad positions are zeros. ``position_ids`` are
accepted and ignored: a recurrence knows where it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils import ModelOutput

MODEL_TYPE = "rlhf_rnn"


# ---------------------------------------------------------------- the model


class RnnConfig(PretrainedConfig):
    """Shape of an RNN LM. ``hidden_size`` is both the embedding and the state size."""

    model_type = MODEL_TYPE

    def __init__(self, vocab_size: int = 1024, hidden_size: int = 256, num_layers: int = 2,
                 cell: str = "lstm", dropout: float = 0.0, max_position_embeddings: int = 256,
                 initializer_range: float = 0.02, tie_word_embeddings: bool = True, use_cache: bool = True,
                 **kwargs):
        if cell not in ("lstm", "gru"):
            raise ValueError(f"cell must be 'lstm' or 'gru', got {cell!r}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.cell = cell
        self.dropout = dropout
        # Not a hard limit: the longest sequence it was trained on, which is
        # what `rlhf validate` checks prompts + max_new_tokens against.
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def num_hidden_layers(self) -> int:  # the name transformers' utilities look for
        return self.num_layers


@dataclass
class RnnOutput(ModelOutput):
    """Trunk output. ``rnn_state``: per-cell tensors (h, or h and c), each (num_layers, b, hidden)."""

    last_hidden_state: torch.Tensor | None = None
    rnn_state: tuple[torch.Tensor, ...] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class RnnCausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    rnn_state: tuple[torch.Tensor, ...] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


def contiguous_runs(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, length) of each row's real tokens. Shape: (b, s) -> (b,), (b,).

    Assumes one contiguous run of ones per row (left and/or right padding);
    an all-zero row gets length 1 at position 0 (packing needs length >= 1).
    """
    mask = attention_mask.bool()
    length = mask.sum(1).clamp(min=1)
    start = mask.int().argmax(1)  # first 1; 0 for an all-zero row
    return start, length


class RnnPreTrainedModel(PreTrainedModel):
    config_class = RnnConfig
    base_model_prefix = "rnn"
    main_input_name = "input_ids"
    _no_split_modules = ["RnnModel"]

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, (nn.LSTM, nn.GRU)):
            # PyTorch's uniform(-1/sqrt(h), 1/sqrt(h)), plus forget-gate bias 1
            # for the LSTM (Jozefowicz et al. 2015): early gradients flow further.
            bound = 1.0 / math.sqrt(module.hidden_size)
            for name, p in module.named_parameters():
                nn.init.uniform_(p, -bound, bound)
                if isinstance(module, nn.LSTM) and name.startswith("bias_ih"):
                    h = module.hidden_size
                    p[h:2 * h].fill_(1.0)


class RnnModel(RnnPreTrainedModel):
    """Embedding + stacked recurrent layers; returns per-position states."""

    def __init__(self, config: RnnConfig):
        super().__init__(config)
        cell = nn.LSTM if config.cell == "lstm" else nn.GRU
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=None)
        # One module per layer (not num_layers=L) so each layer's output can be
        # returned as a hidden state, like a transformer's.
        self.layers = nn.ModuleList(cell(config.hidden_size, config.hidden_size, batch_first=True)
                                    for _ in range(config.num_layers))
        self.dropout = nn.Dropout(config.dropout)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _layer_state(self, state, i):
        if state is None:
            return None
        parts = tuple(s[i:i + 1].contiguous() for s in state)
        return parts if self.config.cell == "lstm" else parts[0]

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                rnn_state: tuple[torch.Tensor, ...] | None = None, use_cache: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = True,
                **kwargs) -> RnnOutput:
        """Shape: input_ids (b, s) -> last_hidden_state (b, s, hidden).

        ``rnn_state`` continues from an earlier call (generation): then every
        input token is taken as real. ``position_ids`` is ignored.
        """
        del position_ids, kwargs  # accepted for the causal-LM calling convention
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, s, _ = x.shape
        packed = (rnn_state is None and attention_mask is not None and attention_mask.shape[1] == s
                  and not bool(attention_mask.bool().all()))
        if packed:
            start, length = contiguous_runs(attention_mask)
            steps = torch.arange(s, device=x.device)
            forward_idx = (steps[None] + start[:, None]) % s  # rolled: real run starts at 0
            backward_idx = (steps[None] - start[:, None]) % s
            x = x.gather(1, forward_idx[..., None].expand_as(x))
            h = pack_padded_sequence(x, length.cpu(), batch_first=True, enforce_sorted=False)
        else:
            h = x

        def unpack(t):
            if not packed:
                return t
            out, _ = pad_packed_sequence(t, batch_first=True, total_length=s)
            return out.gather(1, backward_idx[..., None].expand_as(out))

        def drop(t):
            if isinstance(t, PackedSequence):
                return t._replace(data=self.dropout(t.data))
            return self.dropout(t)

        h = drop(h)
        all_hidden = (unpack(h),) if output_hidden_states else None
        new_state = []
        for i, layer in enumerate(self.layers):
            h, st = layer(h, self._layer_state(rnn_state, i))
            new_state.append(st if isinstance(st, tuple) else (st,))
            if i < len(self.layers) - 1:
                h = drop(h)
            if output_hidden_states:
                all_hidden += (unpack(h),)
        last = unpack(h)
        state = tuple(torch.cat(parts, 0) for parts in zip(*new_state)) if use_cache else None
        return RnnOutput(last_hidden_state=last, rnn_state=state, hidden_states=all_hidden)


class RnnForCausalLM(RnnPreTrainedModel, GenerationMixin):
    """RNN LM head model: ``forward`` -> ``.logits``, ``generate`` with the recurrent state as the cache."""

    _tied_weights_keys = {"lm_head.weight": "rnn.embed_tokens.weight"}
    # The recurrent state cannot be rolled back, so no assisted decoding; and
    # no transformers Cache object is created for it (see below).
    _is_stateful = True

    def __init__(self, config: RnnConfig):
        super().__init__(config)
        self.rnn = RnnModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.rnn.embed_tokens

    def set_input_embeddings(self, value):
        self.rnn.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, rnn_state: tuple[torch.Tensor, ...] | None = None,
                use_cache: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = True, logits_to_keep: int = 0, **kwargs) -> RnnCausalLMOutput:
        """Shape: input_ids (b, s) -> logits (b, s, vocab) float32 (or the last
        ``logits_to_keep`` positions). ``labels`` (b, s), -100 = ignored, are
        shifted inside (position t predicts token t+1) for a mean NLL ``loss``."""
        out = self.rnn(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                       rnn_state=rnn_state, use_cache=use_cache, output_hidden_states=output_hidden_states)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden).float()
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                               labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        return RnnCausalLMOutput(loss=loss, logits=logits, rnn_state=out.rnn_state, hidden_states=out.hidden_states)

    # ---- generation: the recurrent state travels in model_kwargs["rnn_state"]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # our cache is the recurrent state, not a key/value cache

    def prepare_inputs_for_generation(self, input_ids, rnn_state=None, attention_mask=None, use_cache=None,
                                      inputs_embeds=None, **kwargs):
        # With a state, only the newest token is fed; the prefill sees the whole
        # (left-padded) prompt with its mask.
        if rnn_state is not None and use_cache is not False:
            return {"input_ids": input_ids[:, -1:], "rnn_state": rnn_state, "use_cache": True}
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "use_cache": use_cache if use_cache is not None else True}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False,
                                            num_new_tokens=1):
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens)
        if model_kwargs.get("use_cache", True) is not False:
            model_kwargs["rnn_state"] = outputs.rnn_state
        return model_kwargs


class RnnForSequenceClassification(RnnPreTrainedModel):
    """Scalar (or ``num_labels``) head on the state after the last real token:
    an RNN reward model, or PPO's value model (``ScalarHeadModel`` uses
    ``base_model`` and ``score`` per position)."""

    def __init__(self, config: RnnConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.rnn = RnnModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.rnn.embed_tokens

    def set_input_embeddings(self, value):
        self.rnn.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                use_cache=None, output_hidden_states=None, return_dict=True, **kwargs) -> SequenceClassifierOutput:
        out = self.rnn(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                       use_cache=False, output_hidden_states=output_hidden_states)
        logits = self.score(out.last_hidden_state)  # (b, s, num_labels)
        b, s = logits.shape[:2]
        if attention_mask is None:
            last = torch.full((b,), s - 1, device=logits.device)
        else:
            steps = torch.arange(s, device=logits.device)
            last = (attention_mask.bool() * (steps + 1)).argmax(1)  # the last real token
        pooled = logits[torch.arange(b, device=logits.device), last]
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = nn.functional.mse_loss(pooled.squeeze(-1), labels.float())
            else:
                loss = nn.functional.cross_entropy(pooled, labels)
        return SequenceClassifierOutput(loss=loss, logits=pooled, hidden_states=out.hidden_states)


AutoConfig.register(MODEL_TYPE, RnnConfig, exist_ok=True)
AutoModel.register(RnnConfig, RnnModel, exist_ok=True)
AutoModelForCausalLM.register(RnnConfig, RnnForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(RnnConfig, RnnForSequenceClassification, exist_ok=True)
