#!/usr/bin/env python
"""RLOO and GRPO throughput: our trainer vs TRL's RLOOTrainer and GRPOTrainer.

    .venv/bin/python benchmarks/critic_free_throughput.py              # tiny, 2 rounds, ~6 min on 2 cores
    .venv/bin/python benchmarks/critic_free_throughput.py --models tiny mini-30m --rounds 3

Same work on both sides, on random-initialised presets (nothing downloaded;
checkpoints made as in ``ppo_throughput.py``): 16 prompts x 4 samples = 64
sequences per rollout, at most 32 new tokens at temperature 1, the same
reward-model checkpoint, full fine-tuning with a frozen reference copy,
beta 0.05, 4 passes (TRL: ``num_iterations``) x 2 minibatches of 32 = 8
optimiser steps per rollout, fp32, one intra-op thread per process.
RLOO: the KL in the reward (both); GRPO: the k3 KL in the loss, token-mean
aggregation (ours ``loss_aggregation: token_mean``, TRL ``loss_type: bnpo``;
TRL's default ``dapo`` normalises by the same token count).

``--defaults`` adds TRL at its own defaults (bf16 autocast, gradient
checkpointing, one optimiser step per rollout: ``num_iterations=1``,
``steps_per_generation=1``) on the same 64 sequences, beside ours doing the
same single step per rollout with ``precision: bf16`` (``ppo_epochs: 1``,
``num_minibatches: 1``): the same work as each other, not as the rows above.

Every configuration is its own process; rounds are interleaved (ours, TRL,
ours, TRL, ...) so a change in machine load hits both. Per configuration: the
median step time over the measured steps (the first step is warm-up), split
into rollout (generation, forwards, scoring) and update; samples/s = 64 /
step time. The ratio ours / TRL is taken per round and its median printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from ppo_throughput import (PROMPTS, _env, _import_stack, _loadavg, _make_checkpoints, _median, _peak_rss_mb,
                            _version, _write_recipe)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS_PER_STEP, K, NEW_TOKENS, EPOCHS, MINIBATCHES, BETA = 16, 4, 32, 4, 2, 0.05
SEQS = PROMPTS_PER_STEP * K


def worker_ours(spec: dict) -> dict:
    """Our trainer through the recipe runner, unmodified; step times from its metrics.jsonl."""
    import torch

    base_rss = _import_stack()
    from rlhf import recipe as recipe_mod
    from rlhf.tracking import read_metrics

    torch.set_num_threads(1)
    work = Path(spec["work_dir"])
    grpo = spec["algo"] == "grpo"
    epochs, minibatches = (1, 1) if spec.get("defaults") else (EPOCHS, MINIBATCHES)
    stage = {"type": "ppo", "model": spec["policy"], "reward": spec["reward"], "advantage": spec["algo"],
             "samples_per_prompt": K, "rollout_batch_size": PROMPTS_PER_STEP, "num_minibatches": minibatches,
             "micro_batch_size": SEQS // minibatches, "forward_batch_size": SEQS, "ppo_epochs": epochs,
             "precision": "bf16" if spec.get("defaults") else "fp32",
             "learning_rate": 1e-5, "sample_every": 10_000, "data": {"path": str(PROMPTS)},
             "steps": 1 + spec["steps"], "kl": {"coef": BETA, "placement": "loss" if grpo else "reward"},
             "missing_eos_penalty": None, "generation": {"max_new_tokens": NEW_TOKENS, "temperature": 1.0}}
    path = _write_recipe(work / "recipe.yaml", work / "run", {"rl": stage})
    recipe_mod.run(recipe_mod.load_recipe(path))
    rows = [r for r in read_metrics(work / "run" / "rl" / "metrics.jsonl") if "perf/step_s" in r][1:]
    step = _median([r["perf/step_s"] for r in rows])
    rollout = _median([r["perf/generation_s"] + r["perf/forward_s"] + r["perf/scoring_s"] for r in rows])
    return {"step_s": step, "samples_per_s": SEQS / step, "rollout_s": rollout,
            "generation_s": _median([r["perf/generation_s"] for r in rows]), "update_s": step - rollout,
            "response_length": _median([r["rollout/response_length"] for r in rows]),
            "base_rss_mb": base_rss, "peak_rss_mb": _peak_rss_mb()}


def worker_trl(spec: dict) -> dict:
    """TRL's RLOOTrainer or GRPOTrainer at the same shape; a callback stamps
    the end of each rollout's 8 optimiser steps."""
    import torch

    base_rss = _import_stack()
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from rlhf.data import normalize_prompts, read_records, render_prompt
    from rlhf.models import ModelConfig, load_tokenizer

    torch.set_num_threads(1)
    tok = load_tokenizer(ModelConfig(name=spec["policy"]))
    tok.padding_side = "left"
    prompts = [render_prompt(tok, p) for p in normalize_prompts(read_records(str(PROMPTS), "train", {}))]
    defaults = bool(spec.get("defaults"))
    epochs, minibatches = (1, 1) if defaults else (EPOCHS, MINIBATCHES)
    per_rollout = epochs * minibatches
    grpo = spec["algo"] == "grpo"
    # defaults: TRL's own bf16 (autocast) and gradient checkpointing, one optimiser step per rollout.
    common = dict(output_dir=str(Path(spec["work_dir"]) / "trl"), use_cpu=True, bf16=defaults, fp16=False,
                  gradient_checkpointing=defaults, per_device_train_batch_size=SEQS // minibatches,
                  steps_per_generation=minibatches, num_iterations=epochs, num_generations=K,
                  max_completion_length=NEW_TOKENS, temperature=1.0, top_k=0, top_p=1.0, beta=BETA,
                  learning_rate=1e-5, max_steps=(1 + spec["steps"]) * per_rollout, logging_steps=per_rollout,
                  save_strategy="no", report_to="none", disable_tqdm=True, disable_dropout=True, seed=0,
                  dataloader_num_workers=0)
    args = GRPOConfig(**common, loss_type="bnpo") if grpo else RLOOConfig(**common)
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step % per_rollout == 0:
                stamps.append(time.perf_counter())

    cls = GRPOTrainer if grpo else RLOOTrainer
    trainer = cls(model=AutoModelForCausalLM.from_pretrained(spec["policy"]), reward_funcs=spec["reward"],
                  args=args, train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok,
                  reward_processing_classes=load_tokenizer(ModelConfig(name=spec["reward"])), callbacks=[Stamp()])
    rollout_s: list[float] = []
    real = trainer._generate_and_score_completions

    def timed(inputs):
        t0 = time.perf_counter()
        out = real(inputs)
        rollout_s.append(time.perf_counter() - t0)
        return out

    trainer._generate_and_score_completions = timed
    trainer.train()
    walls = [b - a for a, b in zip(stamps, stamps[1:])]  # rollouts 2.. (the first is warm-up)
    lengths = [x["completions/mean_length"] for x in trainer.state.log_history if "completions/mean_length" in x]
    step, rollout = _median(walls), _median(rollout_s[1:])
    return {"step_s": step, "samples_per_s": SEQS / step, "rollout_s": rollout, "update_s": step - rollout,
            "response_length": _median(lengths[1:] or lengths), "base_rss_mb": base_rss,
            "peak_rss_mb": _peak_rss_mb()}


