"""``rlhf label pairs``: make the pairs people will compare.

Two sources:

- checkpoints: for each prompt, one sampled response from each of two
  checkpoints (model A vs model B), or two samples from one checkpoint;
- a file of ready-made pairs: ``{prompt, response_a, response_b}``,
  ``{prompt, responses: [r1, r2]}`` or ``{prompt, chosen, rejected}`` (the
  existing preference is ignored: people label it afresh).

Then: pairs whose two responses are the same text (or empty) are dropped,
exact duplicates are dropped (same prompt, same two responses in either
order), and each pair's sides are shuffled with a seeded RNG so neither
model, nor the file's column order, is always on the left; position bias
then averages out instead of pointing at one model.

With ``--responses K`` (K >= 3) each prompt becomes one *ranking item* of K
responses instead (InstructGPT ranked 4 to 9): K samples from the checkpoint
(two checkpoints: about half each), or a file of ``{prompt, responses: [K
strings]}``; items with an empty or repeated response, and duplicates, are
dropped, and the order shown is shuffled.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from rlhf.errors import BadInput
from rlhf.labeling.schema import MAX_RANKED, MIN_RANKED
from rlhf.labeling.store import NewPair, new_ranking, pair_key

log = logging.getLogger(__name__)


class Candidate(NamedTuple):
    """Two responses to one prompt, in source order (not yet shuffled)."""

    prompt: Any  # str or chat messages
    response_1: str
    response_2: str
    source_1: str
    source_2: str
    where: str  # "file.jsonl:3" or "prompts.jsonl:3", for messages


class RankCandidate(NamedTuple):
    """K responses to one prompt, in source order (not yet shuffled)."""

    prompt: Any
    responses: list[str]
    sources: list[str]
    where: str


def check_responses(k: int, flag: str = "--responses") -> None:
    if k != 2 and not MIN_RANKED <= k <= MAX_RANKED:
        raise BadInput(f"{flag} {k}: expected 2 (A/B pairs) or {MIN_RANKED} to {MAX_RANKED} (a ranking item "
                       "per prompt)")


@dataclass
class PairStats:
    candidates: int = 0
    identical: int = 0  # both responses the same text
    empty: int = 0  # a response with no visible text
    duplicates: int = 0  # an earlier candidate had the same prompt and responses
    kept: int = 0
    examples: list[str] = field(default_factory=list)  # where a few drops came from, for the log


def read_pair_file(path: str) -> list[Candidate]:
    """Candidates from a JSONL/JSON/CSV/Parquet file (see the module doc for the columns)."""
    from rlhf.data import read_records

    out = []
    for r in read_records(path):
        d = r.data
        if "prompt" not in d:
            raise BadInput(f"{r.where}: expected a 'prompt' field; record has {sorted(d)}")
        if "response_a" in d and "response_b" in d:
            r1, r2 = d["response_a"], d["response_b"]
        elif isinstance(d.get("responses"), list) and len(d["responses"]) == 2:
            r1, r2 = d["responses"]
        elif "chosen" in d and "rejected" in d:
            r1, r2 = d["chosen"], d["rejected"]
        else:
            raise BadInput(f"{r.where}: expected 'response_a' and 'response_b', 'responses' (a list of two), "
                           f"or 'chosen' and 'rejected'; record has {sorted(d)}")
        for key, value in (("first response", r1), ("second response", r2)):
            if not isinstance(value, str):
                raise BadInput(f"{r.where}: {key} must be a string, got {type(value).__name__}")
        prompt = _checked_prompt(d["prompt"], r.where)
        src = d.get("source_a", ""), d.get("source_b", "")
        out.append(Candidate(prompt, r1, r2, str(src[0]), str(src[1]), r.where))
    return out


def _checked_prompt(prompt, where: str):
    """A record's prompt: a string or a list of {role, content} messages; BadInput naming ``where`` otherwise."""
    if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(
            isinstance(m, dict) and "role" in m and "content" in m for m in prompt))):
        raise BadInput(f"{where}: 'prompt' must be a string or a list of {{role, content}} messages")
    return prompt


def read_ranking_file(path: str, k: int) -> list[RankCandidate]:
    """Ranking candidates from a file of ``{prompt, responses: [K strings]}`` (optional ``sources``)."""
    from rlhf.data import read_records

    out = []
    for r in read_records(path):
        d = r.data
        if "prompt" not in d:
            raise BadInput(f"{r.where}: expected a 'prompt' field; record has {sorted(d)}")
        responses = d.get("responses")
        if not isinstance(responses, list) or len(responses) != k:
            got = f"a list of {len(responses)}" if isinstance(responses, list) else sorted(d)
            raise BadInput(f"{r.where}: --responses {k}: expected 'responses', a list of {k} strings; got {got}")
        for n, value in enumerate(responses, 1):
            if not isinstance(value, str):
                raise BadInput(f"{r.where}: response {n} must be a string, got {type(value).__name__}")
        prompt = _checked_prompt(d["prompt"], r.where)
        sources = d.get("sources")
        sources = [str(x) for x in sources] if isinstance(sources, list) and len(sources) == k else [""] * k
        out.append(RankCandidate(prompt, list(responses), sources, r.where))
    return out


