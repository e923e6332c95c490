"""How many CPU threads torch uses in this process, chosen on purpose.

PyTorch's default, one intra-op thread per core, spins against itself and
against every other process on a shared machine (10-20x slower on 2 busy
cores). Every entry point that loads models calls ``apply_threads``.
"""

from __future__ import annotations

import os


def choose_threads(requested: int | None, on_gpu: bool = False) -> tuple[int, str]:
    """(torch CPU threads for this process, why). PyTorch's default, one thread
    per core, spins against itself and everything else on a shared machine
    (10-20x slower on 2 busy cores), so pick a number on purpose."""
    if requested is not None:
        return requested, "set by the recipe's threads or --threads"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n >= 1:
            return n, "auto: OMP_NUM_THREADS is set"
    try:
        cpus, what = len(os.sched_getaffinity(0)), "CPUs this process may use"
    except (AttributeError, OSError):
        cpus, what = os.cpu_count() or 1, "CPUs"
    try:
        ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        ranks = 1
    n = max(1, cpus // ranks)
    why = f"auto: {cpus} {what}" + (f" / {ranks} local ranks" if ranks > 1 else "")
    if on_gpu and n > 4:
        n, why = 4, why + ", at most 4 beside a GPU"
    return n, why


def apply_threads(requested: int | None, on_gpu: bool = False) -> tuple[int, str]:
    """Set torch's thread count (see ``choose_threads``); returns (it, why)."""
    import torch

    n, why = choose_threads(requested, on_gpu)
    torch.set_num_threads(n)
    try:  # allowed once per process, before any inter-op work; later calls raise
        torch.set_num_interop_threads(n)
    except RuntimeError:
        pass
    return n, why
