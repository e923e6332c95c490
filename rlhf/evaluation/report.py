"""The evaluation report: PNG plots (matplotlib) and one self-contained ``report.html``.

The HTML has everything inline (CSS, JS, images as base64 data URIs): it opens
from disk, offline, or as an e-mail attachment, and loads nothing. Every piece
of model output and user input is HTML-escaped.

Plots:
- ``metrics.png``       one bar chart per metric, checkpoints side by side, 95% intervals
- ``reward_vs_kl.png``  each scorer's mean against KL to the reference, one point per checkpoint
- ``curves_<stage>.png`` the run's training curves (loss, reward, accuracy, KL, KL coefficient)
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display; we only write files
from matplotlib.figure import Figure  # noqa: E402 (after choosing the backend)

log = logging.getLogger(__name__)

COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C",
          "#CCB974", "#64B5CD"]

# Training-curve panels: title -> which metrics.jsonl keys go in it.
CURVE_PANELS = [
    ("Loss", re.compile(r"(^|/)(\w+_)?loss$")),
    ("Reward", re.compile(r"^objective/(scores|rlhf_reward)$|(^|/)mean_reward$")),
    ("Accuracy", re.compile(r"(^|/)accuracy$")),
    ("KL (nats / sequence)", re.compile(r"^objective/kl$")),
    ("KL coefficient", re.compile(r"(^|/)kl_coef$")),
    ("Reward-hacking watch: proxy vs held-out", re.compile(r"^watch/(proxy|heldout)$")),
    ("Watch: diversity", re.compile(r"^watch/(distinct_2|top_ending_share)$")),
]


# ---------------------------------------------------------------- training curves


def read_curves(run_dir: Path, exclude: Path | None = None,
                order: list[str] | None = None) -> dict[str, dict[str, dict[str, list]]]:
    """``<run_dir>/<stage>/metrics.jsonl`` -> {stage: {panel: {key: [(step, value), ...]}}}.

    Stages come in ``order`` (else the order of ``<run_dir>/recipe.yaml``, else
    by name); eval stages and ``exclude`` are skipped, as are summary rows.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return {}
    if order is None:
        order = _recipe_order(run_dir)
    dirs = [p for p in sorted(run_dir.iterdir()) if (p / "metrics.jsonl").is_file()]
    dirs.sort(key=lambda p: order.index(p.name) if p.name in order else len(order))
    curves = {}
    for stage_dir in dirs:
        if exclude is not None and stage_dir.resolve() == Path(exclude).resolve():
            continue
        if _stage_type(stage_dir) == "eval":
            continue
        panels: dict[str, dict[str, list]] = {}
        for row in read_jsonl(stage_dir / "metrics.jsonl"):
            if "train/runtime" in row:  # HF's end-of-training averages, not a point on the curve
                continue
            step = row.get("step")
            for key, value in row.items():
                if key.startswith(("summary/", "perf/")) or not isinstance(value, (int, float)) \
                        or isinstance(value, bool) or not math.isfinite(value):
                    continue
                for title, pattern in CURVE_PANELS:
                    if pattern.search(key):
                        panels.setdefault(title, {}).setdefault(key, []).append((step, float(value)))
                        break
        panels = {t: {k: pts for k, pts in series.items() if len(pts) >= 2} for t, series in panels.items()}
        panels = {t: s for t, s in panels.items() if s}
        if panels:
            curves[stage_dir.name] = panels
    return curves


def read_jsonl(path: Path) -> list[dict]:
    # Not rlhf.tracking.read_metrics: importing tracking imports transformers' Trainer (seconds).
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:  # a line cut short by a killed run: skip it, plot the rest
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _recipe_order(run_dir: Path) -> list[str]:
    import yaml

    try:
        saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
        return list(saved.get("stages", {}))
    except (OSError, yaml.YAMLError, AttributeError):
        return []


def _stage_type(stage_dir: Path) -> str | None:
    import yaml

    try:
        return yaml.safe_load((stage_dir / "config.yaml").read_text()).get("type")
    except (OSError, yaml.YAMLError, AttributeError):
        return None


# ---------------------------------------------------------------- metric labels


