"""``type: collect``: one round's human feedback, between sampling and the reward stage.

In a rounds recipe (``type: rounds``, see ``rlhf schema rounds``) each round
runs ``collect -> reward -> ppo``. This stage, top to bottom:

1. **sample** ``candidates`` responses per prompt from the current policy
   (and from ``also_from``, e.g. the previous round's policy), on a fresh,
   seeded subset of the prompts each round;
2. **select** the pairs to send to people, ``ceil(labels / overlap)`` of
   them (the budget is in labels): ``random``, or ``uncertainty`` -- the
   pairs the current reward model is least sure of, ``|P(a > b) - 0.5|``
   smallest with ``P(a > b) = sigmoid(r(a) - r(b))`` (at most one pair per
   prompt before any prompt gets a second). Written to ``pairs.jsonl``
   once; a re-run reuses it;
3. **collect**: put the pairs in the labeling store (the same project as
   ``rlhf label``; adding is idempotent) and wait until the round's pairs
   hold ``labels`` labels (skips do not count; labels already in the store
   do). People label in the web app this stage serves while it waits (it
   prints sign-in links for new ``labelers.people``); simulated labelers
   (``labelers.simulated``) label through the same HTTP API of the same
   server on the same store. With ``wait: false`` an unmet target ends the
   run with a one-line status and exit 0; the same ``rlhf run`` goes on later;
4. **export**: every labeled pair of the project so far (all rounds), by
   majority vote, to ``final/prefs.jsonl`` for the reward stage, except a
   ``held_out`` share of this round's pairs, written to
   ``final/fresh.jsonl`` (the reward stage's ``eval_path``: its accuracy on
   text like the current policy writes, before and after retraining);
5. **measure** the current reward model's accuracy on all of this round's
   fresh labels before it is retrained (``collect/rm_accuracy_fresh``):
   how far it has drifted from what the policy now writes.

A crash or Ctrl-C loses nothing: labels are durable when acknowledged, and
a re-run picks up the same pairs and the labels already given.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rlhf.config import opt, require_positive
from rlhf.errors import BadInput, Paused
from rlhf.labeling.simulated import SimulatedConfig
from rlhf.sampling import SamplingConfig

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    """Where the labeling app is served while the stage waits for people."""

    host: str = opt("127.0.0.1", "interface to listen on (0.0.0.0 to reach it from other machines)")
    port: int = opt(8000, "port; 0 = any free port")

    def check(self, fail):
        if not 0 <= self.port <= 65535:
            raise fail("port", f"expected 0..65535, got {self.port}")


@dataclass
class Labelers:
    """Who labels: people (names to register) or simulated labelers."""

    people: list[str] = opt([], "people to register as labelers; each new one's sign-in link is printed "
                                "once (reissue with `rlhf label add-labeler --new-token`)")
    simulated: SimulatedConfig | None = opt(None, "simulated labelers instead of people (tests, demos, research)")


@dataclass
class Config:
    """One round's labels: sample, select, collect, export."""

    policy: str = opt("", "checkpoint to sample from: the current policy, e.g. ${previous.ppo}")
    also_from: str | None = opt(None, "also sample candidates from this checkpoint (e.g. an older policy)")
    reward: str | None = opt(None, "current reward model: picks pairs (selection: uncertainty) and is measured "
                                   "on the fresh labels; null in round 1 when there is none yet")
    prompts: str = opt("", "prompts to sample for (JSONL with `prompt`)")
    prompts_per_round: int | None = opt(None, "a fresh seeded subset of this many prompts per round; null = all")
    candidates: int = opt(4, "responses sampled per prompt from each policy")
    selection: Literal["random", "uncertainty", "disagreement"] = opt(
        "random", "which pairs go to people: random; uncertainty: those the reward model is least sure of; "
                  "disagreement: those an ensemble reward model's members disagree on most (reward stage "
                  "`ensemble: k`); random while `reward` is null")
    labels: int = opt(100, "label budget of the round (non-skip labels); pairs = ceil(labels / overlap)")
    db: str = opt("", "labeling database URL; empty = sqlite:///<output_dir>/labels.db")
    project: str = opt("rounds", "labeling project (created on first use)")
    overlap: int = opt(1, "labelers per pair when the project is created (>= 2 to measure agreement)")
    labelers: Literal["people"] | Labelers = opt("people", "people (the default; or {people: [alice, bob]} to "
                                                           "register them), or {simulated: {count, gold, ...}}")
    serve: ServeConfig = opt(ServeConfig(), "where to serve the labeling app while waiting for people")
    wait: bool = opt(True, "wait for the labels; false: end the run (exit 0) until they are in")
    poll_seconds: float = opt(10.0, "how often to check the store while people label")
    held_out: float = opt(0.2, "share of this round's labeled pairs kept out of prefs.jsonl, in fresh.jsonl")
    ties: Literal["drop", "random"] = opt("drop", "a pair whose vote has no winner: drop it or pick a side (seeded)")
    generation: SamplingConfig = opt(SamplingConfig(max_new_tokens=32, batch_size=64), "candidate sampling")

    def check(self, fail):
        require_positive(self, fail, "candidates", "labels", "overlap")
        if not self.policy:
            raise fail("policy", "required: the checkpoint to sample from (e.g. ${previous.ppo})")
        if not self.prompts:
            raise fail("prompts", "required: a prompts file (JSONL with `prompt`)")
        if self.candidates < 2 and self.also_from is None:
            raise fail("candidates", "expected >= 2 (a pair needs two responses), or set also_from")
        if not 0 <= self.held_out < 1:
            raise fail("held_out", f"expected a fraction in [0, 1), got {self.held_out}")
        if not self.poll_seconds > 0:
            raise fail("poll_seconds", f"expected > 0, got {self.poll_seconds}")
        if self.generation.samples_per_prompt != 1:
            raise fail("generation.samples_per_prompt", "leave it at 1: `candidates` sets the samples per prompt")
        if self.prompts_per_round is not None and self.prompts_per_round < 1:
            raise fail("prompts_per_round", f"expected a positive integer or null, got {self.prompts_per_round}")

    @property
    def pairs_needed(self) -> int:
        return math.ceil(self.labels / self.overlap)

    @property
    def simulated(self):
        return None if isinstance(self.labelers, str) else self.labelers.simulated

    @property
    def people(self) -> list[str]:
        return [] if isinstance(self.labelers, str) else list(self.labelers.people)


