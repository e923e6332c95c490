"""The baselines' comparison report (``type: baseline_report``).

Reads what the other stages wrote -- image stages' ``metrics.json`` and
pictures, an ``eval`` stage's ``metrics.json`` for the text models, and the
text training stages' throughput -- and writes into its stage dir:

- ``report.html``: one self-contained page (the eval report's stylesheet,
  pictures inlined): tables, sample grids side by side, VAE latent pictures,
  restoration panels, training curves;
- ``report.md``: the same tables in Markdown (for a README);
- ``comparison.png``: real held-out images and every model's samples, side by side;
- ``metrics.json``: the tables as data.

Nothing is trained or sampled here: the numbers are the stages' own.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from rlhf.config import opt
from rlhf.errors import BadInput
from rlhf.tracking import read_metrics

log = logging.getLogger(__name__)

IMAGE_TYPES = ("gan", "vae", "diffusion", "diffusion_dpo")


@dataclass
class Config:
    """Comparison report over baseline stages (by stage name in this recipe, or a stage dir)."""

    image_stages: list[str] = opt([], "image baseline stages (gan, vae, diffusion), in table order")
    text_eval: str | list[str] | None = opt(
        None, "eval stage(s) comparing text checkpoints (e.g. one per architecture, each with its own KL "
              "reference); checkpoints named like a stage get its training budget and throughput")
    title: str = opt("Baselines: RNN LM, GAN, VAE, diffusion", "report heading")

    def check(self, fail):
        if not self.image_stages and not self.text_evals:
            raise fail("image_stages", "nothing to report: name image stages and/or a text_eval stage")

    @property
    def text_evals(self) -> list[str]:
        if self.text_eval is None:
            return []
        return [self.text_eval] if isinstance(self.text_eval, str) else list(self.text_eval)


def _stage_dir(ref: str, ctx) -> Path:
    names = {s.name for s in ctx.recipe.stages}
    return ctx.recipe.stage_dir(ref) if ref in names else Path(ref)


def _stage_type(ref: str, ctx) -> str | None:
    for s in ctx.recipe.stages:
        if s.name == ref:
            return s.type
    import yaml

    try:
        return yaml.safe_load((Path(ref) / "config.yaml").read_text()).get("type")
    except (OSError, AttributeError, yaml.YAMLError):
        return None


def validate(cfg: Config, ctx) -> None:
    for i, ref in enumerate(cfg.image_stages):
        stype = _stage_type(ref, ctx)
        if stype not in IMAGE_TYPES:
            raise BadInput(f"stages.{ctx.name}.image_stages.{i}: '{ref}' is not a gan, vae, diffusion or "
                           "diffusion_dpo stage of this recipe, nor the dir of one")
    for i, ref in enumerate(cfg.text_evals):
        if _stage_type(ref, ctx) != "eval":
            key = "text_eval" if isinstance(cfg.text_eval, str) else f"text_eval.{i}"
            raise BadInput(f"stages.{ctx.name}.{key}: '{ref}' is not an eval stage of this recipe, nor the dir of one")


# ---------------------------------------------------------------- gathering


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise BadInput(f"{path}: not found (has that stage run?)")
    return json.loads(path.read_text())


def count_parameters(checkpoint: Path) -> int | None:
    """Parameters stored in a checkpoint's safetensors files (tied weights count once), read from headers only."""
    from safetensors import safe_open

    files = sorted(Path(checkpoint).rglob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                total += math.prod(st.get_slice(key).get_shape())
    return total


def text_rows(eval_dir: Path, ctx) -> tuple[dict, dict]:
    """(eval metrics by checkpoint, training info by checkpoint name where a stage of that name exists).

    The training budget is what makes two architectures comparable: steps,
    tokens seen and the HF Trainer's FLOPs estimate (6 x non-embedding
    parameters x tokens, ``total_flos``); wall time varies with the machine."""
    results = {k: v for k, v in _read_json(eval_dir / "metrics.json").items() if v.get("kind") == "policy"}
    reference = _read_json(eval_dir / "settings.json").get("reference")
    for m in results.values():
        m.setdefault("kl_reference", reference)
    training = {}
    for name in results:
        stage = _stage_dir(name, ctx)
        rows = read_metrics(stage / "metrics.jsonl")
        runtime = [r for r in rows if "train/runtime" in r]
        info = {"type": _stage_type(name, ctx)}
        ppo_steps = [r for r in rows if "perf/step_s" in r]
        if runtime:  # HF Trainer stages (sft, rnn_lm)
            info["train_s"] = runtime[-1]["train/runtime"]
            info["samples_per_s"] = runtime[-1].get("train/samples_per_second")
            info["steps"] = runtime[-1].get("step")
            # TRL logs the running token count on logging rows, HF the FLOPs on the last one.
            info["tokens"] = max((int(r["train/num_tokens"]) for r in rows if "train/num_tokens" in r), default=None)
            info["flops"] = runtime[-1].get("train/total_flos")
            examples = _read_json(stage / "metrics.json").get("train/examples") if (stage / "metrics.json").is_file() \
                else None
            if examples and runtime[-1].get("train/epoch") is not None:
                info["samples"] = round(runtime[-1]["train/epoch"] * examples)
        elif ppo_steps:  # our PPO trainer: rollout samples per second
            info["train_s"] = sum(r["perf/step_s"] for r in ppo_steps)
            info["samples_per_s"] = sum(r["perf/samples_per_s"] for r in ppo_steps) / len(ppo_steps)
            info["steps"] = ppo_steps[-1]["step"]
            info["samples"] = ppo_steps[-1].get("train/episodes")  # generated responses trained on
        if (stage / "final").is_dir():
            info["params"] = count_parameters(stage / "final")
        training[name] = info
    return results, training


# ---------------------------------------------------------------- formatting


def fmt(v, digits: int | None = None) -> str:
    from rlhf.evaluation.report import fmt as eval_fmt

    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if digits is not None:
        return f"{v:.{digits}f}"
    return eval_fmt(v)


def _mean(v):
    return v.get("mean") if isinstance(v, dict) else v


# (row key, header, decimals, scale): KID is shown x 10^3, as is usual.
IMAGE_COLUMNS = [
    ("params", "params", None, 1), ("train_s", "train time (s)", 0, 1), ("steps", "steps", None, 1),
    ("fd", "FD ↓", 3, 1), ("kid", "KID ×10³ ↓", 2, 1e3), ("fd_classifier", "FD, classifier view ↓", 3, 1),
    ("precision", "precision ↑", 3, 1), ("recall", "recall ↑", 3, 1),
    ("class_entropy", "class entropy (bits)", 2, 1), ("near_copy_rate", "near-copy rate (pixels, ±2 px shifts)", 3, 1),
    ("feature_copy_rate", "near-copy rate (features)", 3, 1), ("sample_s", "sampling time (s)", 2, 1),
]
# Metrics whose model-vs-model order the report states in words: (row key, name, better).
RANKED = [("fd", "FD", "lower"), ("kid", "KID", "lower"), ("fd_classifier", "FD (classifier view)", "lower"),
          ("precision", "precision", "higher"), ("recall", "recall", "higher")]


def _interval(row: dict, key: str) -> tuple[float, float] | None:
    """The row's 95% interval of ``key``, or its single value as [v, v] (the floor), or None."""
    v = row.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return None
    lo, hi = row.get(f"{key}_low"), row.get(f"{key}_high")
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and math.isfinite(lo) and math.isfinite(hi):
        return float(lo), float(hi)
    return float(v), float(v)


def image_cell(row: dict, key: str, digits: int | None, scale: float = 1) -> str:
    """``mean ± half-width`` of the 95% interval where the row has one, else the plain value."""
    v, iv = row.get(key), _interval(row, key)
    if iv is None or iv[0] == iv[1] or digits is None:
        return fmt(v * scale if isinstance(v, float) else v, digits)
    return f"{v * scale:.{digits}f} ± {(iv[1] - iv[0]) / 2 * scale:.{digits}f}"


def image_table(stages: dict[str, dict]) -> list[dict]:
    """One row per model, then the floor and the trivial baseline (from the first stage: same data, same
    classifier). Each model row's ``indistinguishable`` names, per metric of ``RANKED``, the other rows
    whose 95% interval overlaps its own (the floor, one fixed set, counts as its single value)."""
    rows = []
    for name, m in stages.items():
        rows.append({"model": name, "kind": "model", "params": m.get("model/params"), "train_s": m.get("perf/train_s"),
                     "steps": m.get("train/steps"), "sample_s": m.get("perf/sample_s"),
                     **{k.split("/", 1)[1]: v for k, v in m.items() if k.startswith("image/")}})
    first = next(iter(stages.values()))
    rows.append({"model": "real held-out images (floor)", "kind": "floor",
                 **{k.split("/", 1)[1]: v for k, v in first.items() if k.startswith("floor/")}})
    rows.append({"model": "per-pixel Gaussian noise (trivial)", "kind": "trivial",
                 **{k.split("/", 1)[1]: v for k, v in first.items() if k.startswith("noise/")}})
    noise = rows[-1]
    for r in rows:
        if r["kind"] != "model":
            continue
        mine, theirs = _interval(r, "fd"), _interval(noise, "fd")
        r["beats_noise"] = mine is not None and theirs is not None and mine[1] < theirs[0]
        r["indistinguishable"] = {}
        for key, _, _ in RANKED:
            iv = _interval(r, key)
            r["indistinguishable"][key] = [o["model"] for o in rows if o is not r and iv is not None
                                           and (ov := _interval(o, key)) is not None
                                           and ov[0] <= iv[1] and iv[0] <= ov[1]]
    return rows


def image_rankings(rows: list[dict]) -> list[str]:
    """One sentence per metric of ``RANKED``: the models best first, ``, then`` between neighbours whose
    95% intervals are disjoint (distinguishable), ``≈`` where they overlap (not distinguishable at this
    many sampling seeds: not ranked); then every overlapping pair of models by name, and the models whose
    interval reaches the floor (real held-out images) or the noise baseline."""
    out = []
    floor = next((r for r in rows if r["kind"] == "floor"), None)
    noise = next((r for r in rows if r["kind"] == "trivial"), None)
    for key, name, better in RANKED:
        ranked = [(r, iv) for r in rows if r["kind"] == "model" and (iv := _interval(r, key)) is not None]
        if not ranked:
            continue
        ranked.sort(key=lambda t: t[0][key], reverse=better == "higher")
        chain = ranked[0][0]["model"]
        for (_, a), (r, b) in zip(ranked, ranked[1:]):
            chain += (" ≈ " if a[0] <= b[1] and b[0] <= a[1] else ", then ") + r["model"]
        models = [r for r, _ in ranked]
        ties = [f"{a['model']} and {b['model']}" for i, a in enumerate(models) for b in models[i + 1:]
                if b["model"] in a.get("indistinguishable", {}).get(key, [])]
        text = f"{name} ({better} is better), models best first: {chain}."
        if len(models) > 1:
            text += f" Not distinguishable: {'; '.join(ties)}." if ties else " Every pair of models is distinguishable."
        for ref, what in ((floor, "real held-out images (the floor)"), (noise, "the noise baseline")):
            same = [r["model"] for r in models
                    if ref is not None and ref["model"] in r["indistinguishable"].get(key, [])]
            if same:
                text += f" Not distinguishable from {what}: {', '.join(same)}."
        out.append(text)
    return out


IMAGE_NOTE = (
    "Each model draws as many images as there are held-out real ones, once per sampling seed; a cell is the mean "
    "± the half-width of the t-based 95% confidence interval over those seeds (the floor row is one fixed set: "
    "no interval). Where two intervals overlap the metric does not tell the two apart at this many seeds: the "
    "ranking sentences say so (≈) instead of ranking them. Features: the penultimate layers of {nets} small CNNs "
    "trained (with shift and blur augmentation, fixed seeds and thread count) on the training images, held-out "
    "accuracy {acc}, cached. FD and KID (unbiased MMD² with the cubic kernel; Bińkowski et al. 2018) use the "
    "content view (each network's features scaled to a fixed length: which digit shape, not the classifier's "
    "confidence); the classifier view keeps the confidence, which separates near-real generators but ranks "
    "blurred digits below noise. Precision / recall: k-NN manifolds (Kynkäänniemi et al. 2019) in the content "
    "view. Class entropy: of the networks' mean prediction (max {hmax} bits). Near-copy rate: share of samples "
    "closer to a training image than 95% of held-out images are (real data: 0.05) -- in pixels, over ±2-pixel "
    "translations of the training images, and in content features.")


RESTORE_TASKS = [("denoise", "denoising"), ("inpaint", "inpainting")]


def restoration_table(diffusion: dict) -> list[dict]:
    rows = []
    for method, label in (("input", "corrupted input"), ("diffusion", "diffusion"), ("vae", "VAE reconstruction")):
        if f"restore/denoise/{method}_psnr" not in diffusion:
            continue
        row = {"method": label}
        for task, _ in RESTORE_TASKS:
            row[f"{task}_psnr"] = diffusion.get(f"restore/{task}/{method}_psnr")
            row[f"{task}_ssim"] = diffusion.get(f"restore/{task}/{method}_ssim")
        row["inpaint_hole_psnr"] = diffusion.get(f"restore/inpaint/{method}_hole_psnr")
        rows.append(row)
    return rows


TEXT_COLUMNS = [
    ("params", "params"), ("steps", "train steps"), ("samples", "train samples"), ("tokens", "train tokens"),
    ("flops", "train FLOPs (est.)"),
    ("train_s", "train time (s)"), ("perplexity", "held-out perplexity ↓"), ("gold", "gold score ↑"),
    ("reward", "reward ↑"), ("kl", "KL to own start"), ("distinct_2", "distinct-2"),
    ("response_length", "response length"),
]
# Columns with a 95% bootstrap interval over the eval prompts (the eval stage's `ci`).
TEXT_INTERVALS = ("gold", "reward", "kl", "response_length")


def text_table(results: dict, training: dict) -> list[dict]:
    rows = []
    for name, m in results.items():
        info = training.get(name, {})
        rewards = [k for k in m if k.startswith("reward/")]
        stats = {"gold": m.get("gold"), "reward": m[rewards[0]] if rewards else None, "kl": m.get("kl"),
                 "response_length": m.get("response_length")}
        row = {"model": name, "type": info.get("type"), "params": info.get("params"), "steps": info.get("steps"),
               "samples": info.get("samples"), "tokens": info.get("tokens"), "flops": info.get("flops"),
               "train_s": info.get("train_s"),
               "samples_per_s": info.get("samples_per_s"), "perplexity": m.get("perplexity"),
               "reward_name": rewards[0].split("/", 1)[1] if rewards else None,
               "kl_reference": m.get("kl_reference"), "distinct_2": m.get("distinct_2"),
               "eos_rate": _mean(m.get("eos_rate"))}
        for key, v in stats.items():
            row[key] = _mean(v)
            if isinstance(v, dict) and "ci_low" in v:
                row[f"{key}_ci"] = [v["ci_low"], v["ci_high"]]
        rows.append(row)
    return rows


def text_cell(row: dict, key: str) -> str:
    """A text-table cell: the value, and its 95% interval where the eval stage gave one."""
    if key == "flops" and isinstance(row.get(key), (int, float)):
        return f"{row[key]:.2e}"
    ci = row.get(f"{key}_ci")
    if ci is None:
        return fmt(row.get(key))
    return f"{fmt(row.get(key))} [{fmt(ci[0])}, {fmt(ci[1])}]"


def distinguishable(a: dict, b: dict, key: str = "gold") -> bool | None:
    """Whether two text rows' 95% intervals on ``key`` are disjoint (None: no intervals).
    Disjoint intervals are a conservative test; overlapping ones are reported as
    "not distinguishable" rather than ranked."""
    ca, cb = a.get(f"{key}_ci"), b.get(f"{key}_ci")
    if ca is None or cb is None:
        return None
    return ca[1] < cb[0] or cb[1] < ca[0]


def text_verdicts(rows: list[dict], key: str = "gold") -> list[str]:
    """One sentence per pair of text models on ``key``: which is higher, or that they are not distinguishable."""
    out = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            d = distinguishable(a, b, key)
            if d is None:
                continue
            if d:
                hi, lo = (a, b) if a[key] > b[key] else (b, a)
                out.append(f"{hi['model']} > {lo['model']} on {key} (95% intervals disjoint)")
            else:
                out.append(f"{a['model']} and {b['model']}: not distinguishable on {key} (95% intervals overlap)")
    return out


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(image_rows: list[dict], restore_rows: list[dict], text: list[dict], meta: dict) -> str:
    parts = []
    if image_rows:
        parts.append(f"Image models on {meta.get('data')} (metrics vs the training images; mean ± 95% CI over "
                     f"{fmt(image_rows[0].get('sampling_seeds'))} sampling seeds):\n")
        parts.append(_markdown(["model"] + [label for _, label, _, _ in IMAGE_COLUMNS],
                               [[r["model"]] + [image_cell(r, k, d, sc) for k, _, d, sc in IMAGE_COLUMNS]
                                for r in image_rows]))
        parts.append("\n" + "\n".join(f"- {line}" for line in image_rankings(image_rows)))
        parts.append("\n" + IMAGE_NOTE.format(nets=fmt(meta.get("classifier_nets")),
                                               acc=fmt(meta.get("classifier_accuracy"), 3),
                                               hmax=fmt(meta.get("class_entropy_max"), 2)) + "\n")
    if restore_rows:
        parts.append("\nRestoration of held-out images (mean PSNR dB / SSIM vs the clean image):\n")
        parts.append(_markdown(["method", "denoising PSNR", "denoising SSIM", "inpainting PSNR", "inpainting SSIM",
                                "hole PSNR"],
                               [[r["method"], fmt(r["denoise_psnr"], 2), fmt(r["denoise_ssim"], 3),
                                 fmt(r["inpaint_psnr"], 2), fmt(r["inpaint_ssim"], 3), fmt(r["inpaint_hole_psnr"], 2)]
                                for r in restore_rows]))
    if text:
        parts.append("\nText models (same data, tokenizer and training budget; [95% bootstrap interval] over the "
                     "eval prompts; KL in nats per response to the model PPO started from):\n")
        parts.append(_markdown(["model"] + [label for _, label in TEXT_COLUMNS],
                               [[r["model"]] + [text_cell(r, k) for k, _ in TEXT_COLUMNS] for r in text]))
        verdicts = text_verdicts(text)
        if verdicts:
            parts.append("\nOn the gold score:\n" + "\n".join(f"- {v}" for v in verdicts))
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- pictures


def comparison_picture(held, stage_dirs: dict[str, Path], fds: dict[str, float], out: Path, n: int = 36) -> Path:
    """Real held-out images beside each model's samples (the first ``n`` of each, 6 per row)."""
    from matplotlib.figure import Figure
    from safetensors.torch import load_file

    from rlhf.baselines.images import to_uint8_grid

    scale = max(1, 32 // held.shape[-1])
    panels = [("real (held-out)", to_uint8_grid(held[:n], nrow=6, scale=scale))]
    for name, d in stage_dirs.items():
        samples = load_file(d / "samples.safetensors")["images"]
        panels.append((f"{name} (FD {fds[name]:.2f})", to_uint8_grid(samples[:n], nrow=6, scale=scale)))
    fig = Figure(figsize=(3.4 * len(panels), 3.7), dpi=120, layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, img) in zip(axes, panels):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.savefig(out)
    return out


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _html_table(header: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(f'<tr class="{c}">' + "".join(f"<td>{html.escape(v)}</td>" for v in r) + "</tr>"
                   for r, c in zip(rows, classes or [""] * len(rows)))
    return (f'<div class="scroll"><table class="metrics"><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
            "</table></div>")


def _figure(path: Path, caption: str) -> str:
    if not path.is_file():
        return ""
    return f"<figure>{_img(path, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>"


def write_html(out: Path, title: str, image_rows, restore_rows, text, meta, stage_dirs: dict[str, Path],
               types: dict[str, str], text_curves: list[tuple[str, Path]]) -> Path:
    from rlhf.evaluation.report import CSS

    sections = []
    if image_rows:
        table = _html_table(["model"] + [label for _, label, _, _ in IMAGE_COLUMNS] + ["beats noise on FD"],
                            [[r["model"]] + [image_cell(r, k, d, sc) for k, _, d, sc in IMAGE_COLUMNS]
                             + [fmt(r.get("beats_noise")) if r["kind"] == "model" else ""] for r in image_rows],
                            [r["kind"] for r in image_rows])
        ranks = "".join(f"<li>{html.escape(line)}</li>" for line in image_rankings(image_rows))
        note = (f"<ul>{ranks}</ul><p class=\"note\">Data: {html.escape(str(meta.get('data')))}. "
                + html.escape(IMAGE_NOTE.format(nets=fmt(meta.get("classifier_nets")),
                                                acc=fmt(meta.get("classifier_accuracy"), 3),
                                                hmax=fmt(meta.get("class_entropy_max"), 2)))
                + " Params: the generator only (for the GAN, the discriminator is extra). Beats noise on FD: "
                  "the model's FD interval lies entirely below the noise baseline's.</p>")
        sections.append(("images", "Image models", table + note))
        grids = _figure(out / "comparison.png", "Real held-out images and each model's samples (same count, seed)")
        for name, d in stage_dirs.items():
            grids += _figure(d / "nearest_train.png", f"{name}: samples (odd rows) above their nearest training "
                                                      "image (even rows): the memorisation check by eye")
        sections.append(("samples", "Samples", grids))
        latent = ""
        for name, d in stage_dirs.items():
            if types[name] == "vae":
                latent += _figure(d / "reconstructions.png", f"{name}: held-out images (odd rows) and their "
                                                             "reconstructions (even rows)")
                latent += _figure(d / "interpolations.png", f"{name}: interpolations between held-out images "
                                                            "(first and last column real; between: decoded steps)")
                latent += _figure(d / "variations.png", f"{name}: variations of held-out images (first column) "
                                                        "decoded from nearby latents")
            if types[name] == "gan":
                latent += _figure(d / "latent_walk.png", f"{name}: each row walks linearly between two latents")
        if latent:
            sections.append(("latent", "Latent spaces", latent))
    if restore_rows:
        table = _html_table(["method", "denoising PSNR (dB)", "denoising SSIM", "inpainting PSNR (dB)",
                             "inpainting SSIM", "hole PSNR (dB)"],
                            [[r["method"], fmt(r["denoise_psnr"], 2), fmt(r["denoise_ssim"], 3),
                              fmt(r["inpaint_psnr"], 2), fmt(r["inpaint_ssim"], 3), fmt(r["inpaint_hole_psnr"], 2)]
                             for r in restore_rows])
        figs = "".join(_figure(d / f"restoration_{task}.png", f"{name}: {label} of held-out images")
                       for name, d in stage_dirs.items() if types[name] == "diffusion" for task, label in RESTORE_TASKS)
        note = ("<p class=\"note\">Held-out images, never trained on. Denoising: Gaussian noise added (the input's "
                "scores are of the unclipped noisy image); the diffusion model starts DDIM at the matching noise "
                "level. Inpainting: a central square hole; RePaint. The VAE reconstructs the same corrupted input "
                "(for inpainting, observed pixels pasted back). Hole PSNR: over the missing pixels only.</p>")
        sections.append(("restoration", "Restoration", table + note + figs))
    if text:
        reward = next((r["reward_name"] for r in text if r.get("reward_name")), None)
        header = ["model"] + [label.replace("reward ↑", f"reward ({reward}) ↑") for _, label in TEXT_COLUMNS]
        table = _html_table(header, [[r["model"]] + [text_cell(r, k) for k, _ in TEXT_COLUMNS] for r in text])
        verdicts = "".join(f"<li>{html.escape(v)}</li>" for v in text_verdicts(text))
        note = ("<p class=\"note\">From the eval stages (same prompts, sampling seed and settings for every "
                "checkpoint; [95% bootstrap intervals] over the prompts; KL per response to the model PPO started "
                "from) and each model's training stage: the budget is steps and tokens (the FLOPs estimate is the "
                "HF Trainer's 6 x non-embedding parameters x tokens); wall time depends on the machine.</p>"
                + (f"<ul>{verdicts}</ul>" if verdicts else ""))
        sections.append(("text", "Text models", table + note + "".join(_figure(p, f"training curves: {s}")
                                                                     for s, p in text_curves)))
    curves = "".join(_figure(d / f"curves_{name}.png", f"{name}: training curves") for name, d in stage_dirs.items())
    if curves:
        sections.append(("curves", "Image training curves", curves))
    nav = "".join(f'<a href="#{sid}">{html.escape(t)}</a>' for sid, t, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{html.escape(t)}</h2>{c}</section>' for sid, t, c in sections)
    extra_css = "tr.floor td, tr.trivial td { color: var(--muted); font-style: italic; }"
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}{extra_css}</style></head><body><header><h1>{html.escape(title)}</h1>"
            f"<p>{html.escape(meta.get('subtitle', ''))}</p></header><nav>{nav}</nav><main>{body}</main>"
            "</body></html>\n")
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


# ---------------------------------------------------------------- the stage


def train(cfg: Config, ctx) -> Path:
    final = ctx.stage_dir / "final"
    if not ctx.is_main:
        return final
    out = ctx.stage_dir
    out.mkdir(parents=True, exist_ok=True)
    image_metrics = {ref: _read_json(_stage_dir(ref, ctx) / "metrics.json") for ref in cfg.image_stages}
    stage_dirs = {ref: _stage_dir(ref, ctx) for ref in cfg.image_stages}
    types = {ref: _stage_type(ref, ctx) for ref in cfg.image_stages}
    image_rows = image_table(image_metrics) if image_metrics else []
    diffusion = next((m for ref, m in image_metrics.items() if types[ref] == "diffusion"), None)
    restore_rows = restoration_table(diffusion) if diffusion else []
    text, text_curves = [], []
    if cfg.text_evals:
        results, training = {}, {}
        for ref in cfg.text_evals:
            r, t = text_rows(_stage_dir(ref, ctx), ctx)
            for name in r:  # the same checkpoint name in two evals: keep both, named by their eval
                key = f"{name} ({ref})" if name in results else name
                results[key], training[key] = r[name], t.get(name, {})
        text = text_table(results, training)
        from rlhf.evaluation.report import plot_curves, read_curves

        run_dir = Path(ctx.recipe.run.output_dir)
        curves = {k: v for k, v in read_curves(run_dir).items() if k in training and training[k].get("type")}
        text_curves = plot_curves(curves, out)
    first = next(iter(image_metrics.values()), {})
    keys = {m.get("classifier/key") for m in image_metrics.values()}
    if len(keys) > 1:
        log.warning("baseline report: the image stages used different feature classifiers (%s): their metrics "
                    "do not compare", ", ".join(sorted(map(str, keys))))
    meta = {"data": first.get("data/description"), "classifier_accuracy": first.get("classifier/held_out_accuracy"),
            "class_entropy_max": first.get("image/class_entropy_max"), "classifier_nets": first.get("classifier/nets"),
            "subtitle": " · ".join(filter(None, [first.get("data/description"),
                                                 f"seed {ctx.seed}", f"run {ctx.recipe.run.output_dir}"]))}
    if image_metrics:
        from rlhf.baselines.images import as_image_data, load_images

        # The real images are the ones the stages held out (same source, same seed).
        stage_cfg = next(s.config for s in ctx.recipe.stages if s.name in stage_dirs) \
            if any(s.name in stage_dirs for s in ctx.recipe.stages) else None
        if stage_cfg is not None:
            held = load_images(as_image_data(stage_cfg.data), ctx.seed).held
            comparison_picture(held, stage_dirs, {n: m["image/fd"] for n, m in image_metrics.items()},
                               out / "comparison.png")
    (out / "report.md").write_text(markdown(image_rows, restore_rows, text, meta), encoding="utf-8")
    (out / "metrics.json").write_text(json.dumps({"images": image_rows, "restoration": restore_rows, "text": text,
                                                  "meta": meta}, indent=2) + "\n")
    page = write_html(out, cfg.title, image_rows, restore_rows, text, meta, stage_dirs, types, text_curves)
    from rlhf.tracking import MetricsLogger

    logger = MetricsLogger(out, ctx.name, ctx.report_to, project=ctx.recipe.run.wandb_project)
    flat = {f"report/{r['model']}/{k}": r[k] for r in image_rows for k in ("fd", "precision", "recall")
            if isinstance(r.get(k), (int, float))}
    flat.update({f"report/{r['model']}/{k}": r[k] for r in text for k in ("perplexity", "gold")
                 if isinstance(r.get(k), (int, float))})
    logger.log(flat, step=0)
    logger.close()
    tmp = final.with_name("final.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "outputs.json").write_text(json.dumps({"report": "../report.html", "markdown": "../report.md",
                                                  "metrics": "../metrics.json"}, indent=2) + "\n")
    tmp.rename(final)
    log.info("baseline report: %s", page)
    return final
