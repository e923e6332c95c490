"""Encoder classifiers as reward models, and which parts of a classifier train.

A reward model reads a (prompt, response) sequence and pools it into one
vector for its scalar head. Decoders (GPT-2, Llama, SmolLM2, ...) pool at the
last non-pad token: transformers' own ``*ForSequenceClassification`` does it.
Encoders (BERT, MiniLM, DeBERTa, RoBERTa, ...) read the text in both
directions and pool in one of ``POOLINGS``:

- ``model``: the architecture's own head: BERT's pooler (dense + tanh on
  [CLS]), DeBERTa's context pooler, DistilBERT's and RoBERTa's [CLS] head;
  right for a checkpoint whose pooler was trained (e.g. a fine-tuned
  classifier, an MLM-pretrained BERT);
- ``mean``: the mean of the final hidden states over the real tokens, the
  pooling sentence-transformers checkpoints (all-MiniLM-L6-v2, ...) were
  trained with, and the choice when the checkpoint has no pooler weights (a
  pooler initialised at random would scramble the features);
- ``cls``: the final hidden state of the first token, unprojected.

``mean`` and ``cls`` replace the pooler module (or, for architectures
without one, the first token's state that their head reads), so the
checkpoint stays a plain ``AutoModelForSequenceClassification``; the reward
stage records the pooling in ``reward_config.json`` and every loader applies
it again (``rlhf.models.load_sequence_classifier``).

Segment ids: BERT-style models (``type_vocab_size >= 2``) learnt a text
pair's second text as segment 1. A hook derives them from the input ids
(every token after the first separator), so every caller (TRL's trainer,
``rlhf.rewards.score_ids``) feeds them without knowing about them.
"""

from __future__ import annotations

import json
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

POOLINGS = ("last", "model", "mean", "cls")


def has_segment_ids(config) -> bool:
    """Whether the architecture gives a text pair's second text its own segment embedding."""
    return (getattr(config, "type_vocab_size", 0) or 0) >= 2


def model_pooling(model) -> str:
    """How a classifier built by ``rlhf.models.load_sequence_classifier`` pools."""
    return getattr(model, "rlhf_pooling", "last")


def sentence_transformers_pooling(name: str, revision: str | None = None) -> str | None:
    """``mean`` or ``cls`` when ``name`` is a sentence-transformers checkpoint
    (its ``modules.json`` names a Pooling module), read from the local dir or
    the hub cache; None otherwise."""
    from transformers.utils import cached_file

    def read(filename: str):
        try:
            path = cached_file(name, filename, revision=revision, _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False)
        except (OSError, ValueError):
            return None
        return json.loads(open(path).read()) if path else None

    modules = read("modules.json") or []
    pooling = next((m for m in modules if str(m.get("type", "")).endswith("Pooling")), None)
    config = read(f"{pooling['path']}/config.json") if pooling and pooling.get("path") else None
    if not config:
        return None
    if config.get("pooling_mode_cls_token"):
        return "cls"
    if not config.get("pooling_mode_mean_tokens"):
        log.warning("%s: sentence-transformers pooling %s is not supported; using mean pooling", name,
                    [k for k, v in config.items() if k.startswith("pooling_mode") and v])
    return "mean"


def choose_pooling(name: str, revision: str | None, missing_keys: list[str]) -> str:
    """An encoder's pooling when nothing says otherwise: sentence-transformers'
    own, else ``mean`` when the checkpoint lacks the pooler's weights, else ``model``."""
    saved = sentence_transformers_pooling(name, revision)
    if saved is not None:
        return saved
    if any(k.startswith("pooler.") or ".pooler." in k for k in missing_keys):
        return "mean"
    return "model"


