"""Reward sources, interchangeable wherever a reward is needed (PPO, eval).

A source is a reward-model checkpoint (a directory, or a hub id such as
``OpenAssistant/reward-model-deberta-v3-large-v2`` on machines that can
download) or a Python function given as ``module:function`` with signature
``(prompts, responses) -> list[float]``; several sources combine as a weighted
sum. A trained classifier with several outputs (e.g. the 2-label sentiment
classifier ``lvwerra/distilbert-imdb``) is a source too: ``label`` picks the
logit used as the score.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import numbers
import re
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Callable, Literal

import numpy as np
import torch

from rlhf.config import opt
from rlhf.data import render_pair
from rlhf.errors import BadInput
from rlhf.encoders import has_segment_ids, model_pooling
from rlhf.models import (ModelConfig, context_length, is_encoder, load_config, load_sequence_classifier,
                         load_tokenizer)

log = logging.getLogger(__name__)

RewardFn = Callable[[list, list], list[float]]

_FUNCTION = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name


@dataclass
class RewardSpec:
    """One reward source. A plain string in a recipe is `source`."""

    source: str = opt("", "reward-model checkpoint dir, hub id (owner/name), or module:function")
    weight: float = opt(1.0, "weight in the weighted sum of sources")
    label: int | None = opt(None, "classifier output whose logit is the score (e.g. 1 = POSITIVE for "
                                  "lvwerra/distilbert-imdb); null: a one-output reward model")
    revision: str | None = opt(None, "hub revision of a checkpoint source (e.g. refs/pr/5, where a "
                                     "safetensors conversion lives)")
    aggregate: Literal["mean", "mean_minus_std", "min"] = opt(
        "mean", "an ensemble reward model (reward stage `ensemble: k`): the members' mean, mean - "
                "uncertainty_coef * std (uncertainty-weighted), or min (worst case) [Coste et al. 2023]")
    uncertainty_coef: float = opt(1.0, "lambda of mean_minus_std")

    def check(self, fail):
        if not self.source:
            raise fail("source", "required: a checkpoint dir or module:function")
        if not 0 <= self.uncertainty_coef < math.inf:
            raise fail("uncertainty_coef", f"expected a finite number >= 0, got {self.uncertainty_coef}")
        if self.label is not None and self.label < 0:
            raise fail("label", f"expected an output index >= 0, got {self.label}")
        if is_function(self.source) and (self.label is not None or self.revision is not None):
            raise fail("label" if self.label is not None else "revision",
                       "applies to checkpoint sources only, not to a module:function")


def as_specs(value: str | RewardSpec | list) -> list[RewardSpec]:
    items = value if isinstance(value, list) else [value]
    return [RewardSpec(source=v) if isinstance(v, str) else v for v in items]


def is_function(source: str) -> bool:
    return bool(_FUNCTION.match(source)) and not Path(source).exists()


def is_hub_id(source: str) -> bool:
    """``owner/name`` that is not a local path: a hub checkpoint, checked when it loads."""
    return bool(_HUB_ID.match(source)) and not Path(source).exists()


def load_function(source: str) -> RewardFn:
    module_name, _, attr = source.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise BadInput(f"reward function '{source}': cannot import module '{module_name}' ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise BadInput(f"reward function '{source}': module '{module_name}' has no function '{attr}'")
    return fn


def check_source(source: str, producible: Callable[[str], bool] = lambda s: False) -> None:
    """Raise BadInput unless ``source`` names an importable function, a
    checkpoint dir (existing, or one an earlier stage will produce) or a hub id
    (``owner/name``: it cannot be checked offline, so it is checked when it loads)."""
    if is_function(source):
        load_function(source)
    elif not Path(source).is_dir() and not producible(source) and not is_hub_id(source):
        raise BadInput(f"reward source '{source}': no such checkpoint directory, not a hub id (owner/name) "
                       "and not a module:function")


class NonFiniteReward(RuntimeError):
    """A reward source scored some samples NaN or +-inf (e.g. a log of 0, or an
    fp16 overflow). Not bad input as such: the PPO trainer catches it to skip
    the step. ``source``, ``indices`` (the non-finite samples) and ``total``
    say what happened."""

    def __init__(self, source: str, indices: list[int], values: list[float], total: int):
        self.source, self.indices, self.total = source, indices, total
        super().__init__(f"reward source '{source}' returned {len(indices)} non-finite score(s) of {total} "
                         f"(first: {values[0]} at index {indices[0]})")


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def call_source(source: str, fn: RewardFn, prompts: list, responses: list):
    """``fn(prompts, responses)``; a module:function that raises becomes BadInput
    naming it (the original kept as ``__cause__``). A checkpoint's errors pass through."""
    if not is_function(source):
        return fn(prompts, responses)
    try:
        return fn(prompts, responses)
    except Exception as e:  # noqa: BLE001 - the user's code: any error is theirs
        msg = " ".join(str(e).split())
        raise BadInput(f"reward function '{source}' raised {type(e).__name__}"
                       f"{': ' + msg[:300] if msg else ''}") from e


