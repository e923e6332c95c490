#!/usr/bin/env python
"""Our PPO against classic TRL PPO (``trl==0.11.4``'s ``PPOTrainer``) at equal settings.

    .venv/bin/python benchmarks/classic_ppo.py --trl011-python /path/to/venv/bin/python

TRL removed its PPO trainer in 1.x, so the classic one needs its own
environment (``trl==0.11.4``, ``transformers==4.46.3``, ``accelerate==1.1.1``,
``datasets==3.1.0``; any torch). Without ``--trl011-python`` (or when that
interpreter cannot import it) the TRL rows are skipped and only ours is
measured. docs/benchmarks.md gives the commands that built the environment
used for the published figures.

The workload (the shape the throughput issue measured): a random 4-layer,
256-wide GPT-2 with the tiny preset's tokenizer, saved once and loaded by
both sides; 64 prompts of exactly 16 tokens per step; 32 new tokens sampled
at temperature 1 (top-k 0, top-p 1); a Python reward (the number of letters
"e" in the response); 4 PPO epochs x 4 minibatches of 16 (16 optimiser steps
per rollout); learning rate 1e-5, fixed KL coefficient 0.05, clip 0.2,
gamma 1, lambda 0.95; one intra-op thread per process.
Classic TRL puts a value head on the policy and keeps a frozen reference
copy; so does ours with its default value model when the only reward is a
function. Classic TRL runs in fp32 (its default); row "ours" is our default
``precision: auto`` (bf16 autocast on a CPU with bf16 instructions or a GPU,
fp32 elsewhere: the table says which it was), row "ours, fp32" pins fp32 for
the comparison at equal arithmetic.

Where the time goes differs between the two: classic TRL's "rollout" column
is generation and scoring only (its policy, value and reference forwards run
inside ``PPOTrainer.step``, in its "update"); ours counts those forwards in
the rollout. Compare the step times.

Each configuration runs in its own subprocess (peak RSS per configuration);
the rounds interleave the configurations, the first step of each process is
warm-up, and the ratio ours / TRL is taken per round (median printed).
Results: stdout and ``benchmarks/results/classic_ppo.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from critic_free_throughput import ratio_line, step_table
from ppo_throughput import SFT_DATA, _env, _loadavg, _median, _peak_rss_mb, _version, _write_recipe

ROOT = Path(__file__).resolve().parents[1]
BATCH, PROMPT_TOKENS, NEW_TOKENS, EPOCHS, MINIBATCHES, LR, BETA = 64, 16, 32, 4, 4, 1e-5, 0.05
SHAPE = dict(n_layer=4, n_embd=256, n_head=4, n_positions=256)


def count_e(prompts, responses):
    """The Python reward both sides score with."""
    return [float(r.count("e")) for r in responses]


def prepare(root: Path) -> dict:
    """The policy checkpoint and prompts of exactly PROMPT_TOKENS tokens that
    re-tokenize to the same ids (so both sides see identical inputs)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf.data import normalize_sft, read_records
    from rlhf.models import ModelConfig, load_tokenizer

    tok = load_tokenizer(ModelConfig("tiny"))
    import torch

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, **SHAPE)
    policy = root / "policy"
    GPT2LMHeadModel(config).save_pretrained(policy)
    tok.save_pretrained(policy)
    texts = []
    for row in normalize_sft(read_records(str(SFT_DATA), "train", {})):
        ids = tok(row["prompt"] + row["completion"], add_special_tokens=False)["input_ids"]
        if len(ids) < PROMPT_TOKENS:
            continue
        text = tok.decode(ids[:PROMPT_TOKENS])
        if tok(text, add_special_tokens=False)["input_ids"] == ids[:PROMPT_TOKENS]:
            texts.append(text)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return {"policy": str(policy), "prompts": str(prompts), "count": len(texts),
            "special": {k: getattr(tok, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}}


def worker_ours(spec: dict) -> dict:
    """Our trainer through the recipe runner, unmodified; step times from its metrics.jsonl."""
    import torch

    from rlhf import recipe as recipe_mod
    from rlhf.tracking import read_metrics

    torch.set_num_threads(1)
    work = Path(spec["work_dir"])
    stage = {"type": "ppo", "model": spec["policy"], "reward": "classic_ppo:count_e",
             "rollout_batch_size": BATCH, "num_minibatches": MINIBATCHES, "micro_batch_size": BATCH // MINIBATCHES,
             "forward_batch_size": BATCH, "ppo_epochs": EPOCHS, "learning_rate": LR, "precision": spec["precision"],
             "sample_every": 10_000, "data": {"path": spec["prompts"]}, "steps": 1 + spec["steps"],
             "kl": {"coef": BETA}, "missing_eos_penalty": None,
             "generation": {"max_new_tokens": NEW_TOKENS, "temperature": 1.0, "batch_size": BATCH}}
    path = _write_recipe(work / "recipe.yaml", work / "run", {"rl": stage})
    recipe_mod.run(recipe_mod.load_recipe(path))
    rows = [r for r in read_metrics(work / "run" / "rl" / "metrics.jsonl") if "perf/step_s" in r][1:]
    step = _median([r["perf/step_s"] for r in rows])
    rollout = _median([r["perf/generation_s"] + r["perf/forward_s"] + r["perf/scoring_s"] for r in rows])
    return {"step_s": step, "samples_per_s": BATCH / step, "rollout_s": rollout, "update_s": step - rollout,
            "response_length": _median([r["rollout/response_length"] for r in rows]), "peak_rss_mb": _peak_rss_mb()}


# Runs under the classic-TRL interpreter: imports nothing from rlhf (it needs transformers 5).
TRL011 = r'''
import json, resource, statistics, sys, time
import torch
spec = json.loads(sys.argv[1])
torch.set_num_threads(1)
torch.manual_seed(0)
from transformers import PreTrainedTokenizerFast
from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
# The tokenizer file itself: tokenizer_config.json names a transformers-5 class.
tok = PreTrainedTokenizerFast(tokenizer_file=spec["policy"] + "/tokenizer.json", **spec["special"])
tok.padding_side = "left"
model = AutoModelForCausalLMWithValueHead.from_pretrained(spec["policy"])
config = PPOConfig(batch_size=spec["batch"], mini_batch_size=spec["batch"] // spec["minibatches"],
                   ppo_epochs=spec["epochs"], learning_rate=spec["lr"], init_kl_coef=spec["beta"],
                   adap_kl_ctrl=False, seed=0, log_with=None, gradient_accumulation_steps=1)
trainer = PPOTrainer(config, model, ref_model=None, tokenizer=tok)
prompts = [json.loads(x)["prompt"] for x in open(spec["prompts"])]
gen = dict(min_length=-1, top_k=0, top_p=1.0, do_sample=True, temperature=1.0, max_new_tokens=spec["new_tokens"],
           pad_token_id=tok.pad_token_id)
steps, rollouts, lengths = [], [], []
for i in range(1 + spec["steps"]):
    batch = [prompts[(i * spec["batch"] + j) % len(prompts)] for j in range(spec["batch"])]
    queries = [torch.tensor(tok(p, add_special_tokens=False)["input_ids"]) for p in batch]
    t0 = time.perf_counter()
    responses = trainer.generate(queries, return_prompt=False, batch_size=spec["batch"], **gen)
    texts = tok.batch_decode(responses, skip_special_tokens=True)
    rewards = [torch.tensor(float(t.count("e"))) for t in texts]
    t1 = time.perf_counter()
    trainer.step(queries, responses, rewards)
    steps.append(time.perf_counter() - t0)
    rollouts.append(t1 - t0)
    lengths.append(sum(len(r) for r in responses) / len(responses))
step = statistics.median(steps[1:])
rollout = statistics.median(rollouts[1:])
print("RESULT " + json.dumps({"step_s": step, "samples_per_s": spec["batch"] / step, "rollout_s": rollout,
                             "update_s": step - rollout, "response_length": statistics.median(lengths[1:]),
                             "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def _run(cmd: list[str], timeout: float = 1200) -> dict:
    proc = subprocess.run(cmd, env=_env(1), capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-12:])}
    return json.loads(lines[-1][len("RESULT "):])


def _trl011_version(python: str | None) -> str | None:
    if not python:
        return None
    proc = subprocess.run([python, "-c", "import trl; from trl import PPOTrainer; print(trl.__version__)"],
                          env=_env(1), capture_output=True, text=True, check=False, timeout=300)
    lines = proc.stdout.strip().splitlines()  # the last line: imports may print warnings first
    return lines[-1].strip() if proc.returncode == 0 and lines else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trl011-python", help="python of an environment with trl==0.11.4 (skipped when absent)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="measured steps per process (after one warm-up step)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "classic_ppo.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker_ours(json.loads(args.worker))), flush=True)
        return 0
    t0, load_start = time.time(), _loadavg()
    tmp = Path(tempfile.mkdtemp(prefix="classic_ppo_bench_"))
    shared = prepare(tmp)
    trl_version = _trl011_version(args.trl011_python)
    if trl_version is None:
        print("classic TRL: no --trl011-python with trl 0.11 given (or it failed to import): its rows are skipped",
              file=sys.stderr)
    configs = ([("classic TRL 0.11 PPO", "trl", None)] if trl_version else []) + \
        [("ours", "ours", "auto"), ("ours, fp32", "ours", "fp32")]
    results: dict[str, list[dict]] = {}
    for rnd in range(args.rounds):
        for name, side, precision in configs:
            work = tmp / f"{side}-{precision}-{rnd}"
            work.mkdir(parents=True)
            print(f"[{time.time() - t0:5.0f}s] round {rnd + 1}: {name}", file=sys.stderr, flush=True)
            spec = {**shared, "work_dir": str(work), "steps": args.steps, "precision": precision, "batch": BATCH,
                    "minibatches": MINIBATCHES, "epochs": EPOCHS, "lr": LR, "beta": BETA, "new_tokens": NEW_TOKENS}
            cmd = ([args.trl011_python, "-c", TRL011, json.dumps(spec)] if side == "trl"
                   else [sys.executable, __file__, "--worker", json.dumps(spec)])
            results.setdefault(name, []).append(_run(cmd))
    from rlhf.precision import precision_flags

    auto = "bf16" if precision_flags("auto", cpu_bf16=True)["bf16"] else "fp32"
    lines = [f"{BATCH} prompts x {PROMPT_TOKENS} tokens, {NEW_TOKENS} new tokens, {EPOCHS} epochs x {MINIBATCHES} "
             f"minibatches, 4-layer 256-wide GPT-2, Python reward, 1 thread; torch {_version('torch').split('+')[0]}, "
             f"classic trl {trl_version or 'absent'} (fp32); ours: precision auto = {auto} on this machine; "
             f"load {load_start} -> {_loadavg()}",
             *step_table(results, width=24)]
    trl = results.get("classic TRL 0.11 PPO", [])
    for name in ("ours", "ours, fp32"):
        lines += ratio_line(f"{name} / classic TRL", results[name], trl)
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "table": table, "total_s": time.time() - t0}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
