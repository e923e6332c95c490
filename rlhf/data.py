"""Dataset loading and format normalisation, with errors that name file and line.

Sources: local JSONL / JSON / CSV / Parquet files, or a Hugging Face hub
dataset name (``datasets.load_dataset``), or a URL whose scheme a higher layer
registered a reader for (``register_reader``; rlhf.labeling registers its label
database). Every record keeps where it came from (``file:line``) so a bad
record is reported precisely.

Formats, after the recipe's column mapping is applied:

- SFT: ``prompt``/``completion`` (strings or chat messages), ``text``, or
  ``messages`` (a chat conversation).
- Preferences: ``prompt``/``chosen``/``rejected`` (explicit prompt),
  ``chosen``/``rejected`` full Anthropic-HH transcripts
  (``\\n\\nHuman: ... \\n\\nAssistant: ...``; the prompt is everything up to
  the last Assistant turn), or chat messages (the prompt is every message
  before the last one). An optional ``margin`` column is kept.
- Prompts (PPO / eval): ``prompt`` (string or chat messages), or, for
  preference data without one, the prompt of its ``chosen`` response (an
  Anthropic-HH transcript up to the last Assistant turn, or every message but
  the last), so one preference dataset can feed both the reward and PPO stages.
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterable
from typing import Any, Literal, NamedTuple

from rlhf.config import opt
from rlhf.errors import BadInput

LOCAL_SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class DataConfig:
    """Where a stage's records come from and how their columns are named."""

    path: str = opt("", "local .jsonl/.json/.csv/.parquet file, a hub dataset name, or a labeling "
                        "database (sqlite:///labels.db?project=NAME)")
    split: str = opt("train", "split to read when `path` is a hub dataset")
    eval_path: str | None = opt(None, "held-out file or hub dataset name (default: same as `path`)")
    eval_split: str | None = opt(None, "held-out split of a hub dataset (e.g. test)")
    eval_fraction: float = opt(0.0, "hold out this fraction of `path` when no eval_path/eval_split is given")
    columns: dict[str, str] = opt({}, "rename columns to the expected names, e.g. {prompt: question}")
    max_samples: int | None = opt(None, "use only the first N training records (after shuffling nothing)")
    max_eval_samples: int | None = opt(None, "use N held-out records drawn at random with the recipe seed (the "
                                             "reward stage reports the accuracy as on a subset, with its interval)")
    on_invalid: Literal["error", "drop"] = opt(
        "error", "a malformed record (a missing or empty prompt, identical responses, ...) is an error, or is "
                 "dropped and counted; an empty response is valid (it is judged like any other)")

    def check(self, fail):
        if not self.path:
            raise fail("path", "required: a data file or a hub dataset name")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise fail("eval_fraction", f"expected a number in [0, 1), got {self.eval_fraction}")
        for key in ("max_samples", "max_eval_samples"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise fail(key, f"expected a positive integer or null, got {getattr(self, key)}")


class Record(NamedTuple):
    data: dict[str, Any]
    where: str  # "file.jsonl:12" or "imdb[train] row 12"


def is_local(path: str) -> bool:
    return Path(path).suffix.lower() in LOCAL_SUFFIXES or os.path.exists(path)


def _read_text(p: Path, path: str) -> str:
    """The file's text (a leading BOM dropped); BadInput naming the line and byte
    offset of the first byte that is not UTF-8."""
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - data.rfind(b"\n", 0, e.start)
        raise BadInput(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at byte offset {e.start}, "
                       f"byte {column} of the line); save the file as UTF-8") from None
    return text.removeprefix("\ufeff")


def _read_local(path: str) -> list[Record]:
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"{path}: file not found")
    kind = LOCAL_SUFFIXES.get(p.suffix.lower())
    if kind is None:
        raise BadInput(f"{path}: unsupported file type '{p.suffix}' (expected .jsonl, .json, .csv or .parquet)")
    records = []
    if kind == "jsonl":
        with io.StringIO(_read_text(p, path), newline=None) as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BadInput(f"{path}:{i}: malformed JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise BadInput(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
                records.append(Record(obj, f"{path}:{i}"))
    elif kind == "json":
        try:
            obj = json.loads(_read_text(p, path))
        except json.JSONDecodeError as e:
            raise BadInput(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
            obj = next(iter(obj.values()))  # {"data": [...]} wrapper
        if not isinstance(obj, list) or not all(isinstance(o, dict) for o in obj):
            raise BadInput(f"{path}: expected a JSON list of objects")
        records = [Record(o, f"{path}: item {i}") for i, o in enumerate(obj)]
    elif kind == "csv":
        with io.StringIO(_read_text(p, path), newline="") as f:
            # Row numbers count the header as line 1, like a spreadsheet.
            reader = csv.DictReader(f)
            try:
                records = [Record(dict(row), f"{path}:{i}") for i, row in enumerate(reader, start=2)]
            except csv.Error as e:
                raise BadInput(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    else:
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(p).to_pylist()
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise BadInput(f"{path}: not a readable Parquet file ({e})") from None
        records = [Record(r, f"{path}: row {i}") for i, r in enumerate(rows)]
    if not records:
        raise BadInput(f"{path}: no records")
    return records


def _read_hub(name: str, split: str) -> list[Record]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        # ConnectionError: offline, or a mistyped local path without a file suffix.
        raise BadInput(f"dataset '{name}' split '{split}': not a local file and cannot load it "
                       f"from the hub ({e})") from None
    return [Record(dict(r), f"{name}[{split}] row {i}") for i, r in enumerate(ds)]


# Readers for data paths that are URLs, by scheme (``sqlite``, ``postgresql``, ...).
# This module reads files and hub datasets itself; a higher layer registers a
# reader for its own kind of source (rlhf.labeling: the label database, so a
# reward stage's ``data.path`` may be ``sqlite:///labels.db?project=NAME``), and
# the entry points import it (rlhf.recipe.load_plugins).
_READERS: dict[str, Callable[[str], list[Record]]] = {}
# Schemes the package's own plug-ins serve, for a helpful error when none is registered.
_KNOWN_SCHEMES = {"sqlite": "rlhf.labeling", "postgresql": "rlhf.labeling", "postgres": "rlhf.labeling"}


def register_reader(schemes: Iterable[str], reader: Callable[[str], list[Record]]) -> None:
    """Make ``read_records`` call ``reader(path)`` for paths ``SCHEME:...`` (or
    ``SCHEME+driver:...``) with any of ``schemes``."""
    for scheme in schemes:
        _READERS[scheme.lower()] = reader


def _reader_for(path: str) -> Callable[[str], list[Record]] | None:
    scheme, colon, _ = path.partition(":")
    scheme = scheme.split("+", 1)[0].lower()
    if not colon or not scheme.isidentifier():
        return None
    if scheme in _READERS:
        return _READERS[scheme]
    if scheme in _KNOWN_SCHEMES:
        raise BadInput(f"{path}: no reader registered for {scheme}: data paths "
                       f"(import {_KNOWN_SCHEMES[scheme]} first, or run through `rlhf`)")
    return None


def read_records(path: str, split: str = "train", columns: dict[str, str] | None = None,
                 limit: int | None = None) -> list[Record]:
    """Read raw records from a local file, a registered URL reader (e.g. a labeling
    database) or a hub dataset; rename columns."""
    reader = _reader_for(path)
    if reader is not None:
        records = reader(path)
    else:
        records = _read_local(path) if is_local(path) else _read_hub(path, split)
    if limit is not None:
        records = records[:limit]
    if columns:
        renamed = []
        for r in records:
            missing = [src for src in columns.values() if src not in r.data]
            if missing:
                raise BadInput(f"{r.where}: column '{missing[0]}' (from the recipe's `columns`) not found; "
                               f"record has {sorted(r.data)}")
            d = {k: v for k, v in r.data.items() if k not in columns.values()}
            d.update({dst: r.data[src] for dst, src in columns.items()})
            renamed.append(Record(d, r.where))
        records = renamed
    return records


class Splits(NamedTuple):
    train: list[Record]
    held: list[Record]  # after max_eval_samples
    held_available: int  # held-out records before max_eval_samples


def load_splits(cfg: DataConfig, seed: int) -> tuple[list[Record], list[Record]]:
    """Train and held-out records as configured (held-out may be empty)."""
    return read_splits(cfg, seed)[:2]


def read_splits(cfg: DataConfig, seed: int) -> Splits:
    """``load_splits``, also saying how many held-out records there were
    before ``max_eval_samples`` drew its random subset."""
    train = read_records(cfg.path, cfg.split, cfg.columns)
    if cfg.eval_path or cfg.eval_split:
        held = read_records(cfg.eval_path or cfg.path, cfg.eval_split or cfg.split, cfg.columns)
    elif cfg.eval_fraction > 0:
        import random

        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, int(len(train) * cfg.eval_fraction))
        held = [train[i] for i in sorted(order[:n_eval])]
        train = [train[i] for i in sorted(order[n_eval:])]
    else:
        held = []
    if cfg.max_samples is not None:
        train = train[: cfg.max_samples]
    available = len(held)
    if cfg.max_eval_samples is not None and cfg.max_eval_samples < len(held):
        import random

        # A random subset, not the first N: files are often sorted (by source, length or date), and the
        # first N would then measure one corner of the held-out set. Kept in file order.
        keep = sorted(random.Random(seed).sample(range(len(held)), cfg.max_eval_samples))
        held = [held[i] for i in keep]
    return Splits(train, held, available)


# ---------------------------------------------------------------- formats


def _is_messages(value: Any) -> bool:
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in value))


