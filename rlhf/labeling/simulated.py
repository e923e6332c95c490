"""Simulated labelers: people stand-ins that label through the real HTTP API.

For tests, demos and research without people. Each simulated labeler is a
client of a running labeling server (``GET /api/next``, ``POST /api/labels``
with its bearer token), so the whole human path (leases, overlap, the
durable store, exports) runs exactly as with people.

Labeler ``i`` judges a pair by a gold scorer ``g`` with the Bradley-Terry
model (the model reward models are trained under)::

    P(A preferred) = sigmoid((g(A) - g(B)) / t_i)

with its own temperature ``t_i`` (log-spaced over ``[t / spread, t * spread]``
across labelers: some careful, some noisy). It skips a pair with probability
``abstain``; an adversarial labeler reports the opposite of its judgement.
Every draw comes from a RNG seeded by (seed, labeler, pair id): a pair gets
the same label from the same labeler however often a run is interrupted
and resumed.
"""

from __future__ import annotations

import json
import math
import random
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from rlhf.config import opt, require_positive
from rlhf.rewards import load_function


@dataclass
class SimulatedConfig:
    """Simulated labelers (Bradley-Terry on a gold score)."""

    count: int = opt(5, "how many labelers (named sim-1, sim-2, ...)")
    gold: str = opt("rlhf.gold:vader_sentiment", "the gold scorer (module:function) they judge by")
    temperature: float = opt(0.1, "Bradley-Terry temperature t: P(A) = sigmoid((gold(A) - gold(B)) / t); "
                                  "smaller = more reliable")
    spread: float = opt(2.0, "labelers' temperatures are log-spaced over [t / spread, t * spread]")
    abstain: float = opt(0.0, "probability that a labeler skips a pair")
    adversarial: int = opt(0, "how many of the labelers (the last ones) report the opposite choice")
    seed: int = opt(0, "seed of every labeler's draws (with the labeler's name and the pair id)")

    def check(self, fail):
        require_positive(self, fail, "count")
        if not 0 < self.temperature < float("inf"):
            raise fail("temperature", f"expected a finite number > 0, got {self.temperature}")
        if not 1 <= self.spread < float("inf"):
            raise fail("spread", f"expected a finite number >= 1, got {self.spread}")
        if not 0 <= self.abstain < 1:
            raise fail("abstain", f"expected a probability in [0, 1), got {self.abstain}")
        if not 0 <= self.adversarial <= self.count:
            raise fail("adversarial", f"expected 0..count ({self.count}), got {self.adversarial}")

    def names(self) -> list[str]:
        return [f"sim-{i + 1}" for i in range(self.count)]

    def temperature_of(self, i: int) -> float:
        if self.count == 1:
            return self.temperature
        return self.temperature * self.spread ** (2 * i / (self.count - 1) - 1)


def choose(gold_a: float, gold_b: float, temperature: float, abstain: float, adversarial: bool,
           rng: random.Random) -> str:
    """One simulated judgement: "A", "B" or "skip" (pure, given the RNG)."""
    if rng.random() < abstain:
        return "skip"
    z = (gold_a - gold_b) / temperature
    p_a = 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0
    choice = "A" if rng.random() < p_a else "B"
    if adversarial:
        choice = "B" if choice == "A" else "A"
    return choice


class Client:
    """A minimal JSON client of the labeling API. The standard library's
    urllib is enough for two endpoints, one request at a time; retries cover
    a server that is briefly unavailable (submissions are idempotent by
    client id)."""

    def __init__(self, url: str, token: str, retries: int = 5):
        self.url, self.token, self.retries = url.rstrip("/"), token, retries

    def call(self, method: str, path: str, body: dict | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        for attempt in range(self.retries):
            req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    return json.loads(resp.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                if e.code < 500 or attempt == self.retries - 1:
                    raise
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if attempt == self.retries - 1:
                    raise
            time.sleep(0.2 * 2 ** attempt)
        raise AssertionError("unreachable")


class SimulatedLabeler:
    """One simulated labeler, talking to the server as a person's page would."""

    def __init__(self, cfg: SimulatedConfig, index: int, url: str, token: str, gold=None):
        self.cfg, self.name = cfg, cfg.names()[index]
        self.temperature = cfg.temperature_of(index)
        self.adversarial = index >= cfg.count - cfg.adversarial
        self.client = Client(url, token)
        self.gold = gold or load_function(cfg.gold)

    def label_next(self) -> tuple[int, str] | None:
        """Take the next pair this labeler is offered, judge it and submit the
        label; returns (pair id, choice), or None when no pair is left for them."""
        pair = self.client.call("GET", "/api/next")["pair"]
        if pair is None:
            return None
        prompt = pair["prompt"]
        g_a, g_b = (float(v) for v in self.gold([prompt, prompt], [pair["response_a"], pair["response_b"]]))
        rng = random.Random(f"{self.cfg.seed}:{self.name}:{pair['id']}")
        choice = choose(g_a, g_b, self.temperature, self.cfg.abstain, self.adversarial, rng)
        self.client.call("POST", "/api/labels", {"client_id": f"{self.name}-pair-{pair['id']:08d}",
                                                 "pair_id": pair["id"], "choice": choice})
        return pair["id"], choice
