"""``type: rounds_report``: one report across the human-feedback rounds.

Evaluates the SFT policy and every round's policy on the same held-out
prompts with the evaluation engine (same sampling seed for each, so they
draw the same random numbers), then, per round:

- gold score (mean, 95% bootstrap interval) and KL to the SFT policy;
- win rate by gold against SFT and against the previous round (ties half);
- the reward model's accuracy on the round's fresh labels before it was
  retrained (the previous round's model, on text like the new policy writes:
  ``collect/rm_accuracy_fresh``) and after (the retrained model on the
  held-out share of those labels: the reward stage's ``eval/accuracy``);
- labels used (this round, and all rounds so far) and labeler agreement.

Writes the evaluation's files (``report.html``, ``metrics.json``: checkpoint
name -> metric, ``samples.jsonl``, plots) plus ``rounds.json`` (the table
above, one entry per round, round 0 = SFT), ``rounds.png`` and
``rounds.html`` into the stage dir.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlhf.config import opt
from rlhf.errors import BadInput
from rlhf.sampling import SamplingConfig

log = logging.getLogger(__name__)

ROUND_DIR = re.compile(r"^round-(\d+)$")


@dataclass
class Config:
    """Per-round gold, KL, win rates, reward-model drift and labels, plotted."""

    reference: str = opt("", "the SFT policy: KL reference and first baseline (e.g. ${output_dir}/sft/final)")
    prompts: str = opt("", "held-out prompts (JSONL with `prompt`)")
    gold: str | None = opt(None, "gold scorer module:function; null = no gold score or win rates")
    max_prompts: int | None = opt(None, "evaluate at most this many prompts")
    policy_stage: str = opt("ppo", "name of the policy stage inside the rounds block")
    reward_stage: str = opt("reward", "name of the reward stage inside the rounds block")
    collect_stage: str = opt("collect", "name of the collect stage inside the rounds block")
    generation: SamplingConfig = opt(SamplingConfig(), "sampling settings (as the eval stage)")
    bootstrap_samples: int = opt(1000, "bootstrap resamples for the 95% intervals")

    def check(self, fail):
        for key in ("reference", "prompts"):
            if not getattr(self, key):
                raise fail(key, "required")


def _rounds(ctx, cfg: Config) -> list[int]:
    """Round numbers of this recipe whose policy stage is in it, in order."""
    names = {s.name for s in ctx.recipe.stages}
    ks = sorted({s.round for s in ctx.recipe.stages if s.round is not None})
    return [k for k in ks if f"round-{k}/{cfg.policy_stage}" in names]


def _eval_config(cfg: Config, ctx, rounds: list[int]):
    from rlhf.evaluation.runner import Config as EvalConfig, EvalData

    checkpoints = {"sft": cfg.reference}
    for k in rounds:
        checkpoints[f"round-{k}"] = str(ctx.recipe.stage_dir(f"round-{k}/{cfg.policy_stage}") / "final")
    return EvalConfig(checkpoints=checkpoints, prompts=EvalData(path=cfg.prompts, max_samples=cfg.max_prompts),
                      gold=cfg.gold, reference="sft", baseline="sft" if cfg.gold else None,
                      generation=cfg.generation, bootstrap_samples=cfg.bootstrap_samples)


def validate(cfg: Config, ctx) -> None:
    from rlhf.evaluation.runner import check_inputs

    rounds = _rounds(ctx, cfg)
    if not rounds:
        raise BadInput(f"stages.{ctx.name}.policy_stage: no stage round-<k>/{cfg.policy_stage} in this recipe "
                       "(a rounds_report follows a `type: rounds` block)")
    check_inputs(_eval_config(cfg, ctx, rounds), lambda key: f"stages.{ctx.name}.{key}", ctx.produces, ctx.loadable)


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def win_rate_between(rows: list[dict], a: str, b: str, key: str = "gold") -> float:
    """Share of samples where ``a`` scores above ``b`` by ``key`` (ties half)."""
    from rlhf.evaluation.metrics import win_rate

    return win_rate([r["responses"][a]["scores"][key] for r in rows], [r["responses"][b]["scores"][key] for r in rows])


def round_table(ctx, cfg: Config, rounds: list[int], results: dict, rows: list[dict]) -> list[dict]:
    """One dict per round (and one for SFT as round 0) of the figures the report shows."""
    table = []
    cumulative = 0
    for k in [0] + rounds:
        name = "sft" if k == 0 else f"round-{k}"
        m = results[name]
        entry = {"round": k, "policy": name, "kl": m["kl"]["mean"] if isinstance(m.get("kl"), dict) else None}
        if cfg.gold:
            entry.update(gold=m["gold"]["mean"], gold_ci=[m["gold"]["ci_low"], m["gold"]["ci_high"]],
                         win_vs_sft=win_rate_between(rows, name, "sft"),
                         win_vs_previous=None if k == 0 else win_rate_between(
                             rows, name, "sft" if k == 1 else f"round-{k - 1}"))
        if k:
            collect = _read(ctx.recipe.stage_dir(f"round-{k}/{cfg.collect_stage}") / "metrics.json")
            reward = _read(ctx.recipe.stage_dir(f"round-{k}/{cfg.reward_stage}") / "metrics.json")
            cumulative += int(collect.get("collect/labels", 0))
            entry.update(labels=collect.get("collect/labels"), labels_total=cumulative,
                         rm_accuracy_fresh_before=collect.get("collect/rm_accuracy_fresh"),
                         rm_accuracy_fresh_after=reward.get("eval/accuracy"),
                         rm_pairs_fresh_after=reward.get("eval/pairs"),
                         percent_agreement=collect.get("collect/percent_agreement"),
                         fleiss_kappa=collect.get("collect/fleiss_kappa"))
        table.append(entry)
    return table


def plot_rounds(table: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [e["round"] for e in table]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    if "gold" in table[0]:
        gold = np.array([e["gold"] for e in table])
        lo = gold - np.array([e["gold_ci"][0] for e in table])
        hi = np.array([e["gold_ci"][1] for e in table]) - gold
        ax.errorbar(ks, gold, yerr=[lo, hi], marker="o", capsize=3, label="gold (95% CI)")
        ax.set_ylabel("gold score")
    ax2 = ax.twinx()
    ax2.plot(ks, [e["kl"] for e in table], "s--", color="tab:gray", label="KL to SFT")
    ax2.set_ylabel("KL to SFT (nats)")
    ax.set_title("policy by round (0 = SFT)")
    ax.set_xlabel("round")
    ax = axes[1]
    later = [e for e in table if e["round"] > 0]
    for key, label in (("rm_accuracy_fresh_before", "before retraining"), ("rm_accuracy_fresh_after", "after")):
        pts = [(e["round"], e[key]) for e in later if e.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.axhline(0.5, color="lightgray", lw=1)
    ax.set_title("reward model on the round's fresh labels")
    ax.set_xlabel("round")
    ax.set_ylabel("pairwise accuracy")
    ax.legend(fontsize=8)
    ax = axes[2]
    if "gold" in table[0]:
        ax.plot([e["round"] for e in later], [e["win_vs_sft"] for e in later], marker="o", label="vs SFT")
        ax.plot([e["round"] for e in later], [e["win_vs_previous"] for e in later], marker="o",
                label="vs previous round")
        ax.axhline(0.5, color="lightgray", lw=1)
        ax.legend(fontsize=8)
    ax.set_title("win rate by gold")
    ax.set_xlabel("round")
    for a in axes:
        a.set_xticks(ks)
    fig.tight_layout()
    path = out / "rounds.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


COLUMNS = [("round", "round"), ("gold", "gold"), ("gold_ci", "gold 95% CI"), ("kl", "KL to SFT"),
           ("win_vs_sft", "win vs SFT"), ("win_vs_previous", "win vs previous"), ("labels", "labels"),
           ("labels_total", "labels so far"), ("rm_accuracy_fresh_before", "RM acc. fresh, before"),
           ("rm_accuracy_fresh_after", "RM acc. fresh, after"), ("percent_agreement", "agreement")]


def write_html(table: list[dict], out: Path) -> Path:
    import html

    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(e.get(key)))}</td>" for key, _ in COLUMNS) + "</tr>"
                   for e in table)
    path = out / "rounds.html"
    path.write_text(
        "<!doctype html><meta charset='utf-8'><title>rounds</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 10px;text-align:right}"
        "table{border-collapse:collapse}tr:nth-child(even){background:#f4f4f4}</style>"
        "<h1>Human-feedback rounds</h1><p>Round 0 is the SFT policy. Every policy sampled the same held-out "
        "prompts with the same seed; win rates by gold, ties count half. <a href='report.html'>Full evaluation "
        "report</a>.</p>"
        f"<table><tr>{head}</tr>{body}</table><p><img src='rounds.png' alt='rounds' style='max-width:100%'></p>",
        encoding="utf-8")
    return path


def train(cfg: Config, ctx) -> Path:
    from rlhf.evaluation.runner import evaluate

    final = ctx.stage_dir / "final"
    if not ctx.is_main:
        return final
    rounds = _rounds(ctx, cfg)
    seed = cfg.generation.seed if cfg.generation.seed is not None else ctx.seed
    results = evaluate(_eval_config(cfg, ctx, rounds), ctx.stage_dir, seed)
    rows = [json.loads(line) for line in (ctx.stage_dir / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    table = round_table(ctx, cfg, rounds, results, rows)
    (ctx.stage_dir / "rounds.json").write_text(json.dumps(table, indent=2) + "\n")
    plot_rounds(table, ctx.stage_dir)
    write_html(table, ctx.stage_dir)
    for e in table:
        log.info("%s: %s", e["policy"], ", ".join(f"{k}={_fmt(e.get(k))}" for k, _ in COLUMNS[1:] if k in e))
    tmp = final.with_name("final.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "outputs.json").write_text(json.dumps({"rounds": "../rounds.json", "report": "../rounds.html"}) + "\n")
    tmp.rename(final)
    return final

