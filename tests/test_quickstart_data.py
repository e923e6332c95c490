"""Checks on the bundled quickstart task: data files, generator, gold scorer, tokenizer."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "quickstart"
TOKENIZER = REPO / "rlhf" / "assets" / "tiny_tokenizer"

FIELDS = {
    "sft_train": {"prompt", "completion"},
    "sft_test": {"prompt", "completion"},
    "prefs_train": {"prompt", "chosen", "rejected"},
    "prefs_test": {"prompt", "chosen", "rejected"},
    "prompts_train": {"prompt"},
    "prompts_test": {"prompt"},
}


def load(name: str) -> list[dict]:
    with open(DATA / f"{name}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def load_generator():
    spec = importlib.util.spec_from_file_location("make_quickstart", DATA / "make_quickstart.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    return gen


def test_generator_reproduces_committed_files(tmp_path):
    # Regenerating into a tmp dir must give byte-identical files: proves the
    # generator is deterministic and that the committed outputs are up to date.
    gen = load_generator()
    gen.main(tmp_path / "data", tmp_path / "tok")
    stale = "stale: rerun python data/quickstart/make_quickstart.py"

    for fname in [f"{name}.jsonl" for name in FIELDS] + ["stats.json"]:
        assert sha256(tmp_path / "data" / fname) == sha256(DATA / fname), f"{fname} {stale}"
    made = sorted(p.name for p in (tmp_path / "tok").iterdir())
    assert made == sorted(p.name for p in TOKENIZER.iterdir())
    for fname in made:
        assert sha256(tmp_path / "tok" / fname) == sha256(TOKENIZER / fname), f"{fname} {stale}"


def test_files_parse_with_documented_fields():
    stats = json.loads((DATA / "stats.json").read_text())
    for name, fields in FIELDS.items():
        rows = load(name)
        assert len(rows) == stats["counts"][name]
        for row in rows:
            assert set(row) == fields
            assert all(isinstance(v, str) and v for v in row.values())
            for key in fields - {"prompt"}:
                # Responses continue the prompt: leading space, final period.
                assert row[key].startswith(" ") and row[key].endswith(".")


def test_preference_pairs_differ():
    for name in ("prefs_train", "prefs_test"):
        assert all(r["chosen"] != r["rejected"] for r in load(name))


def test_test_titles_disjoint_from_train():
    gen = load_generator()
    patterns = [re.compile(re.escape(t).replace(re.escape("{t}"), "(.+)") + "$") for t in gen.PROMPT_TEMPLATES]

    def titles(names):
        out = set()
        for name in names:
            for r in load(name):
                (title,) = [m.group(1) for p in patterns if (m := p.match(r["prompt"]))][:1]
                out.add(title.removeprefix("The "))
        return out

    # Held-out titles, not just held-out prompt wordings.
    assert not titles(["sft_train", "prefs_train", "prompts_train"]) & titles(
        ["sft_test", "prefs_test", "prompts_test"]
    )


def test_prompts_files_have_unique_prompts():
    for name in ("prompts_train", "prompts_test"):
        prompts = [r["prompt"] for r in load(name)]
        assert len(set(prompts)) == len(prompts)


def test_gold_scorer_sign_and_contract():
    from rlhf.gold import vader_sentiment

    pos, neg = vader_sentiment(["Review of X:"] * 2, [" wonderful brilliant", " awful boring"])
    assert pos > 0 > neg
    assert vader_sentiment([], []) == []
    with pytest.raises(ValueError):
        vader_sentiment(["a"], [])


def test_sft_gold_is_balanced_and_labels_are_noisy():
    from rlhf.gold import vader_sentiment

    rows = load("sft_train")
    scores = vader_sentiment([r["prompt"] for r in rows], [r["completion"] for r in rows])
    stats = json.loads((DATA / "stats.json").read_text())
    assert abs(sum(scores) / len(scores) - stats["sft_train_gold"]["mean"]) < 1e-4
    assert abs(stats["sft_train_gold"]["mean"]) < 0.1  # room for PPO to raise it
    assert min(scores) < -0.5 and max(scores) > 0.5
    ceiling = stats["prefs_test_agreement_ceiling"]
    assert 0.8 <= ceiling["realised"] <= 0.92 and 0.8 <= ceiling["expected"] <= 0.92


def test_tokenizer_special_tokens(tokenizer):
    assert len(tokenizer) == 2048
    ids = tokenizer.convert_tokens_to_ids(["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert ids == [0, 1, 2, 3]
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == tokenizer.bos_token_id == 1
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "right" and tokenizer.model_max_length == 256
    chat = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tokenizer_round_trips(tokenizer):
    texts = [r["prompt"] + r["completion"] for r in load("sft_test")[:200]]
    texts += ["héllo wörld — naïve café 你好 🎬\t\n  two  spaces ", "x = {'a': [1, 2.5]}\r\n", ""]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
    # Task text should be compact (a whole word or punctuation mark per token,
    # mostly), so the tiny model's 256-token context is plenty.
    task = texts[:200]
    n_tokens = sum(len(tokenizer(t)["input_ids"]) for t in task)
    assert n_tokens / sum(len(t.split()) for t in task) < 1.4


def test_tokenizer_asset_is_small():
    assert sum(p.stat().st_size for p in TOKENIZER.iterdir()) < 300_000