def check_scores(source: str, scores, n: int) -> list[float]:
    """What reward source ``source`` returned for ``n`` samples, as ``n`` finite floats.

    Raises BadInput naming the source and what it returned (None, a non-list,
    the wrong count, a non-number with its index), and NonFiniteReward when
    some scores are NaN or infinite.
    """
    what = f"reward function '{source}'" if is_function(source) else f"reward source '{source}'"
    expected = f"expected a list of {n} numbers, one per response"
    if scores is None or isinstance(scores, (str, bytes, dict)) or not hasattr(scores, "__iter__"):
        raise BadInput(f"{what} returned {_describe(scores)}; {expected}")
    if getattr(scores, "ndim", 1) != 1:  # a numpy array / tensor of another shape
        raise BadInput(f"{what} returned an array of shape {tuple(getattr(scores, 'shape', ()))}; {expected}")
    scores = list(scores)
    if len(scores) != n:
        raise BadInput(f"{what} returned {len(scores)} scores for {n} responses; {expected}")
    out = []
    for i, s in enumerate(scores):
        number = ((isinstance(s, numbers.Real) or hasattr(s, "__float__"))
                  and not isinstance(s, (str, bytes)) and getattr(s, "ndim", 0) == 0)
        if not number:
            raise BadInput(f"{what} returned a non-number at index {i}: {_describe(s)}; {expected}")
        out.append(float(s))
    bad = [i for i, v in enumerate(out) if not math.isfinite(v)]
    if bad:
        raise NonFiniteReward(source, bad, [out[i] for i in bad], n)
    return out


class CombinedReward:
    """Weighted sum of reward sources: (prompts, responses) -> list of floats."""

    def __init__(self, specs: list[RewardSpec], device="cpu", dtype: str = "float32", max_length: int | None = None):
        """``max_length``: score reward-model checkpoints at this length instead
        of their own (a warning names both); None = as each was trained."""
        self.parts: list[tuple[float, RewardFn, str]] = []
        for spec in specs:
            if is_function(spec.source):
                fn = load_function(spec.source)
            else:
                fn = RewardModel(spec.source, device=device, dtype=dtype, label=spec.label,
                                 revision=spec.revision, max_length=max_length, aggregate=spec.aggregate,
                                 uncertainty_coef=spec.uncertainty_coef)
            self.parts.append((spec.weight, fn, spec.source))

    def checkpoints(self) -> list[str]:
        return [src for _, fn, src in self.parts if not is_function(src)]

    def __call__(self, prompts: list, responses: list) -> list[float]:
        total = [0.0] * len(prompts)
        for weight, fn, source in self.parts:
            scores = check_scores(source, call_source(source, fn, prompts, responses), len(prompts))
            total = [t + weight * s for t, s in zip(total, scores)]
        return total


# ---------------------------------------------------------------- reward-model checkpoints
#
# How a reward model reads (prompt, response) text is part of the model: the
# reward stage saves it in final/reward_config.json and every consumer (PPO,
# eval, labeling, the value-model init) scores exactly that way.

READ_SETTINGS_FILE = "reward_config.json"


