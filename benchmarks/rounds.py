"""What human-feedback rounds buy, at a fixed label budget, on the quickstart task.

Simulated labelers (Bradley-Terry on VADER, 5 labelers, t = 0.1) label through
the real labeling server and store. Three arms, each from the same SFT policy
(trained once per seed), the same label budget and the same 60 PPO steps:

  rounds-uncertainty  3 rounds x 300 labels, pairs the current reward model is least sure of
                      (round 1: random, there is no reward model yet)
  rounds-random       3 rounds x 300 labels, random pairs of the current policy's samples
  one-round           1 round x 900 labels on SFT samples (random pairs), then 60 PPO steps

Per arm: the final policy's held-out gold score and KL to SFT (the rounds
report: 128 held-out prompts, the same sampling seed for every policy), the
final reward model's accuracy on the final policy's own samples (two samples
per held-out prompt, the gold-better one as "chosen"; ties left out), and the
wall time. Repeated over seeds; mean and a 95% t-interval across seeds.

    python benchmarks/rounds.py                      # 3 seeds, ~25 min on 2 CPU cores
    python benchmarks/rounds.py --seeds 1 --arms rounds-uncertainty one-round
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from seeds import interval, shared_sft  # benchmarks/seeds.py

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "quickstart-rounds.yaml"
ARMS = ("rounds-uncertainty", "rounds-random", "one-round")


def arm_recipe(base: dict, arm: str, out: Path, seed: int) -> dict:
    cfg = copy.deepcopy(base)
    cfg["output_dir"], cfg["seed"] = str(out), seed
    loop = cfg["stages"]["loop"]
    collect, ppo = loop["stages"]["collect"], loop["stages"]["ppo"]
    total_labels, total_steps = loop["count"] * collect["labels"], loop["count"] * ppo["steps"]
    if arm == "rounds-random":
        collect["selection"] = "random"
    elif arm == "one-round":
        loop["count"] = 1
        collect.update(labels=total_labels, selection="random")
        ppo["steps"] = total_steps
    return cfg


def rm_accuracy_on_policy(policy: Path, reward: Path, prompts: Path, seed: int) -> tuple[float, int]:
    """The reward model's accuracy on pairs of the policy's own samples, judged by gold."""
    from rlhf.data import normalize_prompts, read_records, render_prompt
    from rlhf.gold import vader_sentiment
    from rlhf.models import ModelConfig, load_causal_lm, load_tokenizer
    from rlhf.rewards import RewardModel
    from rlhf.sampling import SamplingConfig, sample

    items = normalize_prompts(read_records(str(prompts)))
    tok = load_tokenizer(ModelConfig(name=str(policy)))
    model = load_causal_lm(ModelConfig(name=str(policy)), tok).eval()
    got = sample(model, tok, [render_prompt(tok, p) for p in items],
                 SamplingConfig(max_new_tokens=32, samples_per_prompt=2), seed + 12345, "cpu")
    a, b = got.texts[0::2], got.texts[1::2]
    ga, gb = vader_sentiment(items, a), vader_sentiment(items, b)
    rm = RewardModel(reward)
    ra, rb = rm(items, a), rm(items, b)
    judged = [(x > y) == (rx > ry) for x, y, rx, ry in zip(ga, gb, ra, rb) if x != y]
    return sum(judged) / len(judged), len(judged)


def run_arm(base: dict, arm: str, seed: int, work: Path, sft: Path) -> dict:
    from rlhf import recipe as recipe_mod

    out = work / f"seed{seed}" / arm
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copytree(sft, out / "sft")
    path = out.parent / f"{arm}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(arm_recipe(base, arm, out, seed), sort_keys=False))
    t0 = time.time()
    recipe_mod.run(recipe_mod.load_recipe(path))
    wall = time.time() - t0
    table = json.loads((out / "report" / "rounds.json").read_text())
    last = table[-1]
    k = last["round"]
    acc, n = rm_accuracy_on_policy(out / f"round-{k}" / "ppo" / "final", out / f"round-{k}" / "reward" / "final",
                                   ROOT / "data" / "quickstart" / "prompts_test.jsonl", seed)
    return {"arm": arm, "seed": seed, "gold": last["gold"], "kl": last["kl"], "sft_gold": table[0]["gold"],
            "rm_acc_final_policy": acc, "rm_acc_pairs": n, "labels": last["labels_total"], "wall_s": wall,
            "rounds": table}


def gold_at_kl(rounds: list[dict], kl: float) -> float | None:
    """Gold of an arm's round-by-round (KL, gold) path (SFT = 0 nats first),
    linearly interpolated at ``kl``; None beyond its last point."""
    pts = sorted((r["kl"], r["gold"]) for r in rounds)
    for (k0, g0), (k1, g1) in zip(pts, pts[1:]):
        if k0 <= kl <= k1:
            return g0 + (g1 - g0) * (kl - k0) / (k1 - k0) if k1 > k0 else g1
    return None


def print_tables(results: list[dict], arms: list[str], seeds: list[int], threads: int) -> None:
    print("\n| arm | gold (final policy) | KL to SFT | RM accuracy on final policy's samples | wall s |"
          "\n|---|---:|---:|---:|---:|")
    for arm in arms:
        rs = [r for r in results if r["arm"] == arm]
        print(f"| {arm} | {interval([r['gold'] for r in rs])} | {interval([r['kl'] for r in rs])} | "
              f"{interval([r['rm_acc_final_policy'] for r in rs])} | {statistics.mean(r['wall_s'] for r in rs):.0f} |")
    one = {r["seed"]: r for r in results if r["arm"] == "one-round"}
    for arm in [a for a in arms if a != "one-round"]:
        matched = [(gold_at_kl(r["rounds"], one[r["seed"]]["kl"]), one[r["seed"]]["gold"])
                   for r in results if r["arm"] == arm and r["seed"] in one]
        matched = [(g, g1) for g, g1 in matched if g is not None]
        if matched:
            print(f"\nmatched KL: {arm}'s round-by-round path at one-round's final KL: gold "
                  f"{interval([g for g, _ in matched])} vs one-round {interval([g1 for _, g1 in matched])} "
                  f"({len(matched)} seeds)")
    print(f"\nseeds {seeds}; intervals: mean ± 95% t-interval across seeds; threads {threads}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="recipe seeds (default 0 1 2)")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--work", type=Path, default=Path("runs/bench-rounds"), help="run directories")
    p.add_argument("--json", type=Path, help="also write every figure to this file")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--report", type=Path, help="print the tables from an earlier --json file; run nothing")
    args = p.parse_args()
    if args.report:
        results = json.loads(args.report.read_text())
        arms = [a for a in ARMS if any(r["arm"] == a for r in results)]
        print_tables(results, arms, sorted({r["seed"] for r in results}), args.threads)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import yaml

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    base = yaml.safe_load(RECIPE.read_text())
    results = []
    for seed in args.seeds:
        sft = shared_sft(base["stages"]["sft"], seed, args.work)
        for arm in args.arms:
            r = run_arm(base, arm, seed, args.work, sft)
            results.append(r)
            print(f"seed {seed} {arm:20s} gold {r['gold']:.3f} (SFT {r['sft_gold']:.3f})  KL {r['kl']:.2f}  "
                  f"RM acc on final policy {r['rm_acc_final_policy']:.3f} ({r['rm_acc_pairs']} pairs)  "
                  f"{r['wall_s']:.0f} s", flush=True)
    print_tables(results, args.arms, args.seeds, args.threads)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
