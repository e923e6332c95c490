"""Evaluation stage (``type: eval``) and the engine behind ``rlhf eval``.

For every named policy checkpoint, in order:

  1. sample    ``samples_per_prompt`` responses per prompt with the recorded
               settings; the sampling seed is reset for each checkpoint, so all
               of them draw from the same random numbers
  2. KL        log pi(y|x) - log pi_ref(y|x) summed over the sampled tokens:
               a Monte-Carlo estimate of KL(pi || pi_ref) per sequence
  3. text      perplexity on a held-out text set; distinct-1/2, response
               length and EOS rate of the samples
  4. score     every reward source and the gold scorer on (prompt, response)

then win rates against the baseline by each scorer (ties count half),
reward-model pairwise accuracy on held-out preferences (every pair, over-long
ones truncated as in the reward stage), 95% bootstrap intervals for every
mean, and the files: ``metrics.json`` (checkpoint name -> metric),
``settings.json``, ``samples.jsonl``, PNG plots and ``report.html``.

Same checkpoints, data and seed give an identical ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from rlhf.config import opt, require_positive, to_dict
from rlhf.data import (normalize_preferences, normalize_prompts, normalize_sft, read_records, render_prompt)
from rlhf.errors import BadInput
from rlhf.evaluation import metrics as M
from rlhf.evaluation.overopt import OveroptConfig
from rlhf.models import (ModelConfig, as_model_config, context_length, is_preset, load_causal_lm,
                         load_tokenizer)
from rlhf.rewards import CombinedReward, RewardSpec, as_specs, check_source
from rlhf.sampling import Samples, SamplingConfig, sample

log = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")  # "gpt2", "org/model": anything with more slashes is a path


@dataclass
class EvalData:
    """A held-out data file or hub dataset. A plain string in a recipe is `path`."""

    path: str = opt("", "local .jsonl/.json/.csv/.parquet file, or a hub dataset name")
    split: str = opt("test", "split to read when `path` is a hub dataset")
    columns: dict[str, str] = opt({}, "rename columns to the expected names, e.g. {prompt: question}")
    max_samples: int | None = opt(None, "use only the first N records")

    def check(self, fail):
        if not self.path:
            raise fail("path", "required: a data file or a hub dataset name")
        if self.max_samples is not None and self.max_samples < 1:
            raise fail("max_samples", f"expected a positive integer, got {self.max_samples}")


@dataclass
class Config:
    """Eval stage: compare policy checkpoints on one prompt set."""

    checkpoints: dict[str, str | ModelConfig] = opt(
        {}, "name -> policy: checkpoint dir, hub id, or a preset (e.g. tiny: the random-init, untrained policy)")
    prompts: str | EvalData = opt("", "prompts to sample from (JSONL with `prompt`), or an EvalData mapping")
    rewards: dict[str, str | RewardSpec | list[str | RewardSpec]] = opt(
        {}, "name -> reward source: reward-model dir, module:function, or a weighted list of them")
    gold: str | None = opt(None, "gold scorer (module:function or reward-model dir), e.g. rlhf.gold:vader_sentiment")
    reference: str | None = opt(None, "KL reference: a name in `checkpoints`, or a model dir / preset; null = no KL")
    baseline: str | None = opt(None, "name in `checkpoints` the others' win rates are against; null = none")
    text: str | EvalData | None = opt(
        None, "held-out text for perplexity (prompt/completion: completion tokens; text; messages); null = skip")
    preferences: str | EvalData | None = opt(
        None, "held-out preference pairs for each reward source's pairwise accuracy (every pair); null = skip")
    max_length: int | None = opt(
        None, "tokens per prompt + response for perplexity, and for reward models instead of the length each "
              "was trained with (a warning names both); longer ones lose prompt tokens from the left "
              "(default: each model's own)")
    generation: SamplingConfig = opt(SamplingConfig(), "sampling settings")
    bootstrap_samples: int = opt(1000, "bootstrap resamples for the 95% intervals")
    run_dir: str | None = opt(None, "plot training curves from <run_dir>/<stage>/metrics.jsonl "
                                    "(default: the recipe's output_dir); '' = no curves")
    overoptimisation: OveroptConfig | None = opt(
        None, "gold and proxy vs sqrt(KL) for a PPO stage's watch points and for best-of-n, with Gao et al.'s "
              "fits (needs gold, a reward source and run_dir); null = off")

    def check(self, fail):
        if not self.checkpoints:
            raise fail("checkpoints", "required: at least one name -> checkpoint (e.g. {sft: runs/x/sft/final})")
        if self.prompts == "":
            raise fail("prompts", "required: a prompts file (JSONL with a `prompt` field)")
        for group in ("checkpoints", "rewards"):
            for name in getattr(self, group):
                if not NAME.match(name):
                    raise fail(f"{group}.{name}", "names use letters, digits, '_', '.', '-' "
                                                  "and start with a letter or digit")
        for name in self.rewards:
            if name in self.checkpoints or name == "gold":
                raise fail(f"rewards.{name}", "a reward source needs a name unlike every checkpoint's "
                                              "and unlike 'gold'")
        for name, spec in self.rewards.items():
            if not as_specs(spec) or not all(s.source for s in as_specs(spec)):
                raise fail(f"rewards.{name}", "expected a reward-model dir or module:function (or a list)")
        if self.baseline is not None and self.baseline not in self.checkpoints:
            raise fail("baseline", f"{self.baseline!r} is not one of the checkpoints "
                                   f"({', '.join(self.checkpoints)})")
        if self.reference == "":
            raise fail("reference", "expected a checkpoint name or a model dir / preset (or null)")
        if self.max_length is not None and self.max_length < 4:
            raise fail("max_length", f"expected >= 4, got {self.max_length}")
        if self.bootstrap_samples < 100:
            raise fail("bootstrap_samples", f"expected >= 100, got {self.bootstrap_samples}")
        o = self.overoptimisation
        if o is not None:
            if not self.gold or not self.rewards:
                raise fail("overoptimisation", "needs `gold` and at least one of `rewards` (the proxy)")
            if o.reward is not None and o.reward not in self.rewards:
                raise fail("overoptimisation.reward", f"{o.reward!r} is not one of rewards ({', '.join(self.rewards)})")
            policy = o.policy or self.reference
            if policy not in self.checkpoints:
                raise fail("overoptimisation.policy", "expected a name in `checkpoints` (or set `reference` to one)")


def as_data(value: str | EvalData | None) -> EvalData | None:
    return EvalData(path=value) if isinstance(value, str) else value


# ---------------------------------------------------------------- inputs


def _load_prompts(data: EvalData) -> tuple[list, list]:
    records = read_records(data.path, data.split, data.columns, data.max_samples)
    return records, normalize_prompts(records)


def _load_text(data: EvalData) -> list[dict]:
    records = read_records(data.path, data.split, data.columns, data.max_samples)
    rows = normalize_sft(records)
    for rec, row in zip(records, rows):
        if "messages" in row and len(row["messages"]) < 2:
            raise BadInput(f"{rec.where}: a conversation for perplexity needs a message before the last one")
    return rows


def _load_preferences(data: EvalData) -> list[dict]:
    records = read_records(data.path, data.split, data.columns, data.max_samples)
    return normalize_preferences(records, "error")[0]


def _reference_model(cfg: Config) -> ModelConfig | None:
    if cfg.reference is None:
        return None
    if cfg.reference in cfg.checkpoints:
        return as_model_config(cfg.checkpoints[cfg.reference])
    return ModelConfig(name=cfg.reference)


def _check_model(model: ModelConfig, label: str, producible: Callable[[str], bool]) -> bool:
    """Raise BadInput unless ``model`` is a preset, a checkpoint dir (existing or
    one an earlier stage makes) or looks like a hub id. Returns whether its
    tokenizer can be read now."""
    name = model.name
    if is_preset(name) or Path(name).is_dir():
        return True
    if producible(name):
        return False
    looks_local = name.startswith((".", "/", "~")) or not HUB_ID.match(name)
    if looks_local:
        raise BadInput(f"{label}: '{name}' is not a checkpoint directory (nor a preset: "
                       f"tiny, tiny-large, mini-30m)")
    return False  # a hub id: checked when it loads


def check_inputs(cfg: Config, label: Callable[[str], str], producible: Callable[[str], bool] = lambda s: False,
                 stand_in: Callable[[ModelConfig], ModelConfig] = lambda m: m) -> None:
    """Check every input without loading weights; raise BadInput naming the key.

    ``label(key)`` renders a config key for messages (``stages.eval.gold`` or
    ``--gold``); ``producible(path)`` says whether an earlier recipe stage will
    create a checkpoint; ``stand_in(model)`` gives the model whose tokenizer
    and context stand in for one that does not exist yet.
    """
    prompt_data = as_data(cfg.prompts)
    _, prompts = _load_prompts(prompt_data)
    for name, model in cfg.checkpoints.items():
        model = as_model_config(model)
        if not _check_model(model, label(f"checkpoints.{name}"), producible):
            model = stand_in(model)
            if not (is_preset(model.name) or Path(model.name).is_dir()):
                continue
        tok = load_tokenizer(model)
        limit = context_length(model)
        if limit is None:
            continue
        longest = max(len(tok(render_prompt(tok, p), add_special_tokens=False, verbose=False)["input_ids"])
                      for p in prompts)
        if longest + cfg.generation.max_new_tokens > limit:
            raise BadInput(f"{prompt_data.path}: the longest prompt is {longest} tokens for checkpoint '{name}'; "
                           f"with max_new_tokens={cfg.generation.max_new_tokens} it exceeds the model's "
                           f"context of {limit}")
    if cfg.reference is not None and cfg.reference not in cfg.checkpoints:
        _check_model(ModelConfig(name=cfg.reference), label("reference"), producible)
    for name, spec in cfg.rewards.items():
        for s in as_specs(spec):
            try:
                check_source(s.source, producible)
            except BadInput as e:
                raise BadInput(f"{label(f'rewards.{name}')}: {e}") from None
    if cfg.gold:
        try:
            check_source(cfg.gold, producible)
        except BadInput as e:
            raise BadInput(f"{label('gold')}: {e}") from None
    if cfg.text is not None:
        _load_text(as_data(cfg.text))
    if cfg.preferences is not None:
        _load_preferences(as_data(cfg.preferences))


# ---------------------------------------------------------------- model passes


def _ppl_pair(tok, row: dict) -> tuple[list[int], list[int]]:
    """(conditioning ids, scored ids) of one held-out text row."""
    from rlhf.rewards import encode_response

    if "prompt" in row:
        return encode_response(tok, row["prompt"], row["completion"])
    if "messages" in row:
        return encode_response(tok, row["messages"][:-1], row["messages"][-1:])
    ids = tok(row["text"] if isinstance(row["text"], str) else render_prompt(tok, row["text"]),
              add_special_tokens=False, verbose=False)["input_ids"] + [tok.eos_token_id]
    return ids[:1], ids[1:]  # the first token conditions the rest


@torch.no_grad()
def text_perplexity(model, tok, rows: list[dict], max_length: int, batch_size: int, device) -> float:
    """Perplexity of ``model`` on the scored tokens of every row (one pass, no row dropped)."""
    from rlhf.ppo.core import logprobs_from_logits
    from rlhf.rewards import truncate_pair

    seqs = []
    for row in rows:
        p_ids, r_ids = _ppl_pair(tok, row)
        ids = truncate_pair(p_ids, r_ids, max_length)
        seqs.append((ids, len(ids) - min(len(r_ids), len(ids) - 1)))  # (tokens, first scored position)
    nll, count = 0.0, 0
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        width = max(len(s) for s, _ in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        scored = torch.zeros((len(chunk), width - 1))
        for j, (s, start) in enumerate(chunk):
            ids[j, :len(s)] = torch.tensor(s)
            scored[j, start - 1:len(s) - 1] = 1  # logits at t-1 predict token t
        attn = (torch.arange(width).unsqueeze(0) < torch.tensor([len(s) for s, _ in chunk]).unsqueeze(1)).long()
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False).logits
        lp = logprobs_from_logits(logits[:, :-1], ids[:, 1:].to(device)).cpu()
        nll -= float((lp * scored).sum())
        count += int(scored.sum())
    return M.perplexity(nll, count)


def pairwise_scores(source: CombinedReward, rows: list[dict]) -> tuple[np.ndarray, np.ndarray, dict]:
    """Scores of the chosen and rejected response of every pair, and truncation counts.

    A single reward-model checkpoint goes through ``rewards.tokenize_pairs``
    (the reward stage's truncation: prompt tokens dropped from the left, never a
    pair); anything else (functions, weighted sums) is called on the texts.
    """
    from rlhf.rewards import RewardModel, aggregate_members, pair_member_scores

    weight, fn, _ = source.parts[0]
    if len(source.parts) == 1 and isinstance(fn, RewardModel) and fn.label is None:
        pairs, stats = fn.tokenize_pairs(rows)
        members = pair_member_scores(fn.model, pairs, fn.tokenizer.pad_token_id, fn.batch_size)
        # An ensemble's members combined as the source combines them for every other consumer.
        chosen, rejected = (weight * aggregate_members(m, fn.aggregate, fn.uncertainty_coef).numpy() for m in members)
        return chosen, rejected, {"prompt_truncated": stats.prompt_truncated,
                                  "response_truncated": stats.response_truncated}
    prompts = [r["prompt"] for r in rows]
    chosen = np.asarray(source(prompts, [r["chosen"] for r in rows]))
    rejected = np.asarray(source(prompts, [r["rejected"] for r in rows]))
    return chosen, rejected, {}


# ---------------------------------------------------------------- the whole evaluation


def _load_policy(model: ModelConfig, seed: int, device):
    try:
        tok = load_tokenizer(model)
        policy = load_causal_lm(model, tok, seed=seed)
    except OSError as e:  # a hub id that is not there or cannot be downloaded (offline)
        raise BadInput(f"checkpoint '{model.name}': cannot load it ({str(e).splitlines()[0]})") from None
    tok.padding_side = "left"
    return tok, policy.to(device).eval()


def _same_vocab(a, b) -> bool:
    return a.get_vocab() == b.get_vocab()


def evaluate(cfg: Config, out_dir: Path, seed: int, run_dir: str | Path | None = None,
             stage_order: list[str] | None = None) -> dict:
    """Run the whole evaluation and write every output file into ``out_dir``.

    Returns the metrics (as written to ``metrics.json``).
    """
    from rlhf.evaluation import report

    t_start = time.time()
    out_dir = Path(out_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = cfg.generation
    prompt_data = as_data(cfg.prompts)
    _, prompts = _load_prompts(prompt_data)
    text_rows = _load_text(as_data(cfg.text)) if cfg.text is not None else None
    pref_rows = _load_preferences(as_data(cfg.preferences)) if cfg.preferences is not None else None

    # Scorers: metric name -> source. Reward models load once, here.
    scorers: dict[str, CombinedReward] = {
        f"reward/{name}": CombinedReward(as_specs(spec), device=device, max_length=cfg.max_length)
        for name, spec in cfg.rewards.items()}
    if cfg.gold:
        scorers["gold"] = CombinedReward([RewardSpec(source=cfg.gold)], device=device)

    # 1-3. sample, KL, text metrics
    samples, ppl = _sample_checkpoints(cfg, prompts, text_rows, seed, device)
    # 4. score
    repeated = [p for p in prompts for _ in range(gen.samples_per_prompt)]
    scores: dict[str, dict[str, np.ndarray]] = {name: {} for name in cfg.checkpoints}
    for key, scorer in scorers.items():
        for name, s in samples.items():
            scores[name][key] = np.asarray(scorer(repeated, s.texts), dtype=np.float64)
    # 5. metrics, with bootstrap intervals for every mean
    results = _metrics(cfg, samples, scores, ppl, list(scorers), seed)
    if pref_rows is not None:
        for name in cfg.rewards:
            chosen, rejected, trunc = pairwise_scores(scorers[f"reward/{name}"], pref_rows)
            results[name] = {"kind": "reward_source",
                             "pairwise_accuracy": _ci(cfg, seed, M.win_outcomes(chosen, rejected)),
                             "margin": float(np.mean(chosen - rejected)), "pairs": len(pref_rows), **trunc}

    # 6. files
    settings = _settings(cfg, seed, prompt_data.path, len(prompts), len(repeated))
    rows = [{"prompt": prompt, "prompt_index": i // gen.samples_per_prompt, "sample": i % gen.samples_per_prompt,
             "responses": {name: {"response": s.texts[i], "scores": {k: float(scores[name][k][i]) for k in scorers},
                                  "kl": None if s.kl is None else float(s.kl[i]), "length": int(s.lengths[i]),
                                  "eos": bool(s.finished[i])}
                           for name, s in samples.items()}}
            for i, prompt in enumerate(repeated)]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    with (out_dir / "samples.jsonl").open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    curves = report.read_curves(Path(run_dir), exclude=out_dir, order=stage_order) if run_dir else {}
    extra = _overoptimisation(cfg, prompts, scorers, seed, device, run_dir, out_dir) if cfg.overoptimisation else []
    report.write_report(out_dir, results, settings, rows, curves, extra)
    log.info("eval: wrote %s in %.1fs", out_dir / "report.html", time.time() - t_start)
    return results


def _sample_checkpoints(cfg: Config, prompts: list, text_rows, seed: int, device) -> tuple[dict, dict]:
    """Each checkpoint's samples (with the KL to the reference) and held-out
    perplexity; one checkpoint in memory at a time, besides the reference."""
    reference = ref_tok = None
    ref_cfg = _reference_model(cfg)
    if ref_cfg is not None:
        ref_tok, reference = _load_policy(ref_cfg, seed, device)
    samples: dict[str, Samples] = {}
    ppl: dict[str, float] = {}
    for name, model in cfg.checkpoints.items():
        t0 = time.time()
        model = as_model_config(model)
        tok, policy = _load_policy(model, seed, device)
        ref = reference
        if reference is not None and not _same_vocab(tok, ref_tok):
            log.warning("checkpoint %s: tokenizer differs from the reference's, so no KL", name)
            ref = None
        samples[name] = sample(policy, tok, [render_prompt(tok, p) for p in prompts], cfg.generation, seed, device,
                               ref)
        if text_rows is not None:
            limit = cfg.max_length or context_length(model) or 1024
            ppl[name] = text_perplexity(policy, tok, text_rows, limit, cfg.generation.batch_size, device)
        del policy
        log.info("eval %s: %d responses in %.1fs", name, len(samples[name].texts), time.time() - t0)
    return samples, ppl


def _ci(cfg: Config, seed: int, values) -> dict:
    """A mean with its 95% bootstrap interval."""
    return M.bootstrap_ci(values, 0.95, cfg.bootstrap_samples, seed).to_json()


def _metrics(cfg: Config, samples: dict, scores: dict, ppl: dict, keys: list[str], seed: int) -> dict:
    """Per checkpoint: every scorer's mean, win rates against the baseline
    (plain and length-controlled), KL, perplexity, diversity, lengths."""
    results: dict[str, dict] = {}
    for name, s in samples.items():
        m: dict = {"kind": "policy"}
        for key in keys:
            m[key] = _ci(cfg, seed, scores[name][key])
        if cfg.baseline is not None and name != cfg.baseline:
            for key in keys:
                short = key.split("/", 1)[-1]
                outcomes = M.win_outcomes(scores[name][key], scores[cfg.baseline][key])
                m[f"win_rate/{short}"] = _ci(cfg, seed, outcomes)
                m[f"lc_win_rate/{short}"] = M.length_controlled_win_rate(
                    outcomes, np.asarray(s.lengths, float) - np.asarray(samples[cfg.baseline].lengths, float))
        if s.kl is not None:
            m["kl"] = _ci(cfg, seed, s.kl)
        if name in ppl:
            m["perplexity"] = ppl[name]
        m["distinct_1"] = M.distinct_n(s.texts, 1)
        m["distinct_2"] = M.distinct_n(s.texts, 2)
        m["response_length"] = _ci(cfg, seed, s.lengths)
        m["eos_rate"] = _ci(cfg, seed, np.asarray(s.finished, dtype=np.float64))  # EOS or a stop string
        results[name] = m
    return results


def _settings(cfg: Config, seed: int, prompts_path: str, prompt_count: int, responses: int) -> dict:
    """What the evaluation ran with (settings.json)."""
    return {
        "seed": seed,
        "generation": {k: v for k, v in to_dict(cfg.generation).items() if k != "seed"},
        "prompts": {"path": prompts_path, "count": prompt_count},
        "responses_per_checkpoint": responses,
        "checkpoints": {n: as_model_config(m).name for n, m in cfg.checkpoints.items()},
        "rewards": {n: [to_dict(s) for s in as_specs(spec)] for n, spec in cfg.rewards.items()},
        "gold": cfg.gold,
        "reference": cfg.reference,
        "baseline": cfg.baseline,
        "text": as_data(cfg.text).path if cfg.text is not None else None,
        "preferences": as_data(cfg.preferences).path if cfg.preferences is not None else None,
        "max_length": cfg.max_length,
        "bootstrap_samples": cfg.bootstrap_samples,
        "confidence": 0.95,
    }


def _overoptimisation(cfg: Config, prompts: list, scorers: dict, seed: int, device, run_dir, out_dir: Path) -> list:
    """Best-of-n points, the PPO stage's watch points, the fits: overoptimisation.{json,png};
    returns the report section."""
    from rlhf.evaluation import overopt
    from rlhf.evaluation.report import read_jsonl

    o = cfg.overoptimisation
    n_max = max(o.best_of_n)
    items = prompts[: o.max_prompts]
    tok, policy = _load_policy(as_model_config(cfg.checkpoints[o.policy or cfg.reference]), seed, device)
    got = sample(policy, tok, [render_prompt(tok, p) for p in items],
                 dataclasses.replace(cfg.generation, samples_per_prompt=n_max), seed, device)
    del policy
    repeated = [p for p in items for _ in range(n_max)]
    proxy_key = f"reward/{o.reward or next(iter(cfg.rewards))}"
    proxy = np.asarray(scorers[proxy_key](repeated, got.texts)).reshape(len(items), n_max)
    gold = np.asarray(scorers["gold"](repeated, got.texts)).reshape(len(items), n_max)
    bon = overopt.best_of_n(proxy, gold, o.best_of_n)
    watch = Path(run_dir or "") / o.stage / "metrics.jsonl"
    rl = overopt.rl_points(read_jsonl(watch)) if run_dir and watch.is_file() else []
    if not rl:
        log.warning("eval overoptimisation: no watch points in %s (run PPO with watch.every > 0): best-of-n only",
                    watch)
    summary = overopt.summarise(rl, bon, gold_init=float(gold[:, 0].mean()))
    (out_dir / "overoptimisation.json").write_text(json.dumps(summary, indent=2) + "\n")
    png = overopt.plot(summary, out_dir)
    fit = summary.get("rl_fit")
    peak = (f"the RL fit peaks at sqrt(KL) = {fit['peak_d']:.2f}" if fit and fit["peak_d"] is not None
            else "no peak in the RL fit (gold still rising)")
    caption = (f"Gold (left) and {proxy_key} (right) against sqrt(KL to the initial policy): {o.stage}'s watch "
               f"points and best-of-n (n = {', '.join(map(str, sorted(set(o.best_of_n))))}, KL = log n - (n-1)/n) on "
               f"{len(items)} prompts; {peak}. Fits: Gao et al. 2022. Numbers: overoptimisation.json.")
    return [("overoptimisation", "Over-optimisation", png, caption)] if png else []


# ---------------------------------------------------------------- recipe stage


def validate(cfg: Config, ctx) -> None:
    check_inputs(cfg, lambda key: f"stages.{ctx.name}.{key}", ctx.produces, ctx.loadable)


def train(cfg: Config, ctx) -> Path:
    """Evaluate, write ``<stage_dir>/{metrics.json, samples.jsonl, *.png, report.html}``,
    then ``final/`` (a marker: its existence means done, so re-runs skip the stage)."""
    from rlhf.tracking import MetricsLogger

    final = ctx.stage_dir / "final"
    if not ctx.is_main:  # one process evaluates; the runner makes the others wait
        return final
    seed = cfg.generation.seed if cfg.generation.seed is not None else ctx.seed
    run_dir = ctx.recipe.run.output_dir if cfg.run_dir is None else cfg.run_dir
    order = [s.name for s in ctx.recipe.stages if s.type != "eval"]
    results = evaluate(cfg, ctx.stage_dir, seed, run_dir or None, order)
    logger = MetricsLogger(ctx.stage_dir, ctx.name, ctx.report_to, project=ctx.recipe.run.wandb_project)
    flat = {}
    for name, m in results.items():
        for key, value in m.items():
            if isinstance(value, dict):
                flat[f"eval/{name}/{key}"] = value["mean"]
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[f"eval/{name}/{key}"] = value
    logger.log(flat, step=0)
    logger.close()
    tmp = final.with_name("final.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "outputs.json").write_text(json.dumps(
        {"report": "../report.html", "metrics": "../metrics.json", "samples": "../samples.jsonl",
         "settings": "../settings.json"}, indent=2) + "\n")
    tmp.rename(final)
    return final
