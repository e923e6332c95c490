"""Transformer vs RNN, before and after PPO, over several training seeds.

Runs the text stages of ``recipes/baselines/compare.yaml`` (sft and rnn at
the same 250-step budget, one reward model that is neither, the same PPO on
each, one eval per architecture) once per seed, each in its own output dir,
at a fixed thread count, and prints per model the mean ± 95% t-interval
across seeds of: held-out perplexity, gold score (VADER, the judge),
reward-model score, KL to the model PPO started from (nats per response).
One eval's bootstrap intervals cover the prompts; these cover training.

    python benchmarks/baselines_text_seeds.py                 # seeds 0 1 2, 2 threads, ~12 min idle
    python benchmarks/baselines_text_seeds.py --seeds 0 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from seeds import seed_table  # benchmarks/seeds.py

ROOT = Path(__file__).resolve().parents[1]
TEXT_STAGES = ["sft", "rnn", "reward", "sft_ppo", "rnn_ppo", "eval_transformer", "eval_rnn"]
EVALS = {"eval_transformer": ["sft", "sft_ppo"], "eval_rnn": ["rnn", "rnn_ppo"]}
FIGURES = [("perplexity", "held-out perplexity"), ("gold", "gold score"), ("reward/rm", "RM score"),
           ("kl", "KL to own start")]


def _value(entry):
    return entry["mean"] if isinstance(entry, dict) else entry


def run_seed(seed: int, work: Path, threads: int) -> dict:
    from rlhf import recipe as recipe_mod

    out = work / f"seed{seed}"
    recipe = recipe_mod.load_recipe(ROOT / "recipes" / "baselines" / "compare.yaml",
                                    [f"output_dir={out}", f"seed={seed}", f"threads={threads}"])
    recipe_mod.run(recipe, only=TEXT_STAGES)
    rows = {}
    for stage, models in EVALS.items():
        ev = json.loads((out / stage / "metrics.json").read_text())
        rows.update({m: {key: _value(ev[m][key]) for key, _ in FIGURES if key in ev[m]} for m in models})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2, as the recipe)")
    p.add_argument("--work", type=Path, default=Path("runs/bench-baselines-text"))
    p.add_argument("--json", type=Path, help="write every seed's figures here")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    rows = {}
    for seed in args.seeds:
        rows[seed] = run_seed(seed, args.work, args.threads)
        print(f"seed {seed}: " + "; ".join(f"{m} ppl {r['perplexity']:.2f} gold {r['gold']:.3f}"
                                         for m, r in rows[seed].items()), flush=True)
    models = [m for ms in EVALS.values() for m in ms]
    print(f"\n{len(args.seeds)} training seeds ({', '.join(map(str, args.seeds))}), mean ± 95% t-interval; "
          "128 held-out prompts per seed")
    print("\n".join(seed_table(rows, models, FIGURES)))
    if args.json:
        args.json.write_text(json.dumps({"seeds": args.seeds, "threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
