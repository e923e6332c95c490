"""``rlhf plan``: per-GPU memory of each stage of a recipe, before launching it.

Parameter counts are exact and cost no weights: each model's config (a local
checkpoint's ``config.json``, a GGUF file's metadata, the hub cache, or for
well-known hub models offline a shape recorded in ``KNOWN_SHAPES``) is
instantiated on the ``meta`` device and its parameters counted; LoRA adapters
are counted from the same module tree. Memory is then estimated per GPU, in
bytes, for N GPUs:

Model state of a trained model (T trainable, F frozen parameters), the usual
mixed-precision AdamW accounting (ZeRO paper, Rajbhandari et al. 2020, sec. 3):

  DDP     w*(T+F) + 4T (grads) + 8T (Adam m, v)          w = 4 (float32 weights, bf16 autocast),
                                                         2 for dtype bfloat16/float16 (then grads 2T, Adam 4T)
  ZeRO-2  2*(T+F) + (2T + 12T) / N                       bf16 weights; grads, fp32 master + Adam sharded
  ZeRO-3  (2*(T+F) + 2T + 12T) / N + 2*L                 everything sharded; L = one layer gathered
  FSDP    (4*(T+F) + 4T + 8T) / N + 2*L                  fp32 shards, one bf16 layer unsharded at a time

Frozen models: PPO's reference copy and reward models are sharded like the
policy under ZeRO-3 and FSDP (w * params / N + one 16-bit layer gathered) and
replicated otherwise (w * params); eval models are replicated. LoRA removes
the reference copy (the policy with adapters off is the reference).

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation",
with memory-efficient attention so no s^2 term), 16-bit:
  34 * b * s * h bytes per layer, or 2 * b * s * h per layer plus one layer's
  34 * b * s * h with gradient checkpointing; plus the LM head's fp32 logits,
  log-softmax and their gradient: 12 * b * t * V (t = scored tokens: the whole
  sequence in SFT, the response in PPO; no LM head in reward models).
Generation (PPO rollout, eval) holds a KV cache: 2 * layers * b * s * kv_dim * 2.
Under ZeRO-3 and FSDP, PPO gathers the policy and value weights once per
rollout (16-bit, 2 * params; rlhf/sharding.py). PPO's peak is model state +
frozen models + max(rollout: gathered weights + KV cache, training activations).

Then 10% for fragmentation and 1.5 GiB for the CUDA context and workspace.
Estimates, not measurements: real peaks vary with kernels, sequence lengths and
allocator behaviour; treat a configuration within ~15% of the limit as a risk.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from rlhf.errors import BadInput

# rlhf.models (torch, transformers) is imported inside the functions: building
# the CLI parser must stay fast.

GIB = 1024 ** 3
STRATEGIES = ("DDP", "ZeRO-2", "ZeRO-3", "FSDP")
CONFIG_FILES = {"DDP": "accelerate_config.yaml", "ZeRO-2": "recipes/accelerate/deepspeed_zero2.yaml",
                "ZeRO-3": "recipes/accelerate/deepspeed_zero3.yaml", "FSDP": "recipes/accelerate/fsdp.yaml"}
OVERHEAD_FACTOR = 1.10
OVERHEAD_BYTES = 1.5 * GIB

# Shapes of hub models the recipes name, so `rlhf plan` works offline (from
# their published config.json). Anything else needs its config locally or in
# the hub cache.
KNOWN_SHAPES: dict[str, dict] = {
    "gpt2": dict(model_type="gpt2", n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024),
    "lvwerra/distilbert-imdb": dict(model_type="distilbert", n_layers=6, n_heads=12, dim=768, hidden_dim=3072,
                                    vocab_size=30522, max_position_embeddings=512, num_labels=2),
    "HuggingFaceTB/SmolLM2-135M": dict(model_type="llama", hidden_size=576, intermediate_size=1536,
                                       num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                       vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True),
    "HuggingFaceTB/SmolLM2-360M": dict(model_type="llama", hidden_size=960, intermediate_size=2560,
                                       num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                                       vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True),
    "HuggingFaceTB/SmolLM2-1.7B": dict(model_type="llama", hidden_size=2048, intermediate_size=8192,
                                       num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
                                       vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True),
    "Qwen/Qwen2.5-0.5B": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                              num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                              max_position_embeddings=32768, tie_word_embeddings=True),
    "Qwen/Qwen2.5-7B": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                            num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                            max_position_embeddings=131072, tie_word_embeddings=False),
    "EleutherAI/pythia-1b-deduped": dict(model_type="gpt_neox", hidden_size=2048, intermediate_size=8192,
                                         num_hidden_layers=16, num_attention_heads=8, vocab_size=50304,
                                         max_position_embeddings=2048, rotary_pct=0.25, tie_word_embeddings=False),
    "meta-llama/Llama-3.2-1B": dict(model_type="llama", hidden_size=2048, intermediate_size=8192,
                                    num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                    vocab_size=128256, max_position_embeddings=131072, tie_word_embeddings=True),
    "meta-llama/Llama-3.1-8B": dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                    vocab_size=128256, max_position_embeddings=131072, tie_word_embeddings=False),
}


@dataclass
class Shape:
    """What the estimate needs to know about one model."""

    name: str
    params: int  # all parameters of the model as loaded for this role
    trainable: int  # parameters the optimiser updates (LoRA: adapters + modules_to_save)
    layers: int
    hidden: int
    kv_dim: int  # key/value width per layer (num_kv_heads * head_dim)
    vocab: int
    layer_params: int  # parameters of one transformer layer (ZeRO-3/FSDP gather one at a time)
    bytes_per_weight: int  # 4 for float32 weights, 2 for bfloat16/float16
    checkpointing: bool


def _hf_config(model):
    """The model's transformers config without weights, or BadInput."""
    from transformers import AutoConfig

    from rlhf.models import preset_config, is_preset, load_config, load_tokenizer

    if is_preset(model.name):
        return preset_config(model.name, load_tokenizer(model))
    config = load_config(model)
    if config is None and model.name in KNOWN_SHAPES:
        shape = dict(KNOWN_SHAPES[model.name])
        return AutoConfig.for_model(shape.pop("model_type"), **shape)
    if config is None:
        raise BadInput(f"model '{model.name}': cannot read its config offline (not a local checkpoint, not in the "
                       f"hub cache, not one of rlhf.plan.KNOWN_SHAPES); run `rlhf plan` where it is downloadable "
                       f"or cached")
    return config


