"""``rlhf label ...`` commands: the workflow, pairs from checkpoints, and bad
input (exit 2, one ``error:`` line naming the flag or file, labels intact)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from rlhf.cli import main
from rlhf.labeling.store import Store, Submission

REPO = Path(__file__).resolve().parents[1]
PREFS = REPO / "data" / "quickstart" / "prefs_test.jsonl"
PROMPTS = REPO / "data" / "quickstart" / "prompts_test.jsonl"


def rlhf(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["-q", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def label_everything(db: str, choice: str = "A", **judgement) -> int:
    """Every labeler labels every pair they are given; returns labels stored."""
    store = Store.open(db)
    n = 0
    for labeler in store.labelers(store.project(None)):
        if labeler.role != "labeler":
            continue
        while (view := store.next_pair(labeler)) is not None:
            store.submit(labeler, Submission(uuid.uuid4().hex, view.id, choice, **judgement))
            n += 1
    store.close()
    return n


def test_workflow_pairs_labelers_stats_export(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'labels.db'}"
    code, out, _ = rlhf(capsys, "label", "pairs", "--db", db, "--project", "qs", "--from-file", PREFS,
                        "--limit", 20, "--overlap", 2)
    assert code == 0 and "20 added to project qs" in out
    code, out, _ = rlhf(capsys, "label", "pairs", "--db", db, "--project", "qs", "--from-file", PREFS,
                        "--limit", 25)
    assert code == 0 and "5 added" in out and "20 were already there" in out
    tokens = []
    for name in ("ann", "ben"):
        code, out, _ = rlhf(capsys, "label", "add-labeler", "--db", db, "--name", name, "--json")
        info = json.loads(out)
        assert code == 0 and info["token"].startswith("rlhf_") and info["link"].endswith(info["token"])
        tokens.append(info["token"])
    code, out, _ = rlhf(capsys, "label", "add-labeler", "--db", db, "--name", "boss", "--admin")
    assert code == 0 and "/admin#token=rlhf_" in out
    guidelines = tmp_path / "guide.txt"
    guidelines.write_text("Prefer the response that matches the review's sentiment.")
    code, out, _ = rlhf(capsys, "label", "project", "--db", db, "--project", "qs", "--guidelines-file", guidelines)
    assert code == 0 and json.loads(out[out.index("{"):])["guidelines"].startswith("Prefer")
    assert label_everything(db) == 50  # 25 pairs x overlap 2
    code, out, _ = rlhf(capsys, "label", "stats", "--db", db, "--json")
    st = json.loads(out)
    assert code == 0 and st["pairs"]["complete"] == 25 and st["agreement"]["percent_agreement"] == 1.0
    code, out, _ = rlhf(capsys, "label", "stats", "--db", db)
    assert code == 0 and "ann" in out and "Fleiss" in out
    dest = tmp_path / "out" / "prefs.jsonl"
    code, out, _ = rlhf(capsys, "label", "export", "--db", db, "--out", dest, "--min-votes", 2, "--margin")
    rows = [json.loads(line) for line in dest.read_text().splitlines()]
    assert code == 0 and len(rows) == 25 and all(r["margin"] == 1.0 for r in rows)
    code, out, _ = rlhf(capsys, "label", "export", "--db", db, "--out", tmp_path / "prefs_hf")
    assert code == 0 and (tmp_path / "prefs_hf" / "dataset_info.json").exists()


def test_export_strength_margin_and_both_bad_flags(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'labels.db'}"
    assert rlhf(capsys, "label", "pairs", "--db", db, "--project", "qs", "--from-file", PREFS, "--limit", 4)[0] == 0
    assert rlhf(capsys, "label", "add-labeler", "--db", db, "--name", "ann")[0] == 0
    assert label_everything(db, "B", strength="slightly_better", both_bad=True) == 4
    dest = tmp_path / "prefs.jsonl"
    code, _, err = rlhf(capsys, "label", "export", "--db", db, "--out", dest)
    assert code == 2 and "4 marked both bad left out (--include-both-bad keeps them)" in err
    code, out, _ = rlhf(capsys, "label", "export", "--db", db, "--out", dest, "--include-both-bad",
                        "--margin", "strength")
    rows = [json.loads(line) for line in dest.read_text().splitlines()]
    assert code == 0 and "4 marked both bad kept" in out
    assert [(r["both_bad"], r["margin"]) for r in rows] == [(True, 1.0)] * 4
    with pytest.raises(SystemExit) as exited:  # argparse: usage and the error, exit 2
        rlhf(capsys, "label", "export", "--db", db, "--out", dest, "--margin", "loud")
    assert exited.value.code == 2 and "argument --margin: invalid choice: 'loud'" in capsys.readouterr().err


def test_pairs_from_one_or_two_checkpoints(tmp_path, capsys):
    from rlhf.models import ModelConfig, load_causal_lm, load_tokenizer, save_checkpoint

    tok = load_tokenizer(ModelConfig("tiny"))
    ckpts = []
    for seed in (1, 2):
        ckpts.append(save_checkpoint(load_causal_lm(ModelConfig("tiny"), tok, seed=seed), tok,
                                     tmp_path / f"model{seed}"))
    db = f"sqlite:///{tmp_path / 'labels.db'}"
    code, out, _ = rlhf(capsys, "label", "pairs", "--db", db, "--project", "ab", "--prompts", PROMPTS,
                        "--limit", 6, "--model", ckpts[0], "--model", ckpts[1], "--max-new-tokens", 8)
    assert code == 0 and "6 candidate pairs" in out
    store = Store.open(db)
    pairs = store.pairs(store.project("ab"))
    assert pairs and {p.source_a for p in pairs.values()} <= {str(ckpts[0]), str(ckpts[1])}
    assert all(p.source_a != p.source_b for p in pairs.values())
    store.close()
    code, out, _ = rlhf(capsys, "label", "pairs", "--db", db, "--project", "two-samples", "--prompts", PROMPTS,
                        "--limit", 4, "--model", ckpts[0], "--max-new-tokens", 8)
    assert code == 0 and "4 candidate pairs" in out


def test_bad_input_exits_2_naming_the_flag_and_keeps_labels(tmp_path, capsys):
    db_path = tmp_path / "labels.db"
    db = f"sqlite:///{db_path}"
    assert rlhf(capsys, "label", "pairs", "--db", db, "--project", "qs", "--from-file", PREFS, "--limit", 5)[0] == 0
    assert rlhf(capsys, "label", "add-labeler", "--db", db, "--name", "ann")[0] == 0
    assert label_everything(db) == 5
    before = [tuple(r) for r in Store.open(db).all_labels(1)]
    garbage = tmp_path / "garbage.db"
    garbage.write_text("definitely not sqlite")
    bad_config = tmp_path / "project.yaml"
    bad_config.write_text("overlap: 2\nguidline: typo\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases = [
            (["pairs", "--db", db, "--project", "qs", "--from-file", tmp_path / "missing.jsonl"], "missing.jsonl"),
            (["pairs", "--db", db, "--project", "qs", "--from-file", PREFS, "--model", "x"], "--model"),
            (["pairs", "--db", db, "--project", "qs", "--prompts", PROMPTS], "--model"),
            (["pairs", "--db", db, "--project", "qs", "--prompts", PROMPTS, "--model", "no/such-model"],
             "--model no/such-model"),
            (["pairs", "--db", db, "--project", "new", "--from-file", PREFS, "--config", bad_config], "guidline"),
            (["pairs", "--db", db, "--project", "new", "--from-file", PREFS, "--overlap", "0"], "--overlap"),
            (["pairs", "--db", "mysql://u@h/x", "--project", "qs", "--from-file", PREFS], "--db"),
            (["stats", "--db", tmp_path / "nope.db"], "nope.db"),
            (["stats", "--db", garbage], "garbage.db"),
            (["stats", "--db", db, "--project", "nope"], "--project nope"),
            (["export", "--db", db, "--out", db_path], "--out"),
            (["export", "--db", db, "--out", tmp_path / "labels.db-wal", "--format", "jsonl"], "--out"),
            (["export", "--db", db, "--out", tmp_path / "x.csv"], "--out"),
            (["export", "--db", db, "--out", tmp_path], "--out"),
            (["add-labeler", "--db", db, "--name", "ann"], "--name ann"),
            (["add-labeler", "--db", db, "--name", "bad\x1bname"], "--name"),
            (["serve", "--db", db, "--port", port], "--port"),
            (["serve", "--db", db, "--port", "0", "--allowed-host", "https://x.example/"], "--allowed-host"),
            (["serve", "--db", db, "--workers", "0"], "--workers 0"),
            (["serve", "--db", db, "--workers", "two"], "--workers 'two'"),
            (["serve", "--db", db, "--workers", "1.5"], "--workers '1.5'"),
            (["serve", "--db", db, "--workers", "2", "--port", port], "--port"),
        ]
        for argv, named in cases:
            code, out, err = rlhf(capsys, "label", *argv)
            lines = err.strip().splitlines()
            assert code == 2, (argv, out, err)
            assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], (argv, err)
    assert garbage.read_text() == "definitely not sqlite"
    store = Store.open(db)
    assert [tuple(r) for r in store.all_labels(1)] == before  # nothing lost or rewritten
    assert [p.name for p in store.projects()] == ["qs"]  # no half-made project from the failed runs
    store.close()


def test_serve_binds_loopback_unless_told_otherwise():
    from rlhf.cli import _parser

    args = _parser().parse_args(["label", "serve", "--db", "labels.db"])
    assert (args.host, args.port, args.max_body_kb, args.allowed_host) == ("127.0.0.1", 8000, 64, [])
    assert args.workers == "1"  # one process unless told otherwise (checked as a number in cmd_serve)


def test_real_process_exit_code_and_single_error_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rlhf", "label", "stats", "--db", str(tmp_path / "none.db")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: --db sqlite:///{tmp_path / 'none.db'}: no labeling database there "
        "(create one with `rlhf label pairs`)"]


def _labeled_db(tmp_path, capsys, n_pairs: int) -> str:
    """A labeling database whose project ``qs`` holds ``n_pairs`` quickstart pairs, each labeled B by ann."""
    db = f"sqlite:///{tmp_path / 'labels.db'}"
    rlhf(capsys, "label", "pairs", "--db", db, "--project", "qs", "--from-file", PREFS, "--limit", n_pairs)
    rlhf(capsys, "label", "add-labeler", "--db", db, "--name", "ann")
    label_everything(db, "B")
    return db


def test_recipe_validates_with_a_labeling_database_as_reward_data(tmp_path, capsys):
    db = _labeled_db(tmp_path, capsys, 8)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\nstages:\n  reward:\n    type: reward\n    model: tiny\n"
                      f"    data:\n      path: '{db}?project=qs'\n")
    code, out, err = rlhf(capsys, "validate", recipe)
    assert code == 0, err
    code, _, err = rlhf(capsys, "validate", recipe, f"stages.reward.data.path={db}?project=nope")
    assert code == 2 and "no such project" in err


def test_dpo_trains_straight_from_a_labeling_database(tmp_path, capsys):
    """The DPO stage reads the same sources as the reward stage, the labeling store included."""
    db = _labeled_db(tmp_path, capsys, 12)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\nstages:\n  dpo:\n    type: dpo\n    model: tiny\n"
                      f"    data:\n      path: '{db}?project=qs'\n      eval_fraction: 0.25\n"
                      "    max_length: 96\n    train: {max_steps: 2, batch_size: 4}\n")
    code, _, err = rlhf(capsys, "run", recipe)
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "dpo" / "metrics.json").read_text())
    assert summary["train/pairs"] + summary["eval/pairs"] == 12 and summary["train/steps"] == 2


def test_revoke_and_export_without_a_labeler(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'labels.db'}"
    assert rlhf(capsys, "label", "pairs", "--db", db, "--project", "qs", "--from-file", PREFS, "--limit", 6,
                "--overlap", 2)[0] == 0
    tokens = {}
    for name in ("ann", "ben"):
        tokens[name] = json.loads(rlhf(capsys, "label", "add-labeler", "--db", db, "--name", name, "--json")[1])
    store = Store.open(db)
    project = store.project(None)
    for name, choice in (("ann", "A"), ("ben", "B")):  # they disagree on every pair
        who = store.authenticate(tokens[name]["token"])
        while (view := store.next_pair(who)) is not None:
            store.submit(who, Submission(uuid.uuid4().hex, view.id, choice))
    store.close()

    code, out, _ = rlhf(capsys, "label", "revoke", "--db", db, "--name", "ben")
    assert code == 0 and "revoked ben" in out and "labels are kept" in out
    store = Store.open(db)
    assert store.authenticate(tokens["ben"]["token"]) is None
    assert store.authenticate(tokens["ann"]["token"]) is not None
    store.close()
    code, out, _ = rlhf(capsys, "label", "revoke", "--db", db, "--name", "ben")
    assert code == 0 and "already revoked" in out

    # With both votes every pair is a 1-1 split (dropped); without ben's, ann's choice wins.
    dest = tmp_path / "prefs.jsonl"
    code, _, err = rlhf(capsys, "label", "export", "--db", db, "--out", dest)
    assert code == 2 and "no labeled pairs" in err and not dest.exists()
    code, out, _ = rlhf(capsys, "label", "export", "--db", db, "--out", dest, "--exclude-labeler", "ben")
    rows = [json.loads(line) for line in dest.read_text().splitlines()]
    assert code == 0 and len(rows) == 6 and all(r["chosen_votes"] == 1 and r["votes"] == 1 for r in rows)
    # The reward stage reading the database directly takes the same option on the URL.
    from rlhf.labeling.export import read_db_records

    records = read_db_records(f"{db}?project=qs&exclude_labelers=[ben]")
    assert [r.data for r in records] == rows

    for argv, needle in ((("revoke", "--name", "zed"), "--name zed: not a labeler of project qs"),
                         (("export", "--out", tmp_path / "x.jsonl", "--exclude-labeler", "zed"),
                          "exclude_labelers: 'zed' is not a labeler")):
        code, _, err = rlhf(capsys, "label", argv[0], "--db", db, *argv[1:])
        assert code == 2 and needle in err, err


def test_pairs_with_responses_k_makes_ranking_items_and_exports_implied_pairs(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'labels.db'}"
    src = tmp_path / "ranked.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"q{i}", "responses": [f"r{i}-{j}" for j in range(4)]}) + "\n"
                           for i in range(5)))
    code, out, _ = rlhf(capsys, "label", "pairs", "--db", db, "--project", "rk", "--from-file", src,
                        "--responses", 4)
    assert code == 0 and "5 added to project rk" in out and "ranking items of 4 responses" in out
    for k in (1, 10):
        code, _, err = rlhf(capsys, "label", "pairs", "--db", db, "--project", "rk", "--from-file", src,
                            "--responses", k)
        assert code == 2 and f"--responses {k}" in err
    code, _, err = rlhf(capsys, "label", "pairs", "--db", db, "--project", "rk", "--from-file", src,
                        "--responses", 3)
    assert code == 2 and "a list of 3 strings" in err
    code, _, _ = rlhf(capsys, "label", "add-labeler", "--db", db, "--name", "ann")
    store = Store.open(db)
    (ann,) = store.labelers(store.project(None))
    while (view := store.next_pair(ann)) is not None:
        assert len(view.responses) == 4
        # Best first: the responses ordered by their number in the file (r-0 best).
        order = sorted(range(4), key=lambda i: view.responses[i])
        store.submit(ann, Submission(uuid.uuid4().hex, view.id, "rank", ranking=tuple(order)))
    store.close()
    dest = tmp_path / "prefs.jsonl"
    code, out, _ = rlhf(capsys, "label", "export", "--db", db, "--out", dest)
    rows = [json.loads(line) for line in dest.read_text().splitlines()]
    assert code == 0 and len(rows) == 5 * 6
    assert all(r["chosen"] < r["rejected"] and r["rank_chosen"] < r["rank_rejected"] for r in rows)
    assert len({r["ranking_id"] for r in rows}) == 5
    code, out, _ = rlhf(capsys, "label", "stats", "--db", db, "--json")
    assert code == 0 and json.loads(out)["labels"]["rank"] == 5
    code, _, _ = rlhf(capsys, "label", "export", "--db", db, "--out", tmp_path / "prefs.parquet")
    assert code == 0


def test_label_commands_but_pairs_leave_torch_out(tmp_path, capsys):
    """Only `rlhf label pairs` samples from checkpoints; the other label commands,
    the web server above all, touch the database alone. With torch imported the
    server's heap held ~465,000 objects instead of ~123,000, and each full
    garbage collection stalled every request in flight for ~240 ms."""
    from helpers.labeling import ServerProcess

    db = f"sqlite:///{tmp_path / 'labels.db'}"
    assert rlhf(capsys, "label", "pairs", "--db", db, "--project", "qs", "--from-file", PREFS, "--limit", 5)[0] == 0
    code = ("import sys\nfrom rlhf.cli import main\n"
            f"assert main(['-q', 'label', 'add-labeler', '--db', {db!r}, '--name', 'ann']) == 0\n"
            f"assert main(['-q', 'label', 'stats', '--db', {db!r}]) == 0\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return  # not Linux: the server's loaded libraries cannot be read this way
    with ServerProcess(db, log_path=tmp_path / "server.log") as server:
        loaded = Path(f"/proc/{server.proc.pid}/maps").read_text()
    assert "libtorch" not in loaded