def _db_url(cfg: Config, ctx) -> str:
    return cfg.db or f"sqlite:///{Path(ctx.recipe.run.output_dir).resolve() / 'labels.db'}"


def validate(cfg: Config, ctx) -> None:
    from rlhf.data import normalize_prompts, read_records
    from rlhf.labeling.store import parse_db_url
    from rlhf.models import load_tokenizer
    from rlhf.rewards import check_source, load_function

    key = f"stages.{ctx.name}"
    for name in [cfg.policy] + ([cfg.also_from] if cfg.also_from else []):
        load_tokenizer(ctx.loadable(name))
    if cfg.reward:
        check_source(cfg.reward, ctx.produces)
        if cfg.selection == "disagreement" and _ensemble_size(cfg.reward, ctx) < 2:
            raise BadInput(f"{key}.selection: disagreement needs an ensemble reward model (reward stage "
                           f"`ensemble: k` with k >= 2); {cfg.reward} has one head")
    prompts = normalize_prompts(read_records(cfg.prompts))
    n = min(len(prompts), cfg.prompts_per_round or len(prompts))
    per_prompt = cfg.candidates * (2 if cfg.also_from else 1)
    if n * per_prompt * (per_prompt - 1) // 2 < cfg.pairs_needed:
        raise BadInput(f"{key}.labels: {cfg.labels} labels need {cfg.pairs_needed} pairs, but {n} prompts x "
                       f"{per_prompt} candidates give at most {n * per_prompt * (per_prompt - 1) // 2}")
    parse_db_url(_db_url(cfg, ctx), flag=f"{key}.db")
    if cfg.simulated is not None:
        load_function(cfg.simulated.gold)


def _ensemble_size(source: str, ctx) -> int:
    """Heads of a reward checkpoint: from its saved reading settings, or from
    the config of the stage of this recipe that will write it."""
    from rlhf.rewards import is_function, read_settings

    if is_function(source):
        return 1
    if Path(source).exists():
        saved = read_settings(source)
        return saved.ensemble if saved is not None else 1
    for stage in ctx.recipe.stages:
        if (ctx.recipe.stage_dir(stage.name) / "final").resolve() == Path(source).resolve():
            return getattr(stage.config, "ensemble", 1)
    return 1