class _Pooler(nn.Module):
    """Stands in for an encoder's pooler: the masked mean (``mean``) or the
    first token (``cls``) of the final hidden states, with no weights.
    ``mask`` is the attention mask of the current batch, set by the hook on
    the trunk (poolers are called with the hidden states only)."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.mask: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.mode == "cls":
            return hidden[:, 0]
        mask = self.mask
        if mask is None or mask.dim() != 2 or tuple(mask.shape) != tuple(hidden.shape[:2]):
            mask = torch.ones(hidden.shape[:2], device=hidden.device)
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


def apply_pooling(model, pooling: str) -> None:
    """Make ``model`` (an encoder ``*ForSequenceClassification``) pool as
    ``pooling``; ``model`` and ``last`` leave the architecture's own."""
    model.rlhf_pooling = pooling
    if pooling not in ("mean", "cls"):
        return
    trunk = model.base_model
    pooler = _Pooler(pooling)
    if getattr(trunk, "pooler", None) is not None:  # BERT, MiniLM, ELECTRA, ...: pooler inside the trunk
        trunk.pooler = pooler
    elif isinstance(getattr(model, "pooler", None), nn.Module):  # DeBERTa: pooler beside the trunk
        if getattr(model.pooler, "output_dim", model.config.hidden_size) != model.config.hidden_size:
            raise ValueError(f"{type(model).__name__}: its pooler changes the width; use pooling 'model'")
        model.pooler = pooler
    else:  # DistilBERT, RoBERTa: the head reads the first token's state; give it the pooled one
        def first_token_pooled(module, args, output):
            hidden = output[0]
            hidden = torch.cat([pooler(hidden)[:, None], hidden[:, 1:]], dim=1)
            if isinstance(output, tuple):
                return (hidden, *output[1:])
            output["last_hidden_state"] = hidden
            return output

        trunk.register_forward_hook(first_token_pooled)
    trunk._rlhf_pooler = pooler  # fed the batch's attention mask by the input hook
    add_input_hook(model)


def add_input_hook(model, segments: bool | None = None, sep_id: int | None = None) -> None:
    """One pre-forward hook on the trunk that hands the batch's attention mask
    to a replaced pooler and, with ``segments``, fills in segment ids (type 1
    after the first ``sep_id``) when the caller passed none."""
    trunk = model.base_model
    if segments is not None:
        trunk._rlhf_segments = (segments, sep_id)
    if getattr(trunk, "_rlhf_input_hook", None) is not None:
        return

    def before(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        pooler = getattr(module, "_rlhf_pooler", None)
        if pooler is not None:
            pooler.mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        segments, sep = getattr(module, "_rlhf_segments", (False, None))
        if segments and input_ids is not None and kwargs.get("token_type_ids") is None and len(args) < 3:
            is_sep = (input_ids == sep).long()
            kwargs["token_type_ids"] = ((is_sep.cumsum(1) - is_sep) > 0).long()
        return args, kwargs

    trunk._rlhf_input_hook = trunk.register_forward_pre_hook(before, with_kwargs=True)


def use_segment_ids(model, sep_id: int) -> None:
    """Feed ``model`` segment ids derived from its input (see the module doc)."""
    add_input_hook(model, segments=True, sep_id=sep_id)


# ---------------------------------------------------------------- which parts train


def score_layer(model) -> nn.Linear:
    """The linear layer that outputs a sequence classifier's scores: the last
    ``nn.Linear`` outside the trunk (``score`` on decoders, ``classifier`` on
    BERT, DeBERTa and DistilBERT, ``classifier.out_proj`` on RoBERTa)."""
    trunk = {id(m) for m in model.base_model.modules()}
    found = [m for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in trunk]
    if not found:
        raise ValueError(f"{type(model).__name__}: no linear score layer outside the trunk")
    return found[-1]


def transformer_layers(model) -> nn.ModuleList:
    """The trunk's stack of transformer layers (GPT-2 ``h``, BERT ``encoder.layer``, Llama ``layers``)."""
    n = model.config.get_text_config().num_hidden_layers
    for module in model.base_model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"{type(model).__name__}: no list of {n} transformer layers in its trunk")


def freeze_trunk(model, train_last: int = 0) -> tuple[int, int]:
    """Freeze the trunk except its last ``train_last`` transformer layers and
    what follows them (a final norm, a pooler); the head (everything outside
    the trunk) trains. Embeddings stay frozen. Returns (trainable, total)
    parameter counts."""
    layers = transformer_layers(model)
    if not 0 <= train_last <= len(layers):
        raise ValueError(f"{train_last} layers to train, but the model has {len(layers)}")
    in_layers = {id(p) for p in layers.parameters()}
    train = {id(p) for layer in list(layers)[len(layers) - train_last:] for p in layer.parameters()}
    seen_layers = False
    for p in model.base_model.parameters():  # registration order: embeddings, layers, what follows
        seen_layers = seen_layers or id(p) in in_layers
        after = seen_layers and id(p) not in in_layers
        p.requires_grad_(id(p) in train or (after and train_last > 0))
    counts = [(p.numel(), p.requires_grad) for p in model.parameters()]
    return sum(n for n, g in counts if g), sum(n for n, _ in counts)
