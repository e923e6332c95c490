"""The quickstart's headline figures over several seeds, with intervals.

Runs ``recipes/quickstart.yaml`` (SFT -> reward -> PPO; the eval stage is
left out) once per seed, each in its own output dir, at a fixed thread
count, and prints per seed and as mean ± 95% t-interval across seeds:

  SFT held-out loss; reward-model held-out accuracy (all 500 pairs);
  PPO held-out gold score (VADER) of SFT and PPO, and KL(PPO || SFT)

    python benchmarks/quickstart_seeds.py                       # seeds 42 1 2, 2 threads, ~7 min
    python benchmarks/quickstart_seeds.py --seeds 42 1 2 3 4 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from seeds import interval  # benchmarks/seeds.py

ROOT = Path(__file__).resolve().parents[1]
FIGURES = [("sft", "eval/loss", "SFT held-out loss"), ("reward", "eval/accuracy", "RM held-out accuracy"),
           ("ppo", "gold/sft", "gold (SFT)"), ("ppo", "gold/ppo", "gold (PPO)"), ("ppo", "kl/ppo", "KL(PPO || SFT)")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--work", type=Path, default=Path("runs/bench-quickstart-seeds"))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    from rlhf import recipe as recipe_mod

    rows = []
    for seed in args.seeds:
        out = args.work / f"seed{seed}"
        recipe = recipe_mod.load_recipe(ROOT / "recipes" / "quickstart.yaml",
                                        [f"output_dir={out}", f"seed={seed}", f"threads={args.threads}"])
        recipe.stages = [s for s in recipe.stages if s.type != "eval"]
        recipe_mod.run(recipe)
        row = {"seed": seed}
        for stage, key, _ in FIGURES:
            row[f"{stage}:{key}"] = json.loads((out / stage / "metrics.json").read_text())[key]
        rows.append(row)
        print(f"seed {seed}: " + ", ".join(f"{label} {row[f'{s}:{k}']:.3f}" for s, k, label in FIGURES), flush=True)
    print("\n| figure | " + " | ".join(f"seed {r['seed']}" for r in rows) + " | mean ± 95% t-interval |")
    print("|---|" + "---:|" * (len(rows) + 1))
    for stage, key, label in FIGURES:
        xs = [r[f"{stage}:{key}"] for r in rows]
        print(f"| {label} | " + " | ".join(f"{x:.3f}" for x in xs) + f" | {interval(xs)} |")
    print(f"\nthreads {args.threads}; recipes/quickstart.yaml without its eval stage")


if __name__ == "__main__":
    main()
