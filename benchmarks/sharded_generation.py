#!/usr/bin/env python
"""Rollout generation with sharded weights (FSDP2): gathered once vs per token.

    .venv/bin/python benchmarks/sharded_generation.py [--preset mini-30m] [--batch 16] [--new-tokens 32]

Starts two CPU processes (torchrun, gloo) with Accelerate switched to FSDP2
(tests/fsdp_cpu.py; Accelerate itself only enables FSDP on GPUs). Each rank
holds half of every weight of a policy sharded per transformer block, as PPO's
is, and samples the same rollout batch three ways, in alternation, 3 times:

- ``per_token``: plain FSDP2, the model's own ``generate``: every forward
  (one per new token) all-gathers each block's weights;
- ``full_weights``: PPO's way (``rlhf.sharding.full_weights``): gather once,
  generate locally, drop the gathered copy;
- ``unsharded``: the same model unsharded on each rank (the floor).

Printed: median seconds per rollout and FSDP all-gather calls per rollout for
each, and the ratio per_token / full_weights, all measured in this run. On
GPUs with NVLink the gap is smaller than over gloo on a CPU; what does not
change is the count: one all-gather per unit per rollout instead of one per
unit per token, and no collective for ranks that finish early to wait in.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import fsdp_cpu  # noqa: F401  (Accelerate -> FSDP2 on CPU)
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator

    from rlhf.models import as_model_config, load_causal_lm, load_tokenizer
    from rlhf.sharding import full_weights, prepare_frozen

    torch.set_num_threads(args.threads)
    accelerator = Accelerator(cpu=True)
    cfg = as_model_config(args.preset)
    tok = load_tokenizer(cfg)
    plain = load_causal_lm(cfg, tok, seed=0).eval()
    sharded = prepare_frozen(load_causal_lm(cfg, tok, seed=0), accelerator)
    counter = {"n": 0}
    real = dist.all_gather_single

    def counting(*a, **k):
        counter["n"] += 1
        return real(*a, **k)

    dist.all_gather_single = counting
    torch.manual_seed(accelerator.process_index)
    ids = torch.randint(10, 200, (args.batch, 16))
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                  min_new_tokens=args.new_tokens, do_sample=True, pad_token_id=tok.pad_token_id)
    ways = {"per_token": (sharded, contextlib.nullcontext),
            "full_weights": (sharded, lambda: full_weights(sharded, accelerator)),
            "unsharded": (plain, contextlib.nullcontext)}
    times = {k: [] for k in ways}
    gathers = {}
    with torch.no_grad():
        sharded.generate(**{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # lazy init, warm-up
        for _ in range(args.repeats):
            for name, (model, context) in ways.items():
                dist.barrier()
                counter["n"] = 0
                t0 = time.perf_counter()
                with context():
                    model.generate(**kwargs)
                times[name].append(time.perf_counter() - t0)
                gathers[name] = counter["n"]
    if accelerator.is_main_process:
        result = {"preset": args.preset, "params": sum(p.numel() for p in plain.parameters()),
                  "batch_per_rank": args.batch, "new_tokens": args.new_tokens, "world": accelerator.num_processes,
                  "threads": torch.get_num_threads(),
                  **{f"{k}_s": statistics.median(v) for k, v in times.items()},
                  **{f"{k}_all_gathers": gathers[k] for k in ways}}
        Path(args.out).write_text(json.dumps(result))
    accelerator.wait_for_everyone()
    accelerator.state.destroy_process_group()  # an exit with gloo threads running can abort


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mini-30m")
    p.add_argument("--batch", type=int, default=16, help="prompts per rank")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads per rank (default 1: 2 ranks on a shared machine spin otherwise)")
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        if args.threads < 1:
            p.error(f"--threads {args.threads}: expected a positive integer")
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
        with socket.socket() as s:  # a free port for the rendezvous, not a fixed one another job may hold
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               __file__, "--worker", "--out", str(out), "--preset", args.preset, "--batch", str(args.batch),
               "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--threads", str(args.threads)]
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        r = json.loads(out.read_text())
    print(f"Sharded generation benchmark: {r['preset']} ({r['params'] / 1e6:.1f}M params), FSDP2 over "
          f"{r['world']} CPU processes (gloo), {r['batch_per_rank']} prompts x {r['new_tokens']} new tokens per rank, "
          f"{r['threads']} torch thread(s) per rank")
    print(f"{'way':<14}{'s/rollout':>11}{'all-gathers':>13}")
    for name in ("per_token", "full_weights", "unsharded"):
        print(f"{name:<14}{r[name + '_s']:>11.3f}{r[name + '_all_gathers']:>13}")
    print(f"RATIO per_token / full_weights: {r['per_token_s'] / r['full_weights_s']:.2f}x time, "
          f"{r['per_token_all_gathers'] / max(r['full_weights_all_gathers'], 1):.0f}x all-gathers")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
