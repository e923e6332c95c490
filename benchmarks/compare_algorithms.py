"""PPO vs RLOO vs GRPO vs DPO on the quickstart task, over several seeds.

Runs ``recipes/compare-algorithms.yaml`` (SFT -> reward model -> PPO, RLOO,
GRPO, DPO -> one eval stage) once per seed, each in its own output dir, at a
fixed thread count, and prints per method the mean ± 95% t-interval across
seeds of what the eval stage measured on the 128 held-out prompts:

  gold score (VADER), reward-model score, KL(policy || SFT) in nats,
  win rate vs SFT by gold (ties half), distinct-2, response length.

The on-policy methods generate the same number of samples (3,840); DPO trains
on the reward model's 3,000 pairs. ``--json`` writes every seed's figures.

    python benchmarks/compare_algorithms.py                        # seeds 42 1 2, 2 threads, ~15 min
    python benchmarks/compare_algorithms.py --seeds 42 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from seeds import seed_table  # benchmarks/seeds.py

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["sft", "ppo", "rloo", "grpo", "dpo"]
FIGURES = [("gold", "gold"), ("reward/rm", "RM score"), ("kl", "KL to SFT"), ("win_rate/gold", "win vs SFT (gold)"),
           ("distinct_2", "distinct-2"), ("response_length", "length")]


def _value(entry):
    return entry["mean"] if isinstance(entry, dict) else entry


def run_seed(seed: int, work: Path, threads: int) -> dict:
    from rlhf import recipe as recipe_mod

    out = work / f"seed{seed}"
    recipe = recipe_mod.load_recipe(ROOT / "recipes" / "compare-algorithms.yaml",
                                    [f"output_dir={out}", f"seed={seed}", f"threads={threads}"])
    recipe_mod.run(recipe)
    ev = json.loads((out / "eval" / "metrics.json").read_text())
    return {m: {key: _value(ev[m][key]) for key, _ in FIGURES if key in ev[m]} for m in METHODS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--work", type=Path, default=Path("runs/bench-compare-algorithms"))
    p.add_argument("--json", type=Path, help="write every seed's figures here")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    rows = {}
    for seed in args.seeds:
        rows[seed] = run_seed(seed, args.work, args.threads)
        print(f"seed {seed}: " + "; ".join(f"{m} gold {rows[seed][m]['gold']:.3f} KL {rows[seed][m].get('kl', 0):.2f}"
                                         for m in METHODS), flush=True)
    print(f"\n{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), mean ± 95% t-interval; "
          "128 held-out prompts per seed")
    print("\n".join(seed_table(rows, METHODS, FIGURES, first="method")))
    if args.json:
        args.json.write_text(json.dumps({"seeds": args.seeds, "threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
