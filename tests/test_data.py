"""Data loading and format normalisation (rlhf.data), and the reward stage's
pair encoding / truncation (rlhf.reward_model). Milliseconds each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.data import (DataConfig, Record, load_splits, normalize_preferences, normalize_prompts, normalize_sft,
                       preference_splits, read_records, read_splits, render_pair, split_hh)
from rlhf.errors import BadInput
from rlhf.rewards import PairStats, encode_response, tokenize_pairs, truncate_pair

ROWS = [
    {"prompt": "Review of Sky:", "completion": " Great fun."},
    {"prompt": "My take on Road:", "completion": " Dull, sadly."},
    {"prompt": "Just saw Harbor.", "completion": " Loved it, with \"quotes\", and commas."},
]


def write_jsonl(path: Path, rows: list, raw_lines: list[str] = ()) -> Path:
    lines = [json.dumps(r) for r in rows] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok():
    from rlhf.models import ModelConfig, load_tokenizer

    return load_tokenizer(ModelConfig("tiny"))


# ---------------------------------------------------------------- file types


def test_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS[:1], ["", "   "])  # blank lines are skipped
    path.write_text(path.read_text() + json.dumps(ROWS[1]) + "\n")
    records = read_records(str(path))
    assert [r.data for r in records] == ROWS[:2]
    assert [r.where for r in records] == [f"{path}:1", f"{path}:4"]  # real line numbers


@pytest.mark.parametrize("wrapped", [False, True])
def test_json_list(tmp_path, wrapped):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": ROWS} if wrapped else ROWS, indent=2))
    records = read_records(str(path))
    assert [r.data for r in records] == ROWS
    assert records[2].where == f"{path}: item 2"


def test_csv(tmp_path):
    import csv

    path = tmp_path / "d.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "completion"])
        w.writeheader()
        w.writerows(ROWS)
    records = read_records(str(path))
    assert [r.data for r in records] == ROWS  # quotes and commas survive
    assert records[0].where == f"{path}:2"  # the header is line 1


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    records = read_records(str(path))
    assert [r.data for r in records] == ROWS
    assert records[1].where == f"{path}: row 1"


def test_parquet_chat_messages(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert normalize_sft(read_records(str(path))) == rows


@pytest.mark.parametrize("name, content, expected", [
    ("bad.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n', ":2: malformed JSON"),
    ("list.jsonl", '["a", "b"]\n', ":1: expected a JSON object, got list"),
    ("bad.json", '[\n{"prompt": "a"},\n{oops}\n]', ":3: malformed JSON"),
    ("scalar.json", '{"a": 1, "b": 2}', ": expected a JSON list of objects"),
    ("empty.jsonl", "\n\n", ": no records"),
    ("d.txt", "hello", ": unsupported file type '.txt'"),
    ("broken.parquet", "not parquet", ": not a readable Parquet file"),
])
def test_malformed_files(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(BadInput) as e:
        read_records(str(path))
    assert str(e.value).startswith(f"{path}{expected}")


def test_missing_file(tmp_path):
    with pytest.raises(BadInput, match=r"nope\.jsonl: file not found"):
        read_records(str(tmp_path / "nope.jsonl"))


def test_missing_hub_dataset_is_bad_input():
    # Offline (conftest), a name that is neither a local file nor a cached hub dataset.
    with pytest.raises(BadInput, match=r"dataset 'no-such-owner/no-such-dataset' split 'train'"):
        read_records("no-such-owner/no-such-dataset")


# ---------------------------------------------------------------- columns, splits


def test_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "Q?", "answer": "A.", "id": 3}])
    records = read_records(str(path), columns={"prompt": "question", "completion": "answer"})
    assert records[0].data == {"prompt": "Q?", "completion": "A.", "id": 3}
    assert normalize_sft(records) == [{"prompt": "Q?", "completion": "A."}]


def test_column_mapping_missing_source_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "Q?", "answer": "A."}, {"question": "Q2"}])
    with pytest.raises(BadInput) as e:
        read_records(str(path), columns={"prompt": "question", "completion": "answer"})
    assert str(e.value).startswith(f"{path}:2: column 'answer' (from the recipe's `columns`) not found")


def test_splits_max_samples_and_eval_fraction(tmp_path):
    rows = [{"text": f"row {i}"} for i in range(20)]
    path = str(write_jsonl(tmp_path / "d.jsonl", rows))
    train, held = load_splits(DataConfig(path=path, eval_fraction=0.25), seed=0)
    assert len(train) == 15 and len(held) == 5
    assert {r.where for r in train}.isdisjoint({r.where for r in held})
    again, _ = load_splits(DataConfig(path=path, eval_fraction=0.25), seed=0)
    assert again == train  # deterministic for a seed
    train, held = load_splits(DataConfig(path=path, eval_path=path, max_samples=3, max_eval_samples=2), seed=0)
    assert [r.data["text"] for r in train] == ["row 0", "row 1", "row 2"] and len(held) == 2
    train, held = load_splits(DataConfig(path=path), seed=0)
    assert len(train) == 20 and held == []


def test_max_eval_samples_draws_a_seeded_random_subset_in_file_order(tmp_path):
    path = str(write_jsonl(tmp_path / "d.jsonl", [{"text": f"row {i}"} for i in range(50)]))
    cfg = DataConfig(path=path, eval_path=path, max_eval_samples=10)
    got = read_splits(cfg, seed=3)
    rows = [int(r.data["text"].split()[1]) for r in got.held]
    assert len(rows) == 10 and got.held_available == 50 and len(got.train) == 50
    assert rows != list(range(10)) and rows == sorted(rows)  # not the first N; kept in file order
    assert [r.data for r in read_splits(cfg, seed=3).held] == [r.data for r in got.held]  # the seed decides
    assert [r.data for r in read_splits(cfg, seed=4).held] != [r.data for r in got.held]
    everything = read_splits(DataConfig(path=path, eval_path=path, max_eval_samples=80), seed=3)
    assert len(everything.held) == everything.held_available == 50  # N >= available: all of them


def test_preference_splits_report_the_held_out_records_available(tmp_path):
    pairs = [{"prompt": "P", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(30)]
    path = str(write_jsonl(tmp_path / "p.jsonl", pairs))
    got = preference_splits(DataConfig(path=path, eval_path=path, max_eval_samples=8), seed=0)
    assert len(got.train) == 30 and len(got.held) == 8 and got.held_available == 30 and got.dropped == (0, 0)


# ---------------------------------------------------------------- SFT formats


def rec(data: dict, where: str = "d.jsonl:1") -> Record:
    return Record(data, where)


def test_sft_formats():
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert normalize_sft([rec({"prompt": "p", "completion": "c", "extra": 1})]) == [{"prompt": "p", "completion": "c"}]
    assert normalize_sft([rec({"text": "all of it"})]) == [{"text": "all of it"}]
    assert normalize_sft([rec({"messages": chat})]) == [{"messages": chat}]
    # prompt/completion as chat messages (TRL's conversational prompt-completion)
    conv = {"prompt": chat[:1], "completion": chat[1:]}
    assert normalize_sft([rec(conv)]) == [conv]


@pytest.mark.parametrize("data, expected", [
    ({"prompt": "p", "completion": "  "}, "'completion' is empty"),
    ({"prompt": 3, "completion": "c"}, "'prompt' must be a non-empty string or a list of {role, content} messages"),
    ({"messages": [{"role": "user"}]}, "'messages' must be a list of {role, content} objects"),
    ({"question": "q"}, "expected 'prompt' and 'completion', 'messages', or 'text'"),
])
def test_sft_invalid(data, expected):
    with pytest.raises(BadInput) as e:
        normalize_sft([rec(data, "f.jsonl:7")])
    assert str(e.value).startswith("f.jsonl:7: ") and expected in str(e.value)


def test_prompts():
    chat = [{"role": "user", "content": "hi"}]
    assert normalize_prompts([rec({"prompt": "a"}), rec({"prompt": chat})]) == ["a", chat]
    with pytest.raises(BadInput, match="f.jsonl:2: expected a 'prompt' field"):
        normalize_prompts([rec({"text": "a"}, "f.jsonl:2")])


# ---------------------------------------------------------------- preference formats


def test_preferences_explicit_prompt_and_margin():
    rows, dropped = normalize_preferences([
        rec({"prompt": "P", "chosen": " good", "rejected": " bad", "margin": 2}),
        rec({"prompt": "P", "chosen": " fine", "rejected": " meh", "id": 9}),
    ])
    assert dropped == 0
    assert rows == [{"prompt": "P", "chosen": " good", "rejected": " bad", "margin": 2.0},
                    {"prompt": "P", "chosen": " fine", "rejected": " meh"}]
    assert isinstance(rows[0]["margin"], float)


def test_anthropic_hh_transcripts_split_at_last_assistant_turn():
    context = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant:"
    rows, _ = normalize_preferences([rec({"chosen": context + " Why did the chicken...",
                                          "rejected": context + " No."})])
    assert rows == [{"prompt": context, "chosen": " Why did the chicken...", "rejected": " No."}]
    assert split_hh("\n\nHuman: a\n\nAssistant: b") == ("\n\nHuman: a\n\nAssistant:", " b")
    with pytest.raises(ValueError):
        split_hh("no turns here")


def test_hh_transcripts_must_share_the_prompt():
    with pytest.raises(BadInput, match="transcripts differ before the last Assistant turn"):
        normalize_preferences([rec({"chosen": "\n\nHuman: a\n\nAssistant: x",
                                    "rejected": "\n\nHuman: b\n\nAssistant: y"})])
    with pytest.raises(BadInput, match="must be Anthropic-HH transcripts"):
        normalize_preferences([rec({"chosen": "x", "rejected": "y"})])


def test_chat_message_pairs():
    user = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]
    good, bad = {"role": "assistant", "content": "hello!"}, {"role": "assistant", "content": "go away"}
    rows, _ = normalize_preferences([rec({"chosen": user + [good], "rejected": user + [bad]})])
    assert rows == [{"prompt": user, "chosen": [good], "rejected": [bad]}]
    with pytest.raises(BadInput, match="must share every message but the last"):
        normalize_preferences([rec({"chosen": user + [good], "rejected": user[:1] + [bad]})])
    with pytest.raises(BadInput, match="no prompt before the last message"):
        normalize_preferences([rec({"chosen": [good], "rejected": [bad]})])


def test_empty_responses_are_valid_pairs():
    """Real data has them (a model that answered nothing, a lone space): they are judged, not refused."""
    user = [{"role": "user", "content": "hi"}]
    rows, dropped = normalize_preferences([
        rec({"prompt": "P", "chosen": " Fine.", "rejected": " "}),
        rec({"prompt": "P", "chosen": "", "rejected": " No."}),
        rec({"chosen": "\n\nHuman: a\n\nAssistant:", "rejected": "\n\nHuman: a\n\nAssistant: b"}),
        rec({"chosen": user + [{"role": "assistant", "content": ""}],
             "rejected": user + [{"role": "assistant", "content": "go away"}]}),
    ])
    assert dropped == 0 and [r["rejected"] for r in rows[:2]] == [" ", " No."] and rows[1]["chosen"] == ""
    assert rows[2]["chosen"] == "" and rows[3]["chosen"] == [{"role": "assistant", "content": ""}]


def test_empty_response_is_scored_by_the_stage_encoding(tok):
    pairs, stats = tokenize_pairs([{"prompt": "Review of Sky:", "chosen": " Great fun.", "rejected": ""}], tok, 16)
    assert pairs[0]["rejected_ids"][-1] == tok.eos_token_id  # prompt + EOS: an answer of nothing
    assert pairs[0]["chosen_ids"] != pairs[0]["rejected_ids"] and stats.identical == 0


@pytest.mark.parametrize("data, expected", [
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "'prompt' is empty"),
    ({"prompt": "P", "chosen": None, "rejected": "b"}, "'chosen' must be a string or a list of"),
    ({"prompt": "P", "chosen": "same", "rejected": "same"}, "'chosen' and 'rejected' are identical"),
    ({"prompt": "P", "chosen": " ", "rejected": " "}, "'chosen' and 'rejected' are identical"),
    ({"prompt": "P", "chosen": "a"}, "expected 'chosen' and 'rejected'"),
])
def test_invalid_pairs_error_with_location(data, expected):
    with pytest.raises(BadInput) as e:
        normalize_preferences([rec(data, "p.jsonl:5")])
    assert str(e.value).startswith("p.jsonl:5: ") and expected in str(e.value)


def test_on_invalid_drop_counts():
    records = [
        rec({"prompt": "P", "chosen": " a", "rejected": " b"}, "p.jsonl:1"),
        rec({"prompt": "P", "chosen": " b", "rejected": " b"}, "p.jsonl:2"),
        rec({"prompt": "P", "chosen": " c", "rejected": " c"}, "p.jsonl:3"),
        rec({"prompt": "P", "chosen": " d", "rejected": " e"}, "p.jsonl:4"),
    ]
    rows, dropped = normalize_preferences(records, on_invalid="drop")
    assert dropped == 2 and [r["chosen"] for r in rows] == [" a", " d"]
    with pytest.raises(BadInput, match="p.jsonl:2"):
        normalize_preferences(records, on_invalid="error")
    with pytest.raises(BadInput, match="no valid preference pairs"):
        normalize_preferences(records[1:3], on_invalid="drop")


# ---------------------------------------------------------------- reward-model pair encoding


def test_truncate_pair_fits_unchanged():
    stats = PairStats()
    assert truncate_pair([1, 2, 3], [4, 5], 5, stats) == [1, 2, 3, 4, 5]
    assert (stats.prompt_truncated, stats.response_truncated) == (0, 0)


def test_truncate_pair_drops_prompt_from_the_left_and_keeps_response():
    stats = PairStats()
    # 6 prompt + 3 response tokens into 5: keep the last 2 prompt tokens.
    assert truncate_pair([1, 2, 3, 4, 5, 6], [7, 8, 9], 5, stats) == [5, 6, 7, 8, 9]
    assert truncate_pair([1, 2, 3], [4, 5, 6, 7], 5, stats) == [3, 4, 5, 6, 7]
    assert (stats.prompt_truncated, stats.response_truncated) == (2, 0)


def test_truncate_pair_response_longer_than_max_length():
    stats = PairStats()
    # The response alone (6) exceeds 4: one prompt token, then the response's start.
    assert truncate_pair([1, 2], [3, 4, 5, 6, 7, 8], 4, stats) == [2, 3, 4, 5]
    # Exactly max_length: no room for any prompt token, so it counts as response-truncated.
    assert truncate_pair([1, 2], [3, 4, 5, 6], 4, stats) == [2, 3, 4, 5]
    assert (stats.prompt_truncated, stats.response_truncated) == (0, 2)
    assert truncate_pair([1], [2, 3], 3) == [1, 2, 3]  # stats are optional


def test_encode_response_appends_eos_for_text(tok):
    p_ids, r_ids = encode_response(tok, "Review of Sky:", " Great fun.")
    assert p_ids == tok("Review of Sky:", add_special_tokens=False)["input_ids"]
    assert r_ids == tok(" Great fun.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.eos_token_id not in p_ids and r_ids.count(tok.eos_token_id) == 1
    # A response that already ends in EOS gets no second one.
    _, again = encode_response(tok, "Review of Sky:", " Great fun." + tok.eos_token)
    assert again == r_ids


def test_encode_response_chat_uses_template_end_of_turn(tok):
    prompt = [{"role": "user", "content": "hi"}]
    p_ids, r_ids = encode_response(tok, prompt, [{"role": "assistant", "content": "hello"}])
    p_text, r_text = render_pair(tok, prompt, [{"role": "assistant", "content": "hello"}])
    assert p_text.endswith("<|im_start|>assistant\n") and r_text == "hello<|im_end|>\n"
    assert tok.decode(p_ids) + tok.decode(r_ids) == tok.apply_chat_template(
        prompt + [{"role": "assistant", "content": "hello"}], tokenize=False)


def test_tokenize_pairs_keeps_every_pair_and_counts(tok):
    long_prompt = "word " * 100
    rows = [{"prompt": "Short:", "chosen": " yes", "rejected": " no", "margin": 1.0},
            {"prompt": long_prompt, "chosen": " yes", "rejected": " no"}]
    pairs, stats = tokenize_pairs(rows, tok, max_length=16)
    assert len(pairs) == 2 and stats.pairs == 2
    assert stats.prompt_truncated == 2 and stats.response_truncated == 0  # chosen and rejected of pair 2
    assert all(len(p["chosen_ids"]) <= 16 and len(p["rejected_ids"]) <= 16 for p in pairs)
    assert pairs[1]["chosen_ids"][-1] == tok.eos_token_id
    assert pairs[0]["margin"] == 1.0 and "margin" not in pairs[1]