# ---------------------------------------------------------------- 1-2. sample and select


def _round_prompts(cfg: Config, seed: int) -> list:
    from rlhf.data import normalize_prompts, read_records

    prompts = normalize_prompts(read_records(cfg.prompts))
    if cfg.prompts_per_round is None or cfg.prompts_per_round >= len(prompts):
        return prompts
    return random.Random(seed).sample(prompts, cfg.prompts_per_round)


def _sample_candidates(cfg: Config, prompts: list, seed: int) -> list[list[tuple[str, str]]]:
    """Per prompt: (response, source) for every candidate of every policy."""
    import torch

    from rlhf.data import render_prompt
    from rlhf.models import ModelConfig, context_length, load_causal_lm, load_tokenizer
    from rlhf.sampling import sample

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out: list[list[tuple[str, str]]] = [[] for _ in prompts]
    for name in [cfg.policy] + ([cfg.also_from] if cfg.also_from else []):
        model_cfg = ModelConfig(name=name)
        tok = load_tokenizer(model_cfg)
        model = load_causal_lm(model_cfg, tok, seed=seed).to(device).eval()
        texts = [render_prompt(tok, p) for p in prompts]
        sampling = dataclasses.replace(cfg.generation, samples_per_prompt=cfg.candidates)
        room = (context_length(model_cfg) or 1024) - sampling.max_new_tokens
        got = sample(model, tok, texts, sampling, seed, device, max_prompt_tokens=room)
        for i in range(len(prompts)):
            for j in range(cfg.candidates):
                out[i].append((got.texts[i * cfg.candidates + j], f"{name}#{j + 1}"))
        log.info("sampled %d x %d candidates from %s", len(prompts), cfg.candidates, name)
        del model
    return out


def _member_scores(source: str, prompts: list, candidates: list[list[tuple[str, str]]]) -> list[list[list[float]]]:
    """Per prompt, per candidate: every reward-model member's score (one for a
    single model or a function)."""
    from rlhf.rewards import CombinedReward, RewardModel, RewardSpec, is_function

    flat_p = [p for p, cands in zip(prompts, candidates) for _ in cands]
    flat_r = [text for cands in candidates for text, _ in cands]
    if is_function(source):
        flat = [[s] for s in CombinedReward([RewardSpec(source=source)])(flat_p, flat_r)]
    else:
        flat = RewardModel(source).members(flat_p, flat_r).tolist()
    out, i = [], 0
    for cands in candidates:
        out.append(flat[i:i + len(cands)])
        i += len(cands)
    return out


def select_pairs(candidates: list[list[str]], scores: list[list[list[float]]] | None, n_pairs: int,
                 rng: random.Random, how: str = "uncertainty") -> list[tuple[int, int, int, float | None]]:
    """(prompt index, candidate i, candidate j, P(i > j) or None) for ``n_pairs`` pairs.

    ``scores[p][i]``: the reward members' scores of prompt p's candidate i;
    P(i > j) = sigmoid(mean(i) - mean(j)). Within a prompt, pairs are ranked
    by ``how``: ``uncertainty`` (``|P(i > j) - 0.5|`` smallest first) or
    ``disagreement`` (the std over members of their score differences,
    largest first); in random order without scores. Distinct, non-empty
    texts only. Across prompts, every prompt's best pair comes before any
    prompt's second best, ties of rank broken by the same key."""
    ranked = []
    for p, texts in enumerate(candidates):
        options = []
        for i in range(len(texts)):
            for j in range(i + 1, len(texts)):
                if texts[i] == texts[j] or not texts[i].strip() or not texts[j].strip():
                    continue
                if scores is None:
                    options.append((rng.random(), i, j, None))
                    continue
                diffs = [a - b for a, b in zip(scores[p][i], scores[p][j])]
                mean = sum(diffs) / len(diffs)
                prob = 1.0 / (1.0 + math.exp(-mean))
                spread = math.sqrt(sum((d - mean) ** 2 for d in diffs) / len(diffs))
                options.append((-spread if how == "disagreement" else abs(prob - 0.5), i, j, prob))
        options.sort()
        ranked += [(rank, key, p, i, j, prob) for rank, (key, i, j, prob) in enumerate(options)]
    ranked.sort(key=lambda r: (r[0], r[1]))
    return [(p, i, j, prob) for _, _, p, i, j, prob in ranked[:n_pairs]]