def metric_label(key: str, settings: dict) -> str:
    if key.startswith("reward/"):
        return f"reward ({key[7:]})"
    if key == "gold":
        return "gold score"
    if key.startswith("win_rate/"):
        return f"win rate vs {settings.get('baseline')} ({key[9:]})"
    if key.startswith("lc_win_rate/"):
        return f"length-controlled win rate vs {settings.get('baseline')} ({key[12:]})"
    if key == "kl":
        return f"KL to {settings.get('reference')} (nats)"
    if key == "pairwise_accuracy":
        return "pairwise accuracy"
    return key.replace("_", " ").replace("distinct 1", "distinct-1").replace("distinct 2", "distinct-2")


METRIC_HELP = {
    "gold": "mean gold score of the sampled responses",
    "kl": "Monte-Carlo estimate of KL(policy || reference) per response: the mean over samples of "
          "sum_t log p(y_t) - log p_ref(y_t)",
    "perplexity": "exp(mean negative log-likelihood per token) on the held-out text set",
    "distinct_1": "distinct words / all words over every response (lowercased, whitespace-split)",
    "distinct_2": "distinct word bigrams / all word bigrams over every response",
    "response_length": "mean tokens per response, EOS included",
    "eos_rate": "fraction of responses that ended with EOS before the length cap",
}


def metric_help(key: str) -> str:
    if key.startswith("reward/"):
        return f"mean score by reward source '{key[7:]}'"
    if key.startswith("win_rate/"):
        return "fraction of samples scored higher than the baseline's on the same prompt; ties count half"
    if key.startswith("lc_win_rate/"):
        return ("win rate at equal response length: logistic regression of the outcome on the length "
                "difference (AlpacaEval's length-controlled win rate), sigmoid of its intercept")
    return METRIC_HELP.get(key, "")


def _better(key: str) -> int:
    """+1 higher is better, -1 lower is better, 0 neither (no highlight)."""
    if key.startswith(("reward/", "win_rate/", "lc_win_rate/")) or key in ("gold", "pairwise_accuracy"):
        return 1
    if key == "perplexity":
        return -1
    return 0


def fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, int):
        return f"{v:,}"
    a = abs(v)
    return f"{v:,.1f}" if a >= 100 else f"{v:.2f}" if a >= 10 else f"{v:.3f}"


def _mean(v):
    return v["mean"] if isinstance(v, dict) else v


def policy_metric_keys(results: dict) -> list[str]:
    """Metric keys in display order: rewards, gold, win rates, KL, text metrics."""
    keys: list[str] = []
    for m in results.values():
        if m.get("kind") == "policy":
            keys += [k for k in m if k != "kind" and k not in keys]
    def rank(k: str) -> int:
        return (0 if k.startswith("reward/") else 1 if k == "gold"
                else 2 if k.startswith(("win_rate/", "lc_win_rate/")) else 3 if k == "kl" else 4)

    return sorted(keys, key=lambda k: (rank(k), keys.index(k)))


def markdown_table(results: dict, settings: dict) -> str:
    """The metrics as Markdown tables (policies; reward sources), "mean [low, high]" per cell."""
    names = [n for n, m in results.items() if m.get("kind") == "policy"]

    def cell(v):
        if isinstance(v, dict) and v.get("ci_low") is not None:
            return f"{fmt(v['mean'])} [{fmt(v['ci_low'])}, {fmt(v['ci_high'])}]"
        return fmt(_mean(v)) if v is not None else "–"

    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key in policy_metric_keys(results):
        lines.append(f"| {metric_label(key, settings)} | "
                     + " | ".join("baseline" if key.startswith(("win_rate/", "lc_win_rate/")) and n == settings.get("baseline")
                                  else cell(results[n].get(key)) for n in names) + " |")
    sources = [n for n, m in results.items() if m.get("kind") == "reward_source"]
    if sources:
        lines += ["", "| reward source | pairwise accuracy | pairs |", "|---|---:|---:|"]
        lines += [f"| {n} | {cell(results[n]['pairwise_accuracy'])} | {results[n]['pairs']} |" for n in sources]
    return "\n".join(lines)


# ---------------------------------------------------------------- plots