@dataclass
class ReadSettings:
    """How a reward model turns (prompt, response) into the tokens it scores."""

    max_length: int  # tokens per prompt + response (+ EOS, or + the encoder's special tokens)
    truncation: str = "prompt_left"  # drop prompt tokens from the left; cut the response only if it alone is too long
    chat_template: bool = False  # chat prompts rendered with the tokenizer's chat template
    response_eos: bool = True  # plain-text responses end with EOS, as the policy's do when they stop
    ensemble: int = 1  # members: one scalar head each on a shared trunk (the classifier's outputs)
    # Encoders (BERT, MiniLM, DeBERTa, ...): prompt and response as the tokenizer's own text pair
    # ([CLS] prompt [SEP] response [SEP]), no EOS; segment ids (token type 1 from the response on)
    # when the model has them; `pooling` is how the sequence becomes one vector (rlhf.models.POOLINGS).
    text_pair: bool = False
    segment_ids: bool = False
    pooling: str = "last"

    def to_json(self) -> dict:
        return dict(self.__dict__)


def encoder_reading(max_length: int, model, ensemble: int = 1) -> ReadSettings:
    """The reading settings of an encoder classifier loaded by
    ``load_sequence_classifier`` (its pooling and whether it has segment ids)."""
    return ReadSettings(max_length=max_length, response_eos=False, ensemble=ensemble, text_pair=True,
                        segment_ids=has_segment_ids(model.config), pooling=model_pooling(model))


def read_settings(path: str | Path) -> ReadSettings | None:
    """The reading settings saved with a reward checkpoint (None: none saved,
    e.g. a hub classifier or a checkpoint from before they were saved)."""
    f = Path(path) / READ_SETTINGS_FILE
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text())
        return ReadSettings(**data)
    except (ValueError, TypeError) as e:
        raise BadInput(f"{f}: expected the reward model's reading settings "
                       f"({', '.join(ReadSettings.__dataclass_fields__)}), got an unreadable file ({e})") from None


def scoring_length(source: str, saved: ReadSettings | None, asked: int | None) -> int | None:
    """The max length to score at: the checkpoint's own, unless a consumer
    asks for another (then warn with both numbers: scores change)."""
    if saved is None:
        return asked
    if asked is not None and asked != saved.max_length:
        log.warning("reward model %s was trained reading %d tokens per (prompt, response); scoring at %d as "
                    "asked: longer texts are truncated differently than in training", source,
                    saved.max_length, asked)
        return asked
    return saved.max_length


@dataclass
class PairStats:
    pairs: int = 0
    prompt_truncated: int = 0  # lost prompt tokens on the left
    response_truncated: int = 0  # response alone exceeded max_length: kept its start (scored before its EOS)
    identical: int = 0  # pairs whose two sides became the same tokens after truncation (a forced tie)


def fit_pair(prompt_ids: list[int], response_ids: list[int], max_length: int,
             stats: PairStats | None = None) -> tuple[list[int], list[int]]:
    """(prompt, response) within ``max_length`` tokens together, dropping prompt tokens from the left.

    If the response alone does not fit, one prompt token is kept and the
    response is cut on the right (counted separately); nothing is dropped.
    """
    if len(prompt_ids) + len(response_ids) <= max_length:
        return prompt_ids, response_ids
    keep = max_length - len(response_ids)
    if keep >= 1:
        if stats:
            stats.prompt_truncated += 1
        return prompt_ids[-keep:], response_ids
    if stats:
        stats.response_truncated += 1
    return prompt_ids[-1:], response_ids[: max_length - 1]


def truncate_pair(prompt_ids: list[int], response_ids: list[int], max_length: int,
                  stats: PairStats | None = None) -> list[int]:
    """prompt + response within ``max_length`` (``fit_pair``), as one sequence."""
    p, r = fit_pair(prompt_ids, response_ids, max_length, stats)
    return p + r


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


def pair_template(tok) -> tuple[list[int], list[int], list[int]]:
    """The special tokens a tokenizer puts around a text pair: (before the
    first text, between the two, after the second), e.g. ([CLS], [SEP], [SEP])
    for BERT, (<s>, </s></s>, </s>) for RoBERTa. Read from the tokenizer
    itself (its special-tokens mask on a sample pair), so every encoder gets
    its own format."""
    enc = tok("a", "b", return_special_tokens_mask=True, verbose=False)
    ids, special = enc["input_ids"], enc["special_tokens_mask"]
    n_first = len(tok("a", add_special_tokens=False)["input_ids"])
    words = [i for i, s in enumerate(special) if not s]
    if len(words) < n_first + 1:
        raise BadInput(f"tokenizer {type(tok).__name__}: cannot find where a text pair's two texts go")
    first_end, second_start = words[n_first - 1] + 1, words[n_first]
    return ids[:words[0]], ids[first_end:second_start], ids[words[-1] + 1:]


