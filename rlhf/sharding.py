"""Sharded models (FSDP2, DeepSpeed ZeRO-3) in a loop that generates text.

Under FSDP or ZeRO-3 each rank holds a slice of every weight, and each forward
pass all-gathers the weights of the layer it runs. That is right for training,
but ``generate`` runs one forward per new token: gathering every layer for
every token makes rollouts communication-bound, and ranks whose responses end
early stop calling forward while the others wait in a collective (a hang).

So PPO gathers the policy's weights once per rollout (``full_weights``),
generates and runs its no-grad forwards locally, then drops the gathered
copy. Frozen models (reference, reward model) are sharded the same way as the
policy (``prepare_frozen``); their forwards stay collective, so every rank
must call them the same number of times (equal batch counts, see ``pad_shard``).

Without sharding (one process, DDP, ZeRO-1/2) every helper here is a no-op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from rlhf.errors import BadInput


def _kind(accelerator) -> str:
    """``"fsdp1"``, ``"fsdp2"``, ``"zero3"`` or ``"none"`` (weights replicated on every rank)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp2" if accelerator.is_fsdp2 else "fsdp1"
    if accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3:
        return "zero3"
    return "none"


def sharding(accelerator) -> str:
    """``"fsdp2"``, ``"zero3"`` or ``"none"``; BadInput for FSDP1, which PPO cannot use."""
    kind = _kind(accelerator)
    if kind == "fsdp1":
        raise BadInput("accelerate config: PPO needs FSDP version 2 (fsdp_config.fsdp_version: 2, as in "
                       "recipes/accelerate/fsdp.yaml); FSDP1 cannot run a forward pass on gathered weights")
    return kind


def is_sharded(accelerator) -> bool:
    """Whether ranks hold slices of the weights (any FSDP version, ZeRO-3)."""
    return _kind(accelerator) != "none"


def save_full(accelerator, model: torch.nn.Module, tok, out, fresh: Callable[[], torch.nn.Module],
              prefix: str = "", extra: dict[str, dict] | None = None) -> None:
    """Save ``model`` (or its submodule under ``prefix``) as a plain HF
    checkpoint in ``out``. Every rank must call it.

    Replicated weights: the main process saves the live model. Sharded: every
    rank joins Accelerate's gather of the full state dict; the main process
    loads it into ``fresh()`` (a new unsharded model of the same architecture,
    LoRA included) and saves that, since the live model's tensors are shards.
    """
    from rlhf.models import save_checkpoint

    if not is_sharded(accelerator):
        if accelerator.is_main_process:
            live = accelerator.unwrap_model(model)
            save_checkpoint(live.get_submodule(prefix.rstrip(".")) if prefix else live, tok, out, extra)
        return
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        if _kind(accelerator) == "zero3":
            # With zero3_init_flag (recipes/accelerate/deepspeed_zero3.yaml)
            # transformers builds every new model inside deepspeed.zero.Init,
            # whose partitioning is collective: fresh() on the main process
            # alone would hang. Build it whole, then restore the flag.
            from transformers.integrations import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            try:
                copy = fresh()
            finally:
                accelerator.state.deepspeed_plugin.set_deepspeed_weakref()
        else:
            copy = fresh()
        copy.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        save_checkpoint(copy, tok, out, extra)


def prepare_frozen(model: torch.nn.Module, accelerator) -> torch.nn.Module:
    """A frozen model (reference, reward) on the device, sharded like the policy.

    FSDP2: Accelerate's own per-block wrapping (``fsdp2_prepare_model``); it is
    called directly because ``Accelerator.prepare`` insists on an optimizer
    under FSDP2. ZeRO-3: an inference engine from TRL's ``prepare_deepspeed``.
    """
    model.requires_grad_(False)
    kind = sharding(accelerator)
    if kind == "fsdp2":
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        with _own_block_classes(model, accelerator.state.fsdp_plugin):
            model = fsdp2_prepare_model(accelerator, model)
    elif kind == "zero3":
        from trl.models.utils import prepare_deepspeed

        model = prepare_deepspeed(model, accelerator)
    else:
        model = model.to(accelerator.device)
    model.eval()  # not `return model.eval()`: DeepSpeedEngine.eval() returns None
    return model


@contextlib.contextmanager
def _own_block_classes(model: torch.nn.Module, plugin) -> Iterator[None]:
    """Wrap ``model`` per its own transformer blocks. Accelerate fixes the
    plugin's block classes from the first model it prepares (the policy's,
    e.g. GPT2Block) and then refuses a model without them: a reward model of
    another architecture (a BERT encoder) or a value model of another family."""
    names = plugin.transformer_cls_names_to_wrap
    present = {type(m).__name__ for m in model.modules()}
    if names is None or all(n in present for n in names):
        yield
        return
    plugin.transformer_cls_names_to_wrap = [n for n in getattr(model, "_no_split_modules", None) or []
                                            if n in present]
    try:
        yield
    finally:
        plugin.transformer_cls_names_to_wrap = names


@contextlib.contextmanager
def full_weights(model: torch.nn.Module, accelerator) -> Iterator[bool]:
    """Gather ``model``'s sharded weights once; inside, forward passes (and
    ``generate``) of it and its submodules are local: no collectives.

    Yields True when the weights are local inside the context; False when they
    could not be gathered (a ZeRO-3 inference engine, which has no hook
    handle to pause): then generate with ``synced_gpus=True``.

    FSDP2: every FSDP unit is unsharded and told not to reshard after its
    forward; on exit the gathered copy is freed. ZeRO-3 (a training engine):
    TRL's recipe, ``GatheredParameters`` with the engine's hooks removed.
    Peak memory inside is one full copy of the model per rank.
    """
    kind = sharding(accelerator)
    if kind == "fsdp2":
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        if units and units[0] is model:
            # FSDP2 finds its root on the first forward, which must go through
            # the root; our first call may be a submodule's (policy.generate).
            # No public API does this step alone (torch 2.13).
            model._get_fsdp_state()._lazy_init()
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            yield True
        finally:
            reshard = bool(accelerator.state.fsdp_plugin.reshard_after_forward)
            for unit in units:
                unit.reshard()
                # Back to what fully_shard set: the plugin's value, except on
                # the root, which FSDP2 keeps gathered after forward (its
                # weights are needed again at once for the backward).
                unit.set_reshard_after_forward(reshard and unit is not model, recurse=False)
    elif kind == "zero3" and getattr(model, "optimizer", None) is not None:
        import deepspeed
        from trl.models.utils import add_hooks, remove_hooks

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            remove_hooks(model)
            try:
                yield True
            finally:
                add_hooks(model)
    else:
        yield kind == "none"


@contextlib.contextmanager
def unpartitioned(model: torch.nn.Module) -> Iterator[None]:
    """Forward passes of a model that is not yet prepared but was built inside
    ZeRO-3's ``deepspeed.zero.Init`` (transformers does that whenever a ZeRO-3
    config with ``zero3_init_flag`` is active): its weights are empty
    partitions until gathered. Every rank must enter. A no-op otherwise."""
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned):
        yield


def pad_shard(items: list, rank: int, world: int) -> tuple[list, int]:
    """Rank ``rank``'s share of ``items`` (every world-th item), padded by
    repeating an item to ceil(n / world) items, so every rank runs the same
    number of batches through sharded models. Returns (share, number of real
    items at its start)."""
    size = -(-len(items) // world)
    share = items[rank::world]
    real = len(share)
    return share + [share[-1] if share else items[0]] * (size - real), real