def _color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def plot_metrics(results: dict, settings: dict, out: Path) -> Path | None:
    """Bar chart per metric, one bar per checkpoint, 95% bootstrap intervals as error bars."""
    names = [n for n, m in results.items() if m.get("kind") == "policy"]
    keys = policy_metric_keys(results)
    if not names or not keys:
        return None
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows), dpi=110, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, key in zip(axes.flat, keys):
        xs, heights, errs, colors, labels = [], [], [[], []], [], []
        for i, name in enumerate(names):
            v = results[name].get(key)
            if v is None or _mean(v) is None:
                continue
            mean = _mean(v)
            xs.append(i)
            heights.append(mean)
            colors.append(_color(i))
            labels.append(name)
            if isinstance(v, dict) and v.get("ci_low") is not None:
                errs[0].append(max(0.0, mean - v["ci_low"]))
                errs[1].append(max(0.0, v["ci_high"] - mean))
            else:
                errs[0].append(0.0)
                errs[1].append(0.0)
        has_ci = any(isinstance(results[n].get(key), dict) for n in names)
        ax.bar(xs, heights, color=colors, yerr=errs if has_ci else None, capsize=4, ecolor="#333", width=0.65)
        for x, h, up in zip(xs, heights, errs[1]):
            # Above the bar and its error bar, so the number is never crossed out.
            ax.annotate(fmt(h), (x, max(h, 0.0) + (up if h >= 0 else max(0.0, up - abs(h)))), xytext=(0, 3),
                        textcoords="offset points", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(xs, labels, fontsize=9)
        ax.set_title(metric_label(key, settings) + ("" if has_ci else "  (no interval)"), fontsize=10)
        if key.startswith("win_rate/"):
            ax.axhline(0.5, color="#888", linestyle="--", linewidth=1)
            ax.set_ylim(0, 1.15)
        elif key == "eos_rate" or key.startswith("distinct"):
            ax.set_ylim(0, 1.15)
        positive = [h for h in heights if h > 0]
        if key == "perplexity" or (key == "kl" and len(positive) > 1 and max(positive) > 30 * min(positive)):
            ax.set_yscale("symlog" if key == "kl" else "log")
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.suptitle("Metrics by checkpoint (error bars: 95% bootstrap intervals)", fontsize=11)
    path = out / "metrics.png"
    fig.savefig(path)
    return path


def plot_reward_vs_kl(results: dict, settings: dict, out: Path) -> Path | None:
    """Each scorer's mean (y) against KL to the reference (x), one labelled point per checkpoint."""
    names = [n for n, m in results.items() if m.get("kind") == "policy" and isinstance(m.get("kl"), dict)]
    scorers = [k for k in policy_metric_keys(results) if k.startswith("reward/") or k == "gold"]
    if not names or not scorers:
        return None
    fig = Figure(figsize=(4.6 * len(scorers), 3.8), dpi=110, layout="constrained")
    axes = fig.subplots(1, len(scorers), squeeze=False)[0]
    order = [n for n in results if results[n].get("kind") == "policy"]
    kls = [results[n]["kl"]["mean"] for n in names]
    for ax, key in zip(axes, scorers):
        for name in names:
            kl, y = results[name]["kl"], results[name].get(key)
            if y is None or kl["mean"] is None or y["mean"] is None:
                continue
            color = _color(order.index(name))
            ax.errorbar(kl["mean"], y["mean"],
                        xerr=[[max(0.0, kl["mean"] - kl["ci_low"])], [max(0.0, kl["ci_high"] - kl["mean"])]],
                        yerr=[[max(0.0, y["mean"] - y["ci_low"])], [max(0.0, y["ci_high"] - y["mean"])]],
                        fmt="o", color=color, markersize=8, capsize=3, label=name)
            ax.annotate(name, (kl["mean"], y["mean"]), xytext=(6, 6), textcoords="offset points", fontsize=9,
                        color=color)
        if max(kls) > 30:
            ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel(f"KL to {settings.get('reference')} (nats per response)")
        ax.set_ylabel(metric_label(key, settings))
        ax.set_title(f"{metric_label(key, settings)} vs KL", fontsize=10)
        ax.grid(alpha=0.3)
        ax.margins(0.15)
    path = out / "reward_vs_kl.png"
    fig.savefig(path)
    return path


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def plot_curves(curves: dict, out: Path) -> list[tuple[str, Path]]:
    """One PNG per stage, one panel per quantity (loss, reward, accuracy, KL, KL coefficient)."""
    paths = []
    for stage, panels in curves.items():
        fig = Figure(figsize=(4.2 * len(panels), 3.2), dpi=110, layout="constrained")
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (title, series) in zip(axes, panels.items()):
            for i, (key, points) in enumerate(series.items()):
                steps, values = zip(*points)
                ax.plot(steps, values, color=_color(i), label=key, linewidth=1.4,
                        marker="o" if len(points) <= 12 else None, markersize=3)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
        fig.suptitle(f"Training curves: {stage}", fontsize=11)
        path = out / f"curves_{_slug(stage)}.png"
        fig.savefig(path)
        paths.append((stage, path))
    return paths


# ---------------------------------------------------------------- HTML

CSS = """
:root { --fg:#1f2328; --muted:#656d76; --line:#d0d7de; --bg:#f6f8fa; --accent:#0969da; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color:var(--fg);
       background:#fff; }
header { background:#24292f; color:#fff; padding:18px 32px; }
header h1 { margin:0; font-size:22px; font-weight:600; }
header p { margin:4px 0 0; color:#c9d1d9; }
nav { position:sticky; top:0; z-index:2; background:#fff; border-bottom:1px solid var(--line); padding:8px 32px; }
nav a { color:var(--accent); margin-right:18px; text-decoration:none; font-weight:500; }
main { max-width:1280px; margin:0 auto; padding:8px 32px 48px; }
@media (max-width: 700px) { main, header, nav { padding-left:12px; padding-right:12px; } }
h2 { font-size:18px; border-bottom:1px solid var(--line); padding-bottom:6px; margin-top:32px; }
section { scroll-margin-top:44px; }  /* anchors land below the sticky nav */
.note { color:var(--muted); font-size:13px; margin:4px 0 12px; }
.scroll { overflow-x:auto; }
table.metrics { border-collapse:collapse; width:100%; margin:8px 0; }
table.metrics th, table.metrics td { border:1px solid var(--line); padding:6px 10px; text-align:right;
       vertical-align:top; }
table.metrics th:first-child, table.metrics td:first-child { text-align:left; }
table.metrics thead th { background:var(--bg); }
table.metrics tbody tr:nth-child(even) { background:#fbfcfd; }
td .ci { display:block; color:var(--muted); font-size:12px; }
td.best { font-weight:700; background:#dafbe1 !important; }
.swatch { display:inline-block; width:10px; height:10px; border-radius:2px; margin-right:6px; }
.help { cursor:help; border-bottom:1px dotted var(--muted); }
figure { margin:12px 0 24px; }
figure img { max-width:100%; border:1px solid var(--line); border-radius:6px; }
figcaption { color:var(--muted); font-size:13px; }
dl.settings { display:grid; grid-template-columns:max-content 1fr; gap:2px 16px; margin:8px 0; }
dl.settings dt { color:var(--muted); }
dl.settings dd { margin:0; font-family:ui-monospace, SFMono-Regular, Menlo, monospace; font-size:13px;
       word-break:break-all; }
.controls { display:flex; flex-wrap:wrap; gap:10px; align-items:center; margin:8px 0 12px; }
.controls input, .controls select, .controls button { font:inherit; padding:4px 8px; border:1px solid var(--line);
       border-radius:6px; background:#fff; }
.controls button { cursor:pointer; }
.controls button:disabled { opacity:0.4; cursor:default; }
.sample { border:1px solid var(--line); border-radius:8px; margin:0 0 14px; overflow:hidden; }
.sample .prompt { background:var(--bg); padding:8px 12px; border-bottom:1px solid var(--line); }
.sample .prompt b { color:var(--muted); font-weight:500; margin-right:8px; }
.responses { display:grid; gap:0; grid-template-columns:repeat(auto-fit, minmax(240px, 1fr)); }
.card { padding:8px 12px; border-right:1px solid var(--line); }
.card:last-child { border-right:none; }
.card h4 { margin:0 0 4px; font-size:13px; }
.card .text { white-space:pre-wrap; word-break:break-word; margin:0 0 6px; }
.chips span { display:inline-block; font-size:12px; background:var(--bg); border:1px solid var(--line);
       border-radius:10px; padding:0 8px; margin:0 4px 4px 0; color:var(--fg); }
.chips span.noeos { background:#fff8c5; }
.empty { color:var(--muted); font-style:italic; }
"""

JS = """
(function () {
  var items = Array.prototype.slice.call(document.querySelectorAll('.sample'));
  var search = document.getElementById('sample-search');
  var sortBy = document.getElementById('sample-sort');
  var prev = document.getElementById('sample-prev');
  var next = document.getElementById('sample-next');
  var info = document.getElementById('sample-info');
  var list = document.getElementById('sample-list');
  var perPage = 10, page = 0, shown = items;
  var keys = items.map(function (el) { return JSON.parse(el.getAttribute('data-sort')); });
  function update() {
    var q = search.value.trim().toLowerCase();
    shown = items.filter(function (el) { return !q || el.getAttribute('data-search').indexOf(q) >= 0; });
    var key = sortBy.value;
    if (key) {
      shown.sort(function (a, b) {
        var ka = keys[items.indexOf(a)][key], kb = keys[items.indexOf(b)][key];
        return (kb === null ? -Infinity : kb) - (ka === null ? -Infinity : ka);
      });
    }
    shown.forEach(function (el) { list.appendChild(el); });
    page = Math.min(page, Math.max(0, Math.ceil(shown.length / perPage) - 1));
    render();
  }
  function render() {
    items.forEach(function (el) { el.hidden = true; });
    shown.slice(page * perPage, (page + 1) * perPage).forEach(function (el) { el.hidden = false; });
    var first = shown.length ? page * perPage + 1 : 0;
    info.textContent = first + '\\u2013' + Math.min(shown.length, (page + 1) * perPage) + ' of ' + shown.length;
    prev.disabled = page === 0;
    next.disabled = (page + 1) * perPage >= shown.length;
  }
  search.addEventListener('input', function () { page = 0; update(); });
  sortBy.addEventListener('change', function () { page = 0; update(); });
  prev.addEventListener('click', function () { page -= 1; render(); });
  next.addEventListener('click', function () { page += 1; render(); });
  update();
})();
"""


def _esc(v) -> str:
    return html.escape(str(v), quote=True)


def _img(path: Path, alt: str, plot_id: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img class="plot" id="{_esc(plot_id)}" alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in prompt)


def _cell(v) -> str:
    if isinstance(v, dict):
        ci = f'<span class="ci">[{fmt(v.get("ci_low"))}, {fmt(v.get("ci_high"))}]</span>' \
            if v.get("ci_low") is not None else ""
        return f"{fmt(v.get('mean'))}{ci}"
    return fmt(v)


def _policy_table(results: dict, settings: dict) -> str:
    names = [n for n, m in results.items() if m.get("kind") == "policy"]
    head = "".join(f'<th><span class="swatch" style="background:{_color(i)}"></span>{_esc(n)}</th>'
                   for i, n in enumerate(names))
    body = []
    for key in policy_metric_keys(results):
        values = [_mean(results[n].get(key)) for n in names]
        best = None
        finite = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
        if _better(key) and len(finite) > 1 and len(set(finite)) > 1:
            best = max(finite) if _better(key) > 0 else min(finite)
        cells = []
        for n, v in zip(names, values):
            if key.startswith(("win_rate/", "lc_win_rate/")) and n == settings.get("baseline"):
                cells.append('<td class="empty">baseline</td>')
                continue
            cls = ' class="best"' if best is not None and v == best else ""
            cells.append(f"<td{cls}>{_cell(results[n].get(key))}</td>")
        arrow = {1: " ↑", -1: " ↓"}.get(_better(key), "")
        body.append(f'<tr data-metric="{_esc(key)}"><td><span class="help" title="{_esc(metric_help(key))}">'
                    f"{_esc(metric_label(key, settings))}</span>{arrow}</td>{''.join(cells)}</tr>")
    return (f'<div class="scroll"><table class="metrics" id="metrics-table"><thead><tr><th>metric</th>{head}</tr>'
            f"</thead><tbody>{''.join(body)}</tbody></table></div>")


def _reward_table(results: dict, settings: dict) -> str:
    names = [n for n, m in results.items() if m.get("kind") == "reward_source"]
    if not names:
        return ""
    rows = []
    for n in names:
        m = results[n]
        sources = " + ".join(f"{s['weight']:g} × {s['source']}" if s["weight"] != 1 else s["source"]
                             for s in settings.get("rewards", {}).get(n, []))
        trunc = (f"{m['prompt_truncated']} / {m['response_truncated']}" if "prompt_truncated" in m else "–")
        rows.append(f"<tr><td>{_esc(n)}</td><td>{_esc(sources)}</td><td>{_cell(m['pairwise_accuracy'])}</td>"
                    f"<td>{fmt(m['margin'])}</td><td>{fmt(m['pairs'])}</td><td>{trunc}</td></tr>")
    return ('<h3>Reward sources on held-out preferences</h3>'
            f'<p class="note">Every pair of <code>{_esc(settings.get("preferences"))}</code> is scored; over-long '
            "pairs lose prompt tokens from the left (never dropped). Accuracy: P(score(chosen) &gt; "
            "score(rejected)), ties count half.</p>"
            '<div class="scroll"><table class="metrics" id="reward-table"><thead><tr><th>reward source</th>'
            "<th>source</th><th>pairwise accuracy ↑</th><th>mean margin</th><th>pairs</th>"
            f"<th>truncated (prompt / response)</th></tr></thead><tbody>{''.join(rows)}</tbody></table></div>")


def _settings_list(settings: dict) -> str:
    gen = settings.get("generation", {})
    items = [
        ("checkpoints", ", ".join(f"{n} = {p}" for n, p in settings.get("checkpoints", {}).items())),
        ("prompts", f"{settings['prompts']['path']} ({settings['prompts']['count']} prompts, "
                    f"{gen.get('samples_per_prompt')} sample(s) each)"),
        ("sampling", f"temperature {gen.get('temperature')}, max_new_tokens {gen.get('max_new_tokens')}, "
                     f"seed {settings.get('seed')} (the same for every checkpoint), no top-k / top-p"),
        ("reward sources", "; ".join(f"{n} = " + " + ".join(s["source"] for s in specs)
                                     for n, specs in settings.get("rewards", {}).items()) or "–"),
        ("gold scorer", settings.get("gold") or "–"),
        ("KL reference", settings.get("reference") or "–"),
        ("win-rate baseline", settings.get("baseline") or "–"),
        ("held-out text", settings.get("text") or "–"),
        ("held-out preferences", settings.get("preferences") or "–"),
        ("intervals", f"{int(settings.get('confidence', 0.95) * 100)}% percentile bootstrap, "
                      f"{settings.get('bootstrap_samples')} resamples"),
    ]
    return '<dl class="settings">' + "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in items) + "</dl>"


def _samples_html(rows: list[dict], results: dict, settings: dict) -> str:
    names = [n for n, m in results.items() if m.get("kind") == "policy"]
    scorer_keys = [k for k in policy_metric_keys(results) if k.startswith("reward/") or k == "gold"]
    options = ['<option value="">prompt order</option>']
    for n in names:
        for k in scorer_keys:
            options.append(f'<option value="{_esc(n + "|" + k)}">{_esc(n)}: {_esc(metric_label(k, settings))}, '
                           "highest first</option>")
    items = []
    for i, row in enumerate(rows):
        cards, search, sort = [], [_prompt_text(row["prompt"])], {}
        for j, n in enumerate(names):
            r = row["responses"][n]
            search.append(r["response"])
            chips = [f"<span>{_esc(metric_label(k, settings))}: {fmt(r['scores'][k])}</span>" for k in scorer_keys]
            for k in scorer_keys:
                v = r["scores"][k]
                sort[f"{n}|{k}"] = v if isinstance(v, (int, float)) and math.isfinite(v) else None
            if r.get("kl") is not None:
                chips.append(f"<span>KL: {fmt(r['kl'])}</span>")
            chips.append(f"<span>{r['length']} tokens</span>")
            if not r["eos"]:
                chips.append('<span class="noeos" title="hit max_new_tokens without EOS">no EOS</span>')
            text = _esc(r["response"]) if r["response"].strip() else '<span class="empty">(empty)</span>'
            cards.append(f'<div class="card"><h4><span class="swatch" style="background:{_color(j)}"></span>'
                         f'{_esc(n)}</h4><p class="text">{text}</p><div class="chips">{"".join(chips)}</div></div>')
        label = f"#{row['prompt_index'] + 1}" + (f" · sample {row['sample'] + 1}"
                                                 if settings["generation"].get("samples_per_prompt", 1) > 1 else "")
        items.append(f'<div class="sample" data-search="{_esc(" ".join(search).lower())}" '
                     f"data-sort=\"{_esc(json.dumps(sort))}\"><div class=\"prompt\"><b>{label}</b>"
                     f'{_esc(_prompt_text(row["prompt"]))}</div><div class="responses">{"".join(cards)}</div></div>')
    return ('<div class="controls"><input id="sample-search" type="search" placeholder="search prompts and '
            f'responses" size="32"><select id="sample-sort">{"".join(options)}</select>'
            '<button id="sample-prev" type="button">← previous</button><span id="sample-info"></span>'
            '<button id="sample-next" type="button">next →</button></div>'
            f'<div id="sample-list">{"".join(items)}</div>')


def write_report(out: Path, results: dict, settings: dict, rows: list[dict], curves: dict,
                 extra: list[tuple[str, str, Path, str]] = ()) -> Path:
    """Write the PNGs and ``report.html`` into ``out``; returns the HTML path.
    ``extra``: more figure sections, (id, title, png, caption), after the curves."""
    out = Path(out)
    for old in out.glob("curves_*.png"):  # a re-run must not show a stage that no longer has curves
        old.unlink()
    metrics_png = plot_metrics(results, settings, out)
    scatter_png = plot_reward_vs_kl(results, settings, out)
    curve_pngs = plot_curves(curves, out)
    names = [n for n, m in results.items() if m.get("kind") == "policy"]

    sections = [("metrics", "Metrics", _policy_table(results, settings)
                 + '<p class="note">Mean with its 95% bootstrap interval below; ↑ / ↓: higher / lower is better, '
                   "the best value in green. Hover a metric's name for its definition.</p>"
                 + _reward_table(results, settings))]
    if metrics_png:
        sections.append(("bars", "Bar charts", f"<figure>{_img(metrics_png, 'metrics by checkpoint', 'plot-metrics')}"
                         "<figcaption>One panel per metric; error bars are 95% bootstrap intervals of the mean. "
                         "Win rates: the dashed line is a tie with the baseline.</figcaption></figure>"))
    if scatter_png:
        sections.append(("tradeoff", "Reward vs KL", f"<figure>{_img(scatter_png, 'reward vs KL', 'plot-reward-kl')}"
                         "<figcaption>Where each checkpoint sits between scoring well (up) and staying close to "
                         f"the reference policy, {_esc(settings.get('reference'))} (left). Bars: 95% intervals."
                         "</figcaption></figure>"))
    if curve_pngs:
        figs = "".join(f"<figure>{_img(p, f'training curves of {stage}', f'plot-curves-{_slug(stage)}')}"
                       f"<figcaption>{_esc(stage)}: from its metrics.jsonl</figcaption></figure>"
                       for stage, p in curve_pngs)
        sections.append(("curves", "Training curves", figs))
    for sid, title, png, caption in extra:
        sections.append((sid, title, f"<figure>{_img(png, title, f'plot-{sid}')}<figcaption>{_esc(caption)}"
                                     "</figcaption></figure>"))
    sections.append(("samples", "Samples", '<p class="note">The same prompts for every checkpoint, side by '
                     "side, with each response's scores.</p>" + _samples_html(rows, results, settings)))
    sections.append(("settings", "Settings", _settings_list(settings)))

    nav = "".join(f'<a href="#{sid}">{_esc(title)}</a>' for sid, title, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{_esc(title)}</h2>{content}</section>' for sid, title, content in sections)
    subtitle = (f"{len(names)} checkpoints ({', '.join(names)}) · {settings['prompts']['count']} prompts × "
                f"{settings['generation'].get('samples_per_prompt')} sample(s) · seed {settings.get('seed')}")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>rlhf eval report</title>
<style>{CSS}</style></head>
<body><header><h1>Evaluation report</h1><p>{_esc(subtitle)}</p></header>
<nav>{nav}</nav>
<main>{body}</main>
<script>{JS}</script>
</body></html>
"""
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
