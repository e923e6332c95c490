"""Review openings used as prompts by recipes/gpt2-imdb.yaml.

The classic IMDB sentiment demo (Ziegler et al. 2019; TRL's gpt2-sentiment
notebook) prompts the policy with the first few tokens of an IMDB review and
rewards positive continuations. rlhf's prompt files carry a ``prompt`` field,
so instead of cutting reviews at run time the openings are bundled here:
sentiment-neutral, review-like beginnings from the templates below. Subjects
in the test file never occur in the train file.

    python data/imdb/make_prompts.py     # rewrites prompts_train.jsonl, prompts_test.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

TRAIN_SUBJECTS = [
    "This movie", "This film", "The movie", "The film", "This picture", "This documentary", "This comedy",
    "This thriller", "This drama", "This western", "This sequel", "This remake", "The story",
    "The plot", "The acting", "The cast", "The script", "The ending", "The soundtrack", "The director",
]
TEST_SUBJECTS = ["This horror film", "This musical", "The screenplay", "The lead actress", "This cartoon"]
PATTERNS = [
    "{s}", "{s} is", "{s} was", "I think {l}", "I watched {l} and", "When I saw {l},", "Honestly, {l}",
    "I rented {l} because", "My friends told me {l}", "After ten minutes, {l}", "To be fair, {l}",
    "I have to say {l}",
]


def prompts(subjects: list[str]) -> list[str]:
    out = []
    for s in subjects:
        lower = s[0].lower() + s[1:]
        out += [p.format(s=s, l=lower) for p in PATTERNS]
    return out


if __name__ == "__main__":
    rng = random.Random(0)
    for name, subjects in (("prompts_train.jsonl", TRAIN_SUBJECTS), ("prompts_test.jsonl", TEST_SUBJECTS)):
        rows = prompts(subjects)
        rng.shuffle(rows)
        with (HERE / name).open("w", encoding="utf-8") as f:
            for p in rows:
                f.write(json.dumps({"prompt": p}) + "\n")
        print(f"{name}: {len(rows)} prompts")