def _make_pairs_file(cfg: Config, ctx, path: Path) -> dict:
    """Sample, select and write the round's pairs (atomically); returns selection stats."""
    from rlhf.labeling.pairs import Candidate, make_pairs

    base = cfg.generation.seed if cfg.generation.seed is not None else ctx.seed
    seed = base + 1000 * (ctx.round or 0)  # a fresh draw each round
    prompts = _round_prompts(cfg, seed)
    candidates = _sample_candidates(cfg, prompts, seed)
    scores = None
    if cfg.selection != "random" and cfg.reward:
        if cfg.selection == "disagreement" and _ensemble_size(cfg.reward, ctx) < 2:
            raise BadInput(f"stages.{ctx.name}.selection: disagreement needs an ensemble reward model; "
                           f"{cfg.reward} has one head")
        scores = _member_scores(cfg.reward, prompts, candidates)
    elif cfg.selection != "random":
        log.info("stage %s: no reward model yet (reward: null): pairs chosen at random", ctx.name)
    texts = [[t for t, _ in cands] for cands in candidates]
    chosen = select_pairs(texts, scores, cfg.pairs_needed, random.Random(seed), cfg.selection)
    rows = [Candidate(prompts[p], candidates[p][i][0], candidates[p][j][0], candidates[p][i][1],
                      candidates[p][j][1], f"{cfg.prompts} prompt {p}") for p, i, j, _ in chosen]
    pairs, _ = make_pairs(rows, seed)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps(pair._asdict(), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    stats = {"collect/pairs_selected": len(pairs), "collect/prompts": len(prompts),
             "collect/candidates_per_prompt": len(candidates[0]) if candidates else 0}
    if scores is not None:  # mean |P(a > b) - 0.5| of the pairs sent (0 = a coin flip to the reward model)
        stats["collect/selected_margin"] = sum(abs(prob - 0.5) for *_, prob in chosen) / max(len(chosen), 1)
    log.info("stage %s: %d pairs selected (%s) from %d prompts", ctx.name, len(pairs), cfg.selection, len(prompts))
    return stats


# ---------------------------------------------------------------- 3. collect


def _round_pair_ids(store, project, pairs_path: Path) -> list[int]:
    from rlhf.labeling.store import NewPair, pair_key

    new = [NewPair(**json.loads(line)) for line in pairs_path.read_text(encoding="utf-8").splitlines() if line]
    store.add_pairs(project, new)
    keys = {pair_key(p.prompt, p.response_a, p.response_b) for p in new}
    return sorted(pid for pid, row in store.pairs(project).items() if row.key in keys)


def _open_project(store, cfg: Config):
    from rlhf.labeling.config import ProjectConfig

    if cfg.project not in {p.name for p in store.projects()}:
        return store.create_project(cfg.project, ProjectConfig(overlap=cfg.overlap))
    project = store.project(cfg.project)
    if project.config.overlap != cfg.overlap:
        log.warning("project %s has overlap %d (set when it was created); this stage's overlap %d is not applied",
                    project.name, project.config.overlap, cfg.overlap)
    return project


def _counts(store, project, ids: set[int]) -> tuple[int, Counter, int]:
    """(non-skip labels on the round's pairs, per-labeler counts, skips)."""
    rows = [r for r in store.current_labels(project.id) if r.pair_id in ids]
    per = Counter(r.labeler for r in rows if r.choice != "skip")
    return sum(per.values()), per, sum(r.choice == "skip" for r in rows)


class _Progress:
    """A bar of labels / target with labels per hour, ETA and per-labeler
    counts; the same figures go to metrics.jsonl."""

    def __init__(self, ctx, target: int, start: int):
        from tqdm.auto import tqdm

        from rlhf.tracking import MetricsLogger

        self.logger = MetricsLogger(ctx.stage_dir, ctx.name, [], enabled=ctx.is_main)
        self.logger.truncate_after(start)
        self.bar = tqdm(total=target, initial=min(start, target), desc=f"{ctx.name} labels", unit="label",
                        mininterval=1.0, disable=not ctx.is_main)
        self.t0, self.start, self.last = time.time(), start, start

    def update(self, done: int, per: Counter) -> None:
        if done == self.last:
            return
        self.bar.update(min(done, self.bar.total) - min(self.last, self.bar.total))
        rate = (done - self.start) / max(time.time() - self.t0, 1e-9) * 3600
        self.bar.set_postfix_str(f"{rate:.0f}/h " + " ".join(f"{k}:{v}" for k, v in sorted(per.items())))
        self.logger.log({"collect/labels": done, "collect/labels_per_hour": rate,
                         **{f"collect/labels_by/{k}": v for k, v in per.items()}}, step=done)
        self.last = done

    def close(self) -> None:
        self.bar.close()
        self.logger.close()


def _simulate(cfg: Config, store, project, ids: set[int], progress: _Progress) -> None:
    """Simulated labelers label through the real server until the target is
    met or no pair is left for any of them. Which labeler acts next is a
    function of how many labels the round holds, so an interrupted run,
    resumed, hands out the same pairs to the same labelers."""
    import secrets

    from rlhf.labeling.server import running
    from rlhf.labeling.simulated import SimulatedLabeler
    from rlhf.rewards import load_function

    sim = cfg.simulated
    gold = load_function(sim.gold)
    server = running(store, project, "127.0.0.1", 0)
    try:
        labelers = []
        for i, name in enumerate(sim.names()):
            token = secrets.token_urlsafe(24)
            store.add_labeler(project, name, token, replace_token=True)
            labelers.append(SimulatedLabeler(sim, i, server.url, token, gold))
        exhausted: set[int] = set()
        done, per, skips = _counts(store, project, ids)
        while done < cfg.labels and len(exhausted) < len(labelers):
            turn = (done + skips) % len(labelers)
            while turn in exhausted:
                turn = (turn + 1) % len(labelers)
            got = labelers[turn].label_next()
            if got is None:
                exhausted.add(turn)
                continue
            pair_id, choice = got
            if pair_id not in ids:  # an earlier round's pair still open: labeled, but not this round's budget
                continue
            if choice == "skip":
                skips += 1
            else:
                done += 1
                per[labelers[turn].name] += 1
                if done % 10 == 0:
                    progress.update(done, per)
        progress.update(done, per)
    finally:
        server.stop()


def _people(cfg: Config, ctx, store, project, ids: set[int], progress: _Progress) -> None:
    """Serve the app, print sign-in links for new people, poll until the target is met."""
    import secrets

    from rlhf.labeling.server import running

    known = {lab.name for lab in store.labelers(project)}
    server = running(store, project, cfg.serve.host, cfg.serve.port)
    try:
        log.info("stage %s: labeling app at %s (project %s); waiting for %d labels on %d pairs",
                 ctx.name, server.url, project.name, cfg.labels, len(ids))
        for name in cfg.people:
            if name in known:
                log.info("labeler %s: already registered (a new link: rlhf label add-labeler --db %s --project %s "
                         "--name %s --new-token)", name, store.display, project.name, name)
                continue
            token = secrets.token_urlsafe(24)
            store.add_labeler(project, name, token)
            print(f"sign-in link for {name}: {server.url}/#token={token}", flush=True)
        while True:
            done, per, _ = _counts(store, project, ids)
            progress.update(done, per)
            if done >= cfg.labels:
                return
            time.sleep(cfg.poll_seconds)
    finally:
        server.stop()


# ---------------------------------------------------------------- 4-5. export and measure


def _export(cfg: Config, ctx, store, project, ids: set[int], out: Path) -> dict:
    """prefs.jsonl (every labeled pair so far but this round's held-out
    share) and fresh.jsonl (that share); returns counts."""
    from rlhf.labeling.config import ExportConfig
    from rlhf.labeling.export import preference_rows, write_rows

    rows, summary = preference_rows(store.pairs(project), store.current_labels(project.id),
                                    ExportConfig(ties=cfg.ties, seed=ctx.seed))
    fresh = sorted((r for r in rows if r["pair_id"] in ids), key=lambda r: r["pair_id"])
    random.Random(ctx.seed + (ctx.round or 0)).shuffle(fresh)
    held = fresh[: math.ceil(cfg.held_out * len(fresh))]
    held_ids = {r["pair_id"] for r in held}
    train = [r for r in rows if r["pair_id"] not in held_ids]
    if not train:
        raise BadInput(f"stages.{ctx.name}: no labeled pair to train on yet ({summary.pairs} pairs in project "
                       f"{project.name}, {summary.too_few_votes} unlabeled, {summary.ties_dropped} ties dropped)")
    write_rows(train, out / "prefs.jsonl", "jsonl")
    write_rows(sorted(held, key=lambda r: r["pair_id"]) or [], out / "fresh.jsonl", "jsonl")
    write_rows(sorted(fresh, key=lambda r: r["pair_id"]), out / "fresh_all.jsonl", "jsonl")
    return {"collect/train_pairs": len(train), "collect/fresh_pairs": len(fresh),
            "collect/fresh_held_out": len(held), "collect/ties_dropped": summary.ties_dropped}


def fresh_accuracy(source: str, rows: list[dict]) -> float | None:
    """A reward source's pairwise accuracy on preference rows (ties count
    half), scored as ``rlhf eval`` scores held-out preferences."""
    from rlhf.evaluation.metrics import win_outcomes
    from rlhf.evaluation.runner import pairwise_scores
    from rlhf.rewards import CombinedReward, RewardSpec

    if not rows:
        return None
    chosen, rejected, _ = pairwise_scores(CombinedReward([RewardSpec(source=source)]), rows)
    return float(win_outcomes(chosen, rejected).mean())


def _agreement(store, project, ids: set[int]) -> dict:
    from rlhf.labeling.stats import agreement

    got = agreement([r for r in store.current_labels(project.id) if r.pair_id in ids])
    return {"collect/pairs_with_2plus_votes": got["pairs_with_2plus_votes"],
            "collect/percent_agreement": got["percent_agreement"], "collect/fleiss_kappa": got["fleiss_kappa"]}


def train(cfg: Config, ctx) -> Path:
    from rlhf.labeling.store import Store
    from rlhf.tracking import write_summary

    final = ctx.stage_dir / "final"
    if not ctx.is_main:
        return final
    ctx.stage_dir.mkdir(parents=True, exist_ok=True)
    pairs_path = ctx.stage_dir / "pairs.jsonl"
    stats_path = ctx.stage_dir / "selection.json"
    if not pairs_path.exists():
        stats_path.write_text(json.dumps(_make_pairs_file(cfg, ctx, pairs_path)))
    summary = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    with Store.open(_db_url(cfg, ctx), create=True, flag=f"stages.{ctx.name}.db") as store:
        project = _open_project(store, cfg)
        ids = set(_round_pair_ids(store, project, pairs_path))
        done, per, skips = _counts(store, project, ids)
        if done < cfg.labels and not cfg.wait:
            raise Paused(f"stage {ctx.name}: {done}/{cfg.labels} labels on {len(ids)} pairs of project "
                         f"{project.name} in {store.display}; label them (rlhf label serve), then re-run "
                         "the same command to continue")
        progress = _Progress(ctx, cfg.labels, done)
        try:
            if done < cfg.labels:
                (_simulate(cfg, store, project, ids, progress) if cfg.simulated is not None
                 else _people(cfg, ctx, store, project, ids, progress))
        finally:
            progress.close()
        done, per, skips = _counts(store, project, ids)
        if done < cfg.labels:
            log.warning("stage %s: %d of the %d labels asked for: every pair has its overlap or was skipped by "
                        "every labeler", ctx.name, done, cfg.labels)
        tmp = ctx.stage_dir / "final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        summary.update(_export(cfg, ctx, store, project, ids, tmp))
        summary.update(_agreement(store, project, ids))
    fresh = [json.loads(line) for line in (tmp / "fresh_all.jsonl").read_text(encoding="utf-8").splitlines() if line]
    summary.update({"collect/labels": done, "collect/target": cfg.labels, "collect/skips": skips,
                    "collect/pairs": len(ids), "collect/labelers": len(per),
                    **{f"collect/labels_by/{k}": v for k, v in sorted(per.items())}})
    if cfg.reward:
        acc = fresh_accuracy(cfg.reward, fresh)
        summary["collect/rm_accuracy_fresh"] = acc
        log.info("stage %s: the current reward model's accuracy on this round's %d fresh labeled pairs: %s",
                 ctx.name, len(fresh), "n/a" if acc is None else f"{acc:.3f}")
    write_summary(ctx.stage_dir, summary)
    os.replace(tmp, final)
    return final