def _text_or_messages(r: Record, key: str, allow_empty: bool = False) -> str | list:
    """``r``'s ``key``: text, or a list of chat messages. Empty (or blank) text
    is an error unless ``allow_empty`` (a response to judge may be empty)."""
    value = r.data.get(key)
    if isinstance(value, str):
        if not value.strip() and not allow_empty:
            raise BadInput(f"{r.where}: '{key}' is empty")
        return value
    if _is_messages(value):
        return value
    raise BadInput(f"{r.where}: '{key}' must be a {'' if allow_empty else 'non-empty '}string or a list of "
                   f"{{role, content}} messages, got {type(value).__name__}")


def normalize_sft(records: list[Record]) -> list[dict]:
    """SFT records -> TRL's formats: prompt/completion, text, or messages."""
    out = []
    for r in records:
        d = r.data
        if "prompt" in d and "completion" in d:
            out.append({"prompt": _text_or_messages(r, "prompt"),
                        "completion": _text_or_messages(r, "completion")})
        elif "messages" in d:
            if not _is_messages(d["messages"]):
                raise BadInput(f"{r.where}: 'messages' must be a list of {{role, content}} objects")
            out.append({"messages": d["messages"]})
        elif "text" in d:
            out.append({"text": _text_or_messages(r, "text")})
        else:
            raise BadInput(f"{r.where}: expected 'prompt' and 'completion', 'messages', or 'text' "
                           f"(map other names with `columns`); record has {sorted(d)}")
    return out