def _worth_labeling(candidates: list, responses: Callable[[Any], list[str]], stats: PairStats,
                    item: str) -> Iterator:
    """The candidates with no empty or repeated response and not seen before
    (same prompt and responses); each one left out is counted in ``stats``."""
    seen: set[str] = set()
    for c in candidates:
        texts = responses(c)
        if any(not x.strip() for x in texts):
            stats.empty += 1
            stats.examples.append(f"{c.where}: empty response")
            continue
        if len(set(texts)) < len(texts):
            stats.identical += 1
            stats.examples.append(f"{c.where}: identical responses")
            continue
        key = pair_key(c.prompt, *texts)
        if key in seen:
            stats.duplicates += 1
            stats.examples.append(f"{c.where}: duplicate {item}")
            continue
        seen.add(key)
        yield c


def make_rankings(candidates: list[RankCandidate], seed: int) -> tuple[list[NewPair], PairStats]:
    """Drop ranking candidates with an empty or repeated response and duplicates; shuffle each item's order."""
    rng = random.Random(seed)
    stats = PairStats(candidates=len(candidates))
    out = []
    for c in _worth_labeling(candidates, lambda c: c.responses, stats, "item"):
        order = list(zip(c.responses, c.sources, strict=True))
        rng.shuffle(order)
        out.append(new_ranking(c.prompt, [x for x, _ in order], [src for _, src in order], {"from": c.where}))
    stats.kept = len(out)
    if stats.examples:
        log.info("dropped %d ranking candidates, e.g. %s", len(stats.examples), "; ".join(stats.examples[:3]))
    return out, stats


def make_pairs(candidates: list[Candidate], seed: int) -> tuple[list[NewPair], PairStats]:
    """Drop identical/empty/duplicate candidates and shuffle each pair's sides."""
    rng = random.Random(seed)
    stats = PairStats(candidates=len(candidates))
    out = []
    for c in _worth_labeling(candidates, lambda c: [c.response_1, c.response_2], stats, "pair"):
        sides = [(c.response_1, c.source_1), (c.response_2, c.source_2)]
        rng.shuffle(sides)
        (ra, sa), (rb, sb) = sides
        out.append(NewPair(c.prompt, ra, rb, sa, sb, {"from": c.where}))
    stats.kept = len(out)
    if stats.examples:
        log.info("dropped %d candidate pairs, e.g. %s", len(stats.examples), "; ".join(stats.examples[:3]))
    return out, stats


def generate_candidates(prompts_path: str, checkpoints: list[str], max_new_tokens: int = 48,
                        temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                        batch_size: int = 16, limit: int | None = None) -> list[Candidate]:
    """Sample a response per prompt from each of two checkpoints, or two from one.

    Sampling (not greedy) so that one checkpoint gives two different
    responses; the seed makes a re-run produce the same pairs.
    """
    prompts, records, responses, sources = _sample(prompts_path, checkpoints, 2, max_new_tokens, temperature,
                                                   top_p, seed, batch_size, limit)
    return [Candidate(p, responses[0][i], responses[1][i], sources[0], sources[1], r.where)
            for i, (p, r) in enumerate(zip(prompts, records, strict=True))]


def generate_rank_candidates(prompts_path: str, checkpoints: list[str], k: int, max_new_tokens: int = 48,
                             temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                             batch_size: int = 16, limit: int | None = None) -> list[RankCandidate]:
    """K sampled responses per prompt: K from one checkpoint, or about half from each of two."""
    prompts, records, responses, sources = _sample(prompts_path, checkpoints, k, max_new_tokens, temperature,
                                                   top_p, seed, batch_size, limit)
    return [RankCandidate(p, [col[i] for col in responses], list(sources), r.where)
            for i, (p, r) in enumerate(zip(prompts, records, strict=True))]


def _sample(prompts_path: str, checkpoints: list[str], k: int, max_new_tokens: int, temperature: float,
            top_p: float, seed: int, batch_size: int, limit: int | None):
    """(prompts, records, one list of responses per column, the column's source), K columns."""
    from rlhf.data import normalize_prompts, read_records, render_prompt
    from rlhf.models import ModelConfig, context_length, load_causal_lm, load_tokenizer
    from rlhf.sampling import SamplingConfig, sample

    if not 1 <= len(checkpoints) <= 2:
        raise BadInput(f"--model: expected one or two checkpoints, got {len(checkpoints)}")
    records = read_records(prompts_path, limit=limit)
    prompts = normalize_prompts(records)
    per_model = [(k + 1) // 2, k // 2] if len(checkpoints) == 2 else [k]
    responses: list[list[str]] = []  # one list per response column
    sources: list[str] = []
    for name, n_samples in zip(checkpoints, per_model, strict=True):
        cfg = ModelConfig(name=name)
        try:
            tok = load_tokenizer(cfg)
            model = load_causal_lm(cfg, tok, seed=seed).eval()
        except OSError as e:  # not a checkpoint dir, and not on the hub (or offline)
            raise BadInput(f"--model {name}: cannot load a checkpoint ({str(e).splitlines()[0]})") from None
        room = (context_length(cfg) or 1024) - max_new_tokens
        if room < 8:
            raise BadInput(f"--max-new-tokens {max_new_tokens}: leaves no room for the prompt in "
                           f"{name}'s context of {context_length(cfg)} tokens")
        texts = [render_prompt(tok, p) for p in prompts]
        sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                  batch_size=batch_size)
        for n in range(n_samples):
            out = sample(model, tok, texts, sampling, seed + n, "cpu", max_prompt_tokens=room)
            responses.append(out.texts)
            sources.append(name if n_samples == 1 else f"{name}#sample{n + 1}")
        log.info("sampled %d responses x %d from %s", len(texts), n_samples, name)
    return prompts, records, responses, sources