def _lora_trainable(module, spec) -> int:
    """Adapter parameters peft would add for ``spec`` (r * (in + out) per adapted linear layer)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    targets = spec.target_modules
    total = 0
    for name, m in module.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(m, nn.Linear):
            fan_in, fan_out = m.in_features, m.out_features
        elif isinstance(m, Conv1D):  # GPT-2's linear layers
            fan_in, fan_out = m.weight.shape
        else:
            continue
        if targets == "all-linear":
            hit = leaf not in ("lm_head", "score", "classifier")
        else:
            names = [targets] if isinstance(targets, str) else targets
            hit = leaf in names
        if hit:
            total += spec.r * (fan_in + fan_out)
    for keep in spec.modules_to_save or []:
        sub = dict(module.named_modules())
        total += sum(p.numel() for n, m in sub.items() if n.rsplit(".", 1)[-1] == keep for p in m.parameters())
    return total


def model_shape(model, role: str = "causal", num_labels: int | None = 1, trainable: bool = True) -> Shape:
    """Count parameters of ``model`` (a name or ModelConfig) as a causal LM (``role="causal"``)
    or as a sequence classifier (``role="classifier"``: trunk + score head), on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf.models import as_model_config

    model = as_model_config(model)
    config = _hf_config(model)
    if role == "classifier" and num_labels is not None:
        config.num_labels = num_labels
    builder = AutoModelForCausalLM if role == "causal" else AutoModelForSequenceClassification
    with torch.device("meta"):
        module = builder.from_config(config)
    params = sum(p.numel() for p in module.parameters())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = _first(text, "num_hidden_layers", "n_layer", "n_layers")
    hidden = _first(text, "hidden_size", "n_embd", "dim")
    heads = _first(text, "num_attention_heads", "n_head", "n_heads")
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    layer_params = max((sum(p.numel() for p in m.parameters()) for m in module.modules()
                        if type(m).__name__.endswith(("DecoderLayer", "Block", "Layer", "TransformerBlock"))
                        and m is not module), default=params // max(layers, 1))
    n_trainable = 0
    if trainable:
        n_trainable = _lora_trainable(module, model.lora) if model.lora else params
    return Shape(name=model.name + (f" ({model.gguf_file})" if model.gguf_file else ""), params=params,
                 trainable=n_trainable, layers=layers, hidden=hidden, kv_dim=hidden // heads * kv_heads,
                 vocab=text.vocab_size, layer_params=layer_params,
                 bytes_per_weight=2 if model.dtype in ("bfloat16", "float16") else 4,
                 checkpointing=model.gradient_checkpointing)


def _first(config, *keys) -> int:
    for key in keys:
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise BadInput(f"config of type {type(config).__name__}: none of {keys}")


# ---------------------------------------------------------------- formulas (bytes per GPU)


def model_state(shape: Shape, strategy: str, gpus: int) -> float:
    """Weights, gradients and AdamW state of a trained model (see the module docstring)."""
    # LoRA adapters (trainable < params) come on top of the frozen base.
    t = shape.trainable
    f = shape.params - (t if t == shape.params else 0)
    n = gpus
    if strategy == "DDP":
        w = shape.bytes_per_weight
        grads_adam = (4 + 8) if w == 4 else (2 + 4)
        return w * (t + f) + grads_adam * t
    if strategy == "ZeRO-2":
        return 2 * (t + f) + (2 * t + 12 * t) / n
    if strategy == "ZeRO-3":
        return (2 * (t + f) + 2 * t + 12 * t) / n + 2 * shape.layer_params
    if strategy == "FSDP":
        return (4 * (t + f) + 4 * t + 8 * t) / n + 2 * shape.layer_params
    raise ValueError(strategy)


def frozen(shape: Shape, strategy: str = "DDP", gpus: int = 1) -> float:
    """A frozen model's weights per GPU: sharded under ZeRO-3/FSDP (PPO's
    reference and reward models), else replicated."""
    if strategy in ("ZeRO-3", "FSDP"):
        return shape.bytes_per_weight * shape.params / gpus + 2 * shape.layer_params
    return shape.bytes_per_weight * shape.params


def gathered_for_rollout(shapes: list[Shape], strategy: str) -> float:
    """Full 16-bit weights PPO gathers for generation under ZeRO-3/FSDP."""
    return 2 * sum(s.params for s in shapes) if strategy in ("ZeRO-3", "FSDP") else 0.0


def activations(shape: Shape, batch: int, seq: int, scored: int, lm_head: bool) -> float:
    """Training activations of one micro-batch (16-bit), plus fp32 logits work for ``scored`` tokens."""
    per_layer = 34 * batch * seq * shape.hidden
    if shape.checkpointing:
        acts = 2 * batch * seq * shape.hidden * shape.layers + per_layer
    else:
        acts = per_layer * shape.layers
    return acts + (12 * batch * scored * shape.vocab if lm_head else 0)


def kv_cache(shape: Shape, batch: int, seq: int) -> float:
    return 2 * shape.layers * batch * seq * shape.kv_dim * 2


# ---------------------------------------------------------------- stages


@dataclass
class StagePlan:
    name: str
    type: str
    models: list[str]
    per_gpu: dict[str, float]  # strategy -> bytes
    note: str = ""


def _total(x: float) -> float:
    return x * OVERHEAD_FACTOR + OVERHEAD_BYTES


def plan_stage(stage, ctx, gpus: int, prompt_tokens: int) -> StagePlan:
    cfg = stage.config
    if stage.type == "sft":
        s = model_shape(_with_training(ctx, cfg.model))
        act = activations(s, cfg.train.batch_size, cfg.max_length, cfg.max_length, lm_head=True)
        per = {k: _total(model_state(s, k, gpus) + act) for k in STRATEGIES}
        return StagePlan(stage.name, "sft", [_describe(s)], per,
                         f"micro-batch {cfg.train.batch_size} x {cfg.max_length} tokens")
    if stage.type == "reward":
        s = model_shape(_with_training(ctx, cfg.model), role="classifier")
        act = activations(s, 2 * cfg.train.batch_size, cfg.max_length, 0, lm_head=False)
        per = {k: _total(model_state(s, k, gpus) + act) for k in STRATEGIES}
        return StagePlan(stage.name, "reward", [_describe(s)], per,
                         f"{cfg.train.batch_size} pairs x 2 x {cfg.max_length} tokens")
    if stage.type == "ppo":
        return _plan_ppo(stage, ctx, gpus, prompt_tokens)
    if stage.type == "dpo":
        return _plan_dpo(stage, ctx, gpus)
    if stage.type == "eval":
        return _plan_eval(stage, ctx, prompt_tokens)
    raise BadInput(f"stage {stage.name}: no memory model for stage type {stage.type!r}")


def _with_training(ctx, model):
    """The stage's own ModelConfig (LoRA, dtype, checkpointing) on the shape of the model it loads."""
    from rlhf.models import as_model_config

    own = as_model_config(model)
    src = ctx.loadable(own)
    return dataclasses.replace(src, lora=own.lora, dtype=own.dtype,
                               gradient_checkpointing=own.gradient_checkpointing)


def _reward_shapes(ctx, specs) -> list[Shape]:
    from rlhf.models import ModelConfig
    from rlhf.rewards import is_function

    shapes = []
    for spec in specs:
        if is_function(spec.source):
            continue
        model = dataclasses.replace(ctx.loadable(ModelConfig(name=spec.source, revision=spec.revision)),
                                    lora=None)
        shapes.append(model_shape(model, role="classifier", num_labels=None if spec.label is not None else 1,
                                  trainable=False))
    return shapes


def _value_source(cfg, specs, ctx) -> str | None:
    """The trainer's choice of value model (``rlhf.ppo.policy.value_source``),
    reading checkpoints not written yet from what they start from. A model
    whose tokenizer cannot be read offline (a hub id) is taken to qualify, so
    the plan errs towards the larger model."""
    from rlhf.models import ModelConfig, load_tokenizer
    from rlhf.ppo.policy import value_init_problem, value_source

    @functools.cache
    def policy_tok():
        return load_tokenizer(ctx.loadable(cfg.model), require_eos=False)

    def problem(src: str) -> str | None:
        try:
            return value_init_problem(ctx.loadable(ModelConfig(name=src)).name, policy_tok())
        except (OSError, ValueError, BadInput):
            return None

    return value_source(cfg.value_model, cfg.critic_free, specs, problem)


def _plan_ppo(stage, ctx, gpus: int, prompt_tokens: int) -> StagePlan:
    from rlhf.models import ModelConfig
    from rlhf.rewards import as_specs

    cfg = stage.config
    policy_cfg = _with_training(ctx, cfg.model)
    policy = model_shape(policy_cfg)
    specs = as_specs(cfg.reward)
    rewards = _reward_shapes(ctx, specs)
    seq = prompt_tokens + cfg.generation.max_new_tokens
    value = None
    name = _value_source(cfg, specs, ctx)
    if name is not None:
        source = ModelConfig(name=name)
        value_cfg = dataclasses.replace(ctx.loadable(source), lora=None, dtype=policy_cfg.dtype,
                                        gradient_checkpointing=policy_cfg.gradient_checkpointing)
        value = model_shape(value_cfg, role="classifier")
    reference = None if policy_cfg.lora else dataclasses.replace(policy, trainable=0)
    micro = min(cfg.micro_batch_size, cfg.sequences // cfg.num_minibatches)
    train_act = activations(policy, micro, seq, cfg.generation.max_new_tokens, lm_head=True)
    if value is not None:
        train_act += activations(value, micro, seq, 0, lm_head=False)
    gen = kv_cache(policy, cfg.sequences, seq) + 4 * cfg.sequences * policy.vocab
    per = {}
    for k in STRATEGIES:
        fixed = sum(frozen(r, k, gpus) for r in rewards) + (frozen(reference, k, gpus) if reference else 0)
        state = model_state(policy, k, gpus) + (model_state(value, k, gpus) if value else 0)
        rollout = gen + gathered_for_rollout([policy] + ([value] if value else []), k)
        per[k] = _total(state + fixed + max(rollout, train_act))
    models = [f"policy {_describe(policy)}"]
    models.append("reference: policy with LoRA off (no copy)" if reference is None
                  else f"reference {_describe(reference, frozen_only=True)}")
    models.append("value: none (critic-free)" if cfg.critic_free else "value: head on the policy" if value is None
                  else f"value {_describe(value)}")
    models += [f"reward {_describe(r, frozen_only=True)}" for r in rewards]
    note = (f"rollout {cfg.sequences}/GPU x {seq} tokens (prompt {prompt_tokens} assumed + "
            f"{cfg.generation.max_new_tokens} new); micro-batch {micro}")
    return StagePlan(stage.name, "ppo", models, per, note)


def _plan_dpo(stage, ctx, gpus: int) -> StagePlan:
    """Policy trained on chosen + rejected sequences, plus a frozen reference
    (none with LoRA: the policy with adapters off)."""
    from rlhf.models import as_model_config

    cfg = stage.config
    policy = model_shape(_with_training(ctx, cfg.model))
    reference = None
    if not (as_model_config(cfg.model).lora and cfg.reference is None):
        ref = policy if cfg.reference is None else model_shape(ctx.loadable(as_model_config(cfg.reference)))
        reference = dataclasses.replace(ref, trainable=0)
    act = activations(policy, 2 * cfg.train.batch_size, cfg.max_length, cfg.max_length, lm_head=True)
    per = {k: _total(model_state(policy, k, gpus) + (frozen(reference, k, gpus) if reference else 0) + act)
           for k in STRATEGIES}
    models = [f"policy {_describe(policy)}", "reference: policy with LoRA off (no copy)" if reference is None
              else f"reference {_describe(reference, frozen_only=True)}"]
    return StagePlan(stage.name, "dpo", models, per, f"{cfg.train.batch_size} pairs x 2 x {cfg.max_length} tokens")


def _plan_eval(stage, ctx, prompt_tokens: int) -> StagePlan:
    from rlhf.rewards import RewardSpec, as_specs

    cfg = stage.config
    seq = prompt_tokens + cfg.generation.max_new_tokens
    policies = [model_shape(dataclasses.replace(ctx.loadable(m), lora=None), trainable=False)
                for m in cfg.checkpoints.values()]
    biggest = max(policies, key=lambda s: s.params)
    specs = [s for spec in cfg.rewards.values() for s in as_specs(spec)]
    if cfg.gold:
        specs.append(RewardSpec(source=cfg.gold))
    rewards = _reward_shapes(ctx, specs)
    reference = frozen(biggest) if cfg.reference is not None else 0  # same family as the policies
    total = frozen(biggest) + reference + sum(frozen(r) for r in rewards) + kv_cache(
        biggest, cfg.generation.batch_size, seq)
    per = {k: _total(total) for k in STRATEGIES}  # one process evaluates; sharding does not apply
    return StagePlan(stage.name, "eval", [f"largest policy {_describe(biggest, frozen_only=True)}"]
                     + [f"reward {_describe(r, frozen_only=True)}" for r in rewards], per,
                     f"main process only; generation batch {cfg.generation.batch_size} x {seq} tokens")


def _describe(s: Shape, frozen_only: bool = False) -> str:
    size = _count(s.params)
    if frozen_only or s.trainable == 0:
        return f"{s.name} {size} frozen"
    if s.trainable < s.params:
        return f"{s.name} {size} + LoRA {_count(s.trainable)} trained"
    return f"{s.name} {size} trained"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def plan(recipe, gpus: int, prompt_tokens: int = 512) -> list[StagePlan]:
    from rlhf.recipe import stage_context

    if gpus < 1:
        raise BadInput(f"--gpus: expected >= 1, got {gpus}")
    return [plan_stage(stage, stage_context(recipe, stage), gpus, prompt_tokens) for stage in recipe.stages]


def render(plans: list[StagePlan], gpus: int, gpu_memory: float) -> str:
    """The table ``rlhf plan`` prints, and which launch configs fit ``gpu_memory`` GiB."""
    lines = [f"Estimated peak memory per GPU (GiB) on {gpus} GPU(s) of {gpu_memory:g} GiB "
             f"(x = does not fit):", ""]
    head = f"{'stage':<18}" + "".join(f"{k:>10}" for k in STRATEGIES)
    lines += [head, "-" * len(head)]
    for p in plans:
        cells = "".join(f"{p.per_gpu[k] / GIB:>9.1f}{' ' if p.per_gpu[k] / GIB <= gpu_memory else 'x'}"
                        for k in STRATEGIES)
        lines.append(f"{p.name + ' (' + p.type + ')':<18}" + cells)
    lines.append("")
    for p in plans:
        lines.append(f"{p.name}: " + "; ".join(p.models) + f" [{p.note}]")
    lines.append("")
    fits = [k for k in STRATEGIES if all(p.per_gpu[k] / GIB <= gpu_memory for p in plans)]
    for k in STRATEGIES:
        worst = max(plans, key=lambda p: p.per_gpu[k])
        verdict = "fits" if k in fits else f"does not fit ({worst.name}: {worst.per_gpu[k] / GIB:.1f} GiB)"
        lines.append(f"  {k:<7} {verdict:<40} accelerate launch --config_file {CONFIG_FILES[k]}")
    lines.append("")
    if fits:
        lines.append(f"Pick {fits[0]}: the first that fits, in the table's order (least sharding, least "
                     f"communication first).")
    else:
        lines.append("Nothing fits: use LoRA (`model.lora`), gradient checkpointing, smaller micro-batches, "
                     "or more / larger GPUs.")
    lines.append("Estimates (formulas: rlhf/plan.py); keep ~15% headroom. Single-process stages (eval) do not shard.")
    return "\n".join(lines)


def fits(plans: list[StagePlan], gpu_memory: float) -> list[str]:
    return [k for k in STRATEGIES if all(p.per_gpu[k] / GIB <= gpu_memory for p in plans)]


# ---------------------------------------------------------------- CLI

EPILOG = """\
examples:
  rlhf plan recipes/tldr-1b.yaml --gpus 8 --gpu-memory 80
  rlhf plan recipes/smollm2-hh.yaml --gpus 1 --gpu-memory 24 stages.ppo.rollout_batch_size=32
  rlhf plan recipes/gpt2-imdb.yaml --gpus 16 --gpu-memory 40 --prompt-tokens 64   # 2 nodes x 8

Formulas and assumptions: the docstring of rlhf/plan.py.
"""


def add_parser(sub) -> None:
    import argparse

    p = sub.add_parser("plan", help="estimate per-GPU memory of each stage under DDP, ZeRO-2, ZeRO-3 and FSDP",
                       description="Estimate the peak memory per GPU of every stage of a recipe for its models "
                                   "(parameter counts from configs, no weights loaded; LoRA counted), under each "
                                   "accelerate launch config, and say which fit.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="override recipe values")
    p.add_argument("--gpus", type=int, default=8, help="GPUs in total, over all nodes (default 8)")
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GIB", help="memory per GPU in GiB (default 80)")
    p.add_argument("--prompt-tokens", type=int, default=512,
                   help="prompt length assumed for PPO rollouts and eval generation (default 512)")


def run(args) -> int:
    from rlhf import recipe as recipe_mod

    if args.gpu_memory <= 0:
        raise BadInput(f"--gpu-memory: expected > 0 GiB, got {args.gpu_memory:g}")
    if args.prompt_tokens < 1:
        raise BadInput(f"--prompt-tokens: expected >= 1, got {args.prompt_tokens}")
    recipe = recipe_mod.load_recipe(args.recipe, args.overrides)
    print(render(plan(recipe, args.gpus, args.prompt_tokens), args.gpus, args.gpu_memory))
    return 0