HH_ASSISTANT = "\n\nAssistant:"


def split_hh(transcript: str) -> tuple[str, str]:
    """Split an Anthropic-HH transcript into (prompt, response).

    The prompt is everything up to and including the last ``\\n\\nAssistant:``
    marker; the response is the rest (with its leading space).
    """
    idx = transcript.rfind(HH_ASSISTANT)
    if idx < 0:
        raise ValueError("no '\\n\\nAssistant:' turn")
    cut = idx + len(HH_ASSISTANT)
    return transcript[:cut], transcript[cut:]


def _number(r: Record, key: str) -> float:
    """``r``'s ``key`` as a finite float: a number, or numeric text (CSV cells are text)."""
    value = r.data[key]
    num = None
    if isinstance(value, str):
        try:
            num = float(value)
        except ValueError:
            pass
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):  # numpy scalars too
        num = float(value)
    if num is None or not math.isfinite(num):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise BadInput(f"{r.where}: '{key}' must be a finite number, got {type(value).__name__} {shown}")
    return num


def normalize_preferences(records: list[Record], on_invalid: str = "error") -> tuple[list[dict], int]:
    """Preference records -> ``{prompt, chosen, rejected[, margin]}``.

    Values are strings (prompt is text, responses continue it) or chat message
    lists (prompt: the conversation so far; chosen/rejected: one assistant
    message each). Returns the records and the number dropped as invalid.

    An empty response (``""``, a lone space) is kept: real data has them (a
    model that answered nothing), and a reward model should learn to rank
    them. Only a pair whose two responses are identical is invalid: it
    carries no preference.
    """
    out, dropped = [], 0
    for r in records:
        d = r.data
        try:
            if "chosen" not in d or "rejected" not in d:
                raise BadInput(f"{r.where}: expected 'chosen' and 'rejected' (and optionally 'prompt'); "
                               f"record has {sorted(d)} (map other names with `columns`)")
            chosen = _text_or_messages(r, "chosen", allow_empty=True)
            rejected = _text_or_messages(r, "rejected", allow_empty=True)
            if "prompt" in d:
                prompt = _text_or_messages(r, "prompt")
            elif isinstance(chosen, str):
                try:
                    p1, chosen = split_hh(chosen)
                    p2, rejected = split_hh(rejected)
                except ValueError:
                    raise BadInput(f"{r.where}: without a 'prompt' column, 'chosen' and 'rejected' must be "
                                   "Anthropic-HH transcripts containing '\\n\\nAssistant:'") from None
                if p1 != p2:
                    raise BadInput(f"{r.where}: 'chosen' and 'rejected' transcripts differ before "
                                   "the last Assistant turn")
                prompt = p1
            else:
                if not isinstance(rejected, list) or chosen[:-1] != rejected[:-1]:
                    raise BadInput(f"{r.where}: 'chosen' and 'rejected' conversations must share every "
                                   "message but the last")
                prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
                if not prompt:
                    raise BadInput(f"{r.where}: conversation has no prompt before the last message")
            if chosen == rejected:
                raise BadInput(f"{r.where}: 'chosen' and 'rejected' are identical")
            margin = _number(r, "margin") if "margin" in d else None
        except BadInput:
            if on_invalid == "drop":
                dropped += 1
                continue
            raise
        rec = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        if margin is not None:
            rec["margin"] = margin
        out.append(rec)
    if not out:
        raise BadInput(f"{records[0].where.split(':')[0]}: no valid preference pairs")
    return out, dropped