WORKERS = {"ours": worker_ours, "trl": worker_trl}


def ratio_line(label: str, ours: list[dict], theirs: list[dict]) -> list[str]:
    """``label: N.NNx samples/s`` as the median of the per-round ratios (rounds where both ran), or nothing."""
    ratios = [a["samples_per_s"] / b["samples_per_s"] for a, b in zip(ours, theirs)
              if "error" not in a and "error" not in b]
    if not ratios:
        return []
    return [f"{label}: {_median(ratios):.2f}x samples/s (median of {len(ratios)} interleaved rounds: "
            f"{', '.join(f'{r:.2f}' for r in ratios)})"]


def step_table(results: dict[str, list[dict]], width: int = 22) -> list[str]:
    """A header and one line per configuration: the medians over its rounds (also used by classic_ppo.py)."""
    lines = [f"{'configuration':{width}}{'samples/s':>10}{'step s':>8}{'rollout s':>10}{'update s':>9}"
             f"{'resp len':>9}{'peak MB':>9}"]
    for name, runs in results.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            lines.append(f"{name:{width}} failed: {runs[-1]['error'].splitlines()[-1]}")
            continue
        med = {k: _median([r[k] for r in ok]) for k in ("samples_per_s", "step_s", "rollout_s", "update_s",
                                                           "response_length", "peak_rss_mb")}
        lines.append(f"{name:{width}}{med['samples_per_s']:>10.2f}{med['step_s']:>8.3f}{med['rollout_s']:>10.3f}"
                     f"{med['update_s']:>9.3f}{med['response_length']:>9.1f}{med['peak_rss_mb']:>9.0f}")
    return lines