def pair_encoder(tok, reading: ReadSettings) -> Callable[..., list[int]]:
    """``encode(prompt, response, stats=None) -> token ids``, as ``reading``
    says the reward model reads: decoder style (prompt + response + EOS,
    ``encode_response``), or an encoder's text pair with its special tokens.
    Both drop prompt tokens from the left to fit ``reading.max_length``."""
    if not reading.text_pair:
        return lambda prompt, response, stats=None: truncate_pair(
            *encode_response(tok, prompt, response), reading.max_length, stats)
    before, between, after = pair_template(tok)
    room = reading.max_length - len(before) - len(between) - len(after)
    if room < 2:
        raise BadInput(f"max_length {reading.max_length} leaves no room for text beside the tokenizer's "
                       f"{reading.max_length - room} special tokens")
    # The boundary of the two segments is the first separator (rlhf.models' segment ids): text that
    # spells a special token (a literal "[SEP]") must not move it, so it reads as an unknown word.
    specials = set(before + between + after)
    unk = tok.unk_token_id if tok.unk_token_id is not None else tok.pad_token_id

    def encode(prompt, response, stats: PairStats | None = None) -> list[int]:
        p_text, r_text = render_pair(tok, prompt, response)
        p_ids, r_ids = ([unk if i in specials else i for i in tok(t, add_special_tokens=False, verbose=False)
                         ["input_ids"]] for t in (p_text, r_text))
        p_ids, r_ids = fit_pair(p_ids, r_ids, room, stats)
        return before + p_ids + between + r_ids + after

    return encode


def tokenize_pairs(rows: list[dict], tok, max_length: int, reading: ReadSettings | None = None
                   ) -> tuple[list[dict], PairStats]:
    """Every pair as the reward model reads it (``pair_encoder``; default: decoder style at ``max_length``)."""
    encode = pair_encoder(tok, reading or ReadSettings(max_length=max_length))
    stats = PairStats()
    out = []
    for row in rows:
        stats.pairs += 1
        item = {"chosen_ids": encode(row["prompt"], row["chosen"], stats),
                "rejected_ids": encode(row["prompt"], row["rejected"], stats)}
        stats.identical += item["chosen_ids"] == item["rejected_ids"]
        if "margin" in row:
            item["margin"] = row["margin"]
        out.append(item)
    return out, stats


@torch.no_grad()
def score_ids(model, sequences: list[list[int]], pad_id: int, batch_size: int = 64,
              label: int | None = 0) -> torch.Tensor:
    """Scalar scores of token sequences: the logit of output ``label``, or with
    ``label=None`` every output (an ensemble's members). Shape: (n,) or (n, k).

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
        scores.append((logits if label is None else logits[:, label]).float().cpu())
    return torch.cat(scores) if scores else torch.zeros(0)


def aggregate_members(members: torch.Tensor, how: str = "mean", coef: float = 1.0) -> torch.Tensor:
    """One score per row from an ensemble's member scores: ``mean``,
    ``mean_minus_std`` (mean - coef * std, the population std over members)
    or ``min``. Shape: (n, k) -> (n,)."""
    if how == "mean":
        return members.mean(1)
    if how == "mean_minus_std":
        return members.mean(1) - coef * members.std(1, unbiased=False)
    if how == "min":
        return members.min(1).values
    raise ValueError(f"unknown aggregate {how!r} (expected mean, mean_minus_std or min)")


def pair_member_scores(model, pairs: list[dict], pad_id: int, batch_size: int = 64
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every output's score of the chosen and of the rejected side of
    tokenized pairs (``tokenize_pairs``); an ensemble has one output per
    member. Shapes: (n, k), (n, k)."""
    return (score_ids(model, [p["chosen_ids"] for p in pairs], pad_id, batch_size, label=None),
            score_ids(model, [p["rejected_ids"] for p in pairs], pad_id, batch_size, label=None))


