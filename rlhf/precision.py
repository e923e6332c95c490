"""Which arithmetic a stage runs in: what ``precision: auto`` resolves to, and
the kernels a bf16 run trains with (attention on a CPU, the tanh-GELU).

bf16 autocast on a CPU is only a win where the CPU has bf16 dot-product
instructions (x86 AVX512-BF16 or AMX-BF16): oneDNN then runs bf16 matmuls at
about twice the fp32 rate (``benchmarks/classic_ppo.py``: 1.05x -> 1.91x over
classic TRL PPO on an AVX512-BF16 CPU from bf16 alone, 2.27x with the two
kernels below). Without them bf16 is emulated and slower than fp32, so
``auto`` stays fp32 there.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from collections.abc import Iterator
from pathlib import Path

import torch

# Up to this many tokens per sequence, training under CPU bf16 autocast uses
# the math SDPA kernel: torch's fused CPU flash-attention backward is 2-3x
# slower than the math path in bf16 at short lengths (torch 2.13, one thread,
# 4 heads x 64, fwd + bwd: 8.8 vs 3.2 ms at 48 tokens, 9.5 vs 6.4 ms at 128,
# even at 192; flash wins from ~256). In fp32, and for forward-only passes,
# the two are within noise, so only bf16 runs switch.
MATH_ATTENTION_MAX_TOKENS = 128


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (Linux x86: the
    ``avx512_bf16`` or ``amx_bf16`` flag in /proc/cpuinfo). Other platforms
    report False: bf16 there is unmeasured, and fp32 is the safe default."""
    cpuinfo = Path("/proc/cpuinfo")
    if platform.system() != "Linux" or not cpuinfo.is_file():
        return False
    return has_bf16_flag(cpuinfo.read_text(errors="replace"))


def has_bf16_flag(cpuinfo: str) -> bool:
    """Whether the first ``flags`` line of /proc/cpuinfo text names a bf16
    dot-product instruction set (every core lists the same flags)."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return bool(set(line.split(":", 1)[-1].split()) & {"avx512_bf16", "amx_bf16"})
    return False


def precision_flags(precision: str, cpu_bf16: bool = False) -> dict[str, bool]:
    """``{"bf16": ..., "fp16": ...}`` for a stage's ``precision`` key.

    ``auto``: bf16 on a GPU that supports it; on a CPU, bf16 only when
    ``cpu_bf16`` (the stage opts in: PPO, RLOO and GRPO do) and the CPU has
    bf16 instructions (``cpu_has_bf16``); fp32 otherwise.
    """
    if precision == "auto":
        if torch.cuda.is_available():
            return {"bf16": torch.cuda.is_bf16_supported(), "fp16": False}
        return {"bf16": cpu_bf16 and cpu_has_bf16(), "fp16": False}
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


@contextlib.contextmanager
def training_attention(device: torch.device, bf16: bool, tokens: int) -> Iterator[None]:
    """The attention kernel for forward + backward passes over sequences of
    ``tokens`` tokens: the math SDPA kernel under CPU bf16 at short lengths
    (``MATH_ATTENTION_MAX_TOKENS``), torch's own choice otherwise."""
    if device.type != "cpu" or not bf16 or tokens > MATH_ATTENTION_MAX_TOKENS:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


def fuse_tanh_gelu(*models: torch.nn.Module) -> int:
    """For bf16 runs: swap GPT-2-style Python tanh-GELU modules
    (transformers' ``NewGELUActivation``: eight elementwise passes, each a
    bf16 round trip through memory on a CPU) for torch's fused kernel of the
    same function (``GELUTanh``, which transformers documents as equivalent
    up to rounding). fp32 runs keep the model's own module, so their numbers
    stay those of the model's reference implementation. Returns how many
    modules were swapped."""
    from transformers.activations import GELUTanh, NewGELUActivation

    swapped = 0
    for model in models:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is NewGELUActivation:
                    setattr(parent, name, GELUTanh())
                    swapped += 1
    return swapped