class PreferenceSplits(NamedTuple):
    train: list[dict]
    held: list[dict]
    dropped: tuple[int, int]  # invalid pairs dropped from train, from held-out (on_invalid: drop)
    held_available: int  # held-out records before max_eval_samples drew its subset


def preference_splits(cfg: DataConfig, seed: int, use_margin: bool = True) -> PreferenceSplits:
    """Train and held-out preference pairs (``normalize_preferences``) as the
    reward and DPO stages read them, and how many of each split were dropped
    as invalid (``on_invalid: drop``). ``use_margin=False`` drops the
    ``margin`` column."""
    train, held, available = read_splits(cfg, seed)
    train_rows, dropped = normalize_preferences(train, cfg.on_invalid)
    held_rows, held_dropped = normalize_preferences(held, cfg.on_invalid) if held else ([], 0)
    if not use_margin:
        for row in train_rows + held_rows:
            row.pop("margin", None)
    return PreferenceSplits(train_rows, held_rows, (dropped, held_dropped), available)


def normalize_prompts(records: list[Record]) -> list[str | list]:
    """Prompt records -> prompt strings or message lists.

    A record without ``prompt`` but with a ``chosen`` conversation (preference
    data such as Anthropic/hh-rlhf) gives the conversation up to its last
    assistant turn.
    """
    out = []
    for r in records:
        if "prompt" in r.data:
            out.append(_text_or_messages(r, "prompt"))
        elif "chosen" in r.data:
            out.append(_prompt_of_chosen(r))
        else:
            raise BadInput(f"{r.where}: expected a 'prompt' field (or a preference record's 'chosen' "
                           f"conversation; map other names with `columns`); record has {sorted(r.data)}")
    return out


def _prompt_of_chosen(r: Record) -> str | list:
    chosen = _text_or_messages(r, "chosen")
    if isinstance(chosen, str):
        try:
            return split_hh(chosen)[0]
        except ValueError:
            raise BadInput(f"{r.where}: without a 'prompt' field, 'chosen' must be an Anthropic-HH transcript "
                           "containing '\\n\\nAssistant:' (or a list of chat messages)") from None
    if len(chosen) < 2:
        raise BadInput(f"{r.where}: 'chosen' conversation has no prompt before its last message")
    return chosen[:-1]


def render_prompt(tokenizer, prompt: str | list) -> str:
    """A prompt as the text the model sees (chat prompts through the chat template)."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def render_pair(tokenizer, prompt: str | list, response: str | list) -> tuple[str, str]:
    """(prompt text, response text) such that prompt + response is the full sequence.

    For chat data the response text is what the chat template appends for the
    assistant turn (content plus end-of-turn markers).
    """
    if isinstance(prompt, str) and isinstance(response, str):
        return prompt, response
    p_msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    r_msgs = response if isinstance(response, list) else [{"role": "assistant", "content": response}]
    p_text = tokenizer.apply_chat_template(p_msgs, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(p_msgs + r_msgs, tokenize=False)
    if not full.startswith(p_text):
        # Templates that rewrite earlier turns: fall back to the plain difference.
        p_text = tokenizer.apply_chat_template(p_msgs, tokenize=False)
    return p_text, full[len(p_text):]