def _run(kind: str, spec: dict, timeout: float = 900) -> dict:
    import subprocess

    proc = subprocess.run([sys.executable, __file__, "--worker", kind, json.dumps(spec)], env=_env(1),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-12:])}
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="measured steps per process (after one warm-up step)")
    ap.add_argument("--defaults", action="store_true", help="also TRL at its defaults vs ours at one step, bf16")
    ap.add_argument("--defaults-only", action="store_true", help="only those rows (implies --defaults)")
    ap.add_argument("--algos", nargs="+", default=["rloo", "grpo"], choices=["rloo", "grpo"])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "critic_free_throughput.json")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(WORKERS[args.worker[0]](json.loads(args.worker[1]))), flush=True)
        return 0
    args.defaults = args.defaults or args.defaults_only
    t0, load_start = time.time(), _loadavg()
    tmp = Path(tempfile.mkdtemp(prefix="critic_free_bench_"))
    ckpts = _make_checkpoints(tmp / "ckpt", args.models, 1)
    results: dict[str, list[dict]] = {}
    for rnd in range(args.rounds):
        for model in args.models:
            for algo in args.algos:
                for side, defaults in ([] if args.defaults_only else [("ours", False), ("trl", False)]) + \
                        ([("ours", True), ("trl", True)] if args.defaults else []):
                    name = f"{side}-{algo}{'-defaults' if defaults else ''}/{model}"
                    work = tmp / f"{name.replace('/', '_')}-{rnd}"
                    work.mkdir(parents=True)
                    print(f"[{time.time() - t0:5.0f}s] round {rnd + 1}: {name}", file=sys.stderr, flush=True)
                    spec = {"algo": algo, "steps": args.steps, "work_dir": str(work), "defaults": defaults,
                            **ckpts[model]}
                    results.setdefault(name, []).append(_run(side, spec))
    lines = ["-defaults rows: ours one optimiser step per rollout in bf16, TRL at its defaults (bf16, gradient "
             "checkpointing, one step)"] if args.defaults else []
    lines += [f"{SEQS} sequences per rollout ({PROMPTS_PER_STEP} prompts x {K}), <= {NEW_TOKENS} new tokens, "
             f"{EPOCHS} x {MINIBATCHES} optimiser steps; torch {_version('torch').split('+')[0]}, trl {_version('trl')}; "
             f"load {load_start} -> {_loadavg()}",
             *step_table(results)]
    for model in args.models:
        for algo in (*args.algos, *((f"{a}-defaults" for a in args.algos) if args.defaults else ())):
            ours, trl = results.get(f"ours-{algo}/{model}", []), results.get(f"trl-{algo}/{model}", [])
            lines += ratio_line(f"ours / TRL, {algo} on {model}", ours, trl)
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "table": table, "total_s": time.time() - t0}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
