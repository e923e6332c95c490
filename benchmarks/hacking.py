"""Reward hacking on purpose: does the watch see it, does best/ keep the peak,
does a conservative ensemble reward hold up better?

Arms, each from the same SFT policy (trained once per seed):

  single      recipes/hacking-demo.yaml as written: a reward model on 200 pairs,
              80 PPO steps with KL coefficient 0.01, the watch every 5 steps
  ensemble    the same, with `ensemble: 4` in the reward stage and PPO's reward
              aggregated as mean - 1.0 * std (Coste et al. 2023)
  quickstart  recipes/quickstart.yaml's reward and PPO stages (3000 pairs, KL 0.05,
              60 steps) with the same watch: the alarm should stay quiet

Per arm, from the PPO stage's watch rows (64 held-out prompts, gold = VADER):
the gold peak and its step, the alarm step (and how many steps after the peak
it fired), the gold of best/ (by construction the best watch point) and the
gold at the last watch point; plus distinct-2 and the share of the most
common ending at the last point. Mean and a 95% t-interval across seeds.

    python benchmarks/hacking.py                    # 3 seeds, ~20 min on 2 CPU cores
    python benchmarks/hacking.py --seeds 0 --arms single
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
from pathlib import Path

from seeds import interval, shared_sft  # benchmarks/seeds.py

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("single", "ensemble", "quickstart")
WATCH = {"every": 5, "max_prompts": 64, "patience": 3, "threshold": 0.05}


def arm_recipe(arm: str, out: Path, seed: int) -> dict:
    import yaml

    if arm == "quickstart":
        cfg = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
        cfg["stages"].pop("eval")
        cfg["stages"]["ppo"]["watch"] = dict(WATCH)
    else:
        cfg = yaml.safe_load((ROOT / "recipes" / "hacking-demo.yaml").read_text())
        cfg["stages"].pop("eval")
        if arm == "ensemble":
            cfg["stages"]["reward"]["ensemble"] = 4
            cfg["stages"]["ppo"]["reward"] = {"source": "${output_dir}/reward/final", "aggregate": "mean_minus_std",
                                              "uncertainty_coef": 1.0}
    cfg = copy.deepcopy(cfg)
    cfg["output_dir"], cfg["seed"] = str(out), seed
    return cfg


def watch_figures(out: Path) -> dict:
    rows = [json.loads(x) for x in (out / "ppo" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    w = [r for r in rows if "watch/heldout" in r]
    peak = max(w, key=lambda r: r["watch/heldout"])
    alarm = next((r["step"] for r in w if r.get("watch/alarm")), None)
    best = json.loads((out / "ppo" / "best" / "best.json").read_text())
    return {"peak_gold": peak["watch/heldout"], "peak_step": peak["step"], "alarm_step": alarm,
            "alarm_after_peak": None if alarm is None else alarm - peak["step"], "best_gold": best["heldout"],
            "best_step": best["step"], "last_gold": w[-1]["watch/heldout"], "last_proxy": w[-1]["watch/proxy"],
            "last_kl": w[-1]["watch/kl"], "last_distinct_2": w[-1]["watch/distinct_2"],
            "last_top_ending": w[-1]["watch/top_ending_share"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--work", type=Path, default=Path("runs/bench-hacking"))
    p.add_argument("--json", type=Path, help="also write every figure to this file")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import yaml

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    from rlhf import recipe as recipe_mod

    results = []
    for seed in args.seeds:
        sft = shared_sft(yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())["stages"]["sft"], seed,
                         args.work)
        for arm in args.arms:
            out = args.work / f"seed{seed}" / arm
            if not (out / "ppo" / "final").exists():  # else finished by an earlier run: reuse it
                if out.exists():
                    shutil.rmtree(out)
                out.mkdir(parents=True)
                shutil.copytree(sft, out / "sft")
            path = out.parent / f"{arm}.yaml"
            path.write_text(yaml.safe_dump(arm_recipe(arm, out, seed), sort_keys=False))
            recipe_mod.run(recipe_mod.load_recipe(path))
            r = {"arm": arm, "seed": seed, **watch_figures(out)}
            results.append(r)
            print(f"seed {seed} {arm:10s} peak gold {r['peak_gold']:.3f} at step {r['peak_step']}, alarm "
                  f"{r['alarm_step']}, best/ {r['best_gold']:.3f}, last gold {r['last_gold']:.3f} (proxy "
                  f"{r['last_proxy']:.3f}, KL {r['last_kl']:.1f}, distinct-2 {r['last_distinct_2']:.3f}, top ending "
                  f"{r['last_top_ending']:.2f})", flush=True)
    print("\n| arm | gold peak | peak step | alarm fired (runs) | alarm steps after peak | best/ gold | "
          "last gold | last distinct-2 | last top-ending share |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for arm in args.arms:
        rs = [r for r in results if r["arm"] == arm]
        fired = sum(r["alarm_step"] is not None for r in rs)
        print(f"| {arm} | {interval([r['peak_gold'] for r in rs])} | {interval([r['peak_step'] for r in rs])} | "
              f"{fired}/{len(rs)} | {interval([r['alarm_after_peak'] for r in rs])} | "
              f"{interval([r['best_gold'] for r in rs])} | {interval([r['last_gold'] for r in rs])} | "
              f"{interval([r['last_distinct_2'] for r in rs])} | {interval([r['last_top_ending'] for r in rs])} |")
    print(f"\nseeds {args.seeds}; mean ± 95% t-interval across seeds; watch {WATCH}; threads {args.threads}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