def pairwise_stats(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Accuracy over every pair, P(chosen > rejected) with ties counting half,
    and the mean margin. Shapes: (n,), (n,)."""
    wins = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
    return {"accuracy": wins.mean().item(), "margin": (chosen - rejected).mean().item(), "pairs": len(chosen)}


def wilson_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% (z=1.96) Wilson score interval of an accuracy over ``n`` pairs.

    Wilson rather than the normal approximation: it stays inside [0, 1] and
    keeps its coverage at the small n and the accuracies near 1 that
    reward-model held-out sets have. A tie counts half a success, as in the
    accuracy itself."""
    if n <= 0:
        return 0.0, 1.0
    denom = 1 + z * z / n
    centre = (accuracy + z * z / (2 * n)) / denom
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def held_out_summary(accuracy: float, pairs: int, available: int) -> dict:
    """``eval/*`` keys that say how far a held-out accuracy can be trusted:
    its 95% Wilson interval, and whether it covers only a random subset of
    the held-out pairs (``max_eval_samples``) and of how many."""
    low, high = wilson_interval(accuracy, pairs)
    return {"eval/accuracy_ci_low": low, "eval/accuracy_ci_high": high, "eval/accuracy_ci": "wilson95",
            "eval/subset": pairs < available, "eval/pairs_available": available}


def describe_accuracy(summary: dict) -> str:
    """'0.812 [95% Wilson 0.77, 0.85] over all 500 pairs' (or 'over a random subset of 100 of 500 pairs')."""
    n, available = summary["eval/pairs"], summary["eval/pairs_available"]
    where = (f"over a random subset of {n} of {available} held-out records (max_eval_samples)"
             if summary["eval/subset"] else f"over all {n} pairs")
    return (f"{summary['eval/accuracy']:.3f} [95% Wilson interval {summary['eval/accuracy_ci_low']:.3f}, "
            f"{summary['eval/accuracy_ci_high']:.3f}] {where}")


def pairwise_accuracy(model, pairs: list[dict], pad_id: int, batch_size: int = 64) -> dict[str, float]:
    """``pairwise_stats`` of a model on tokenized pairs; an ensemble (several
    outputs) is scored by its members' mean."""
    chosen, rejected = pair_member_scores(model, pairs, pad_id, batch_size)
    return pairwise_stats(chosen.mean(1), rejected.mean(1))




def length_bias(chosen: Sequence[float], rejected: Sequence[float], chosen_len: Sequence[int],
                rejected_len: Sequence[int]) -> dict[str, float | int | None]:
    """How much a reward model's scores follow response length, on preference pairs.

    - ``length_corr``: Pearson correlation of score and length over every
      response (chosen and rejected); None when either is constant;
    - ``accuracy_chosen_shorter`` / ``_longer``: pairwise accuracy (ties half)
      on the pairs whose chosen response is the shorter / the longer one, and
      how many pairs each has: a model that learned "longer wins" is good on
      the second and poor on the first;
    - ``prefers_longer``: among pairs of unequal length, the share where the
      longer response scores higher.
    Shapes: four sequences of n -> dict.
    """
    c, r = np.asarray(chosen, float), np.asarray(rejected, float)
    lc, lr = np.asarray(chosen_len, float), np.asarray(rejected_len, float)
    scores, lengths = np.concatenate([c, r]), np.concatenate([lc, lr])
    corr = None
    if scores.std() > 0 and lengths.std() > 0:
        corr = float(np.corrcoef(scores, lengths)[0, 1])
    wins = (c > r) + 0.5 * (c == r)
    out: dict[str, float | int | None] = {"length_corr": corr}
    for name, mask in (("shorter", lc < lr), ("longer", lc > lr)):
        out[f"accuracy_chosen_{name}"] = float(wins[mask].mean()) if mask.any() else None
        out[f"pairs_chosen_{name}"] = int(mask.sum())
    unequal = lc != lr
    longer_higher = np.where(lc > lr, c > r, r > c)
    out["prefers_longer"] = float(longer_higher[unequal].mean()) if unequal.any() else None
    return out


class RewardModel:
    """A reward-model checkpoint as a reward source: (prompts, responses) -> scores.

    Two kinds of checkpoint:

    - ``label=None``: a one-output reward model, as the reward stage trains.
      It reads text as its ``reward_config.json`` says (``ReadSettings``): a
      decoder sees ``prompt_ids + response_ids + EOS``, exactly what the
      policy produces when it stops (``encode_response``); an encoder sees
      its tokenizer's text pair ``[CLS] prompt [SEP] response [SEP]``, with
      its own tokenizer and pooling (``rlhf.encoders``). Text goes in and a
      score comes out, so the policy's vocabulary never matters. An encoder
      checkpoint without that file (e.g. a hub DeBERTa reward model) is read
      as a text pair with its own head.
    - ``label=k``: a trained classifier with its own head (e.g. the 2-label
      sentiment classifier ``lvwerra/distilbert-imdb``, k=1 for POSITIVE);
      the score is the logit of output k, as in the classic IMDB RLHF demo.
      An encoder tokenizer without EOS (BERT-style) encodes prompt + response
      as one text with its own special tokens (``[CLS] ... [SEP]``), truncated
      on the right; a decoder classifier is encoded as above.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dtype: str = "float32",
                 max_length: int | None = None, batch_size: int = 64, label: int | None = None,
                 revision: str | None = None, aggregate: str = "mean", uncertainty_coef: float = 1.0):
        cfg = ModelConfig(name=str(path), dtype=dtype, revision=revision)
        self.label = label
        self.aggregate, self.uncertainty_coef = aggregate, uncertainty_coef
        self.reading = read_settings(path)
        pair = self.reading.text_pair if self.reading is not None else (label is None and is_encoder(cfg))
        self.tokenizer = load_tokenizer(cfg, require_eos=label is None and not pair)
        self.ensemble = self.reading.ensemble if self.reading is not None and label is None else 1
        # None: keep the classifier's own head (a labelled classifier's, or an ensemble's k outputs).
        num_labels = 1 if label is None and self.ensemble == 1 else None
        pooling = (self.reading.pooling if self.reading is not None else "auto") if pair else None
        self.model = load_sequence_classifier(
            cfg, self.tokenizer, num_labels=num_labels, pooling=pooling,
            segment_ids=self.reading.segment_ids if self.reading is not None else pair and has_segment_ids(
                load_config(cfg))).to(device).eval()
        if label is not None and label >= self.model.config.num_labels:
            raise BadInput(f"reward source '{path}': label {label} out of range (the classifier has "
                           f"{self.model.config.num_labels} outputs: {self.model.config.id2label})")
        limit = context_length(cfg)
        self.max_length = scoring_length(str(path), self.reading, max_length) or limit or 1024
        if limit is not None and self.max_length > limit:
            # A consumer's length (eval's max_length, sized for the policy) can exceed
            # what this model reads, e.g. an encoder's 512 positions.
            log.warning("reward model %s reads at most %d tokens: scoring at %d, not %d", path, limit, limit,
                        self.max_length)
            self.max_length = limit
        self.batch_size = batch_size
        reading = self.reading or (encoder_reading(self.max_length, self.model) if pair
                                   else ReadSettings(max_length=self.max_length))
        self.pair_reading = dataclasses.replace(reading, max_length=self.max_length)
        self._encode = pair_encoder(self.tokenizer, self.pair_reading)

    def encode(self, prompt, response) -> list[int]:
        """Token ids the classifier scores for one (prompt, response)."""
        if self.label is not None and self.tokenizer.eos_token is None:  # a labelled encoder classifier
            p_text, r_text = render_pair(self.tokenizer, prompt, response)
            return self.tokenizer(p_text + r_text, truncation=True, max_length=self.max_length,
                                  verbose=False)["input_ids"]
        return self._encode(prompt, response)

    def tokenize_pairs(self, rows: list[dict]) -> tuple[list[dict], PairStats]:
        """Preference pairs as this model reads them (``tokenize_pairs``)."""
        return tokenize_pairs(rows, self.tokenizer, self.max_length, self.pair_reading)

    def members(self, prompts: list, responses: list) -> torch.Tensor:
        """Every member's score (an ensemble's k heads; one column otherwise). Shape: (n, k)."""
        seqs = [self.encode(p, r) for p, r in zip(prompts, responses)]
        if self.ensemble == 1:
            return score_ids(self.model, seqs, self.tokenizer.pad_token_id, self.batch_size,
                             label=self.label or 0)[:, None]
        return score_ids(self.model, seqs, self.tokenizer.pad_token_id, self.batch_size, label=None)

    def __call__(self, prompts: list, responses: list) -> list[float]:
        return aggregate_members(self.members(prompts, responses), self.aggregate, self.uncertainty_coef).tolist()
