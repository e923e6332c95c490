"""Human-feedback rounds: ``type: rounds`` expansion, the collect stage
(selection, simulated labelers through the real server and store, people and
``wait: false``), the rounds report, and interruption at any point."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import OFFLINE_ENV, QUICKSTART, REPO, run_in_process, tiny_recipe_dict, write_recipe
from rlhf import recipe as recipe_mod
from rlhf.errors import BadInput

TESTS = Path(__file__).parent


def rounds_recipe(out: Path, count: int = 2, labels: int = 24, gold: str = "round_helpers:longer_is_better",
                  ppo_steps: int = 2, **collect) -> dict:
    """SFT (tiny, 4 steps) then ``count`` rounds of collect -> reward -> ppo, then the report."""
    cfg = tiny_recipe_dict(out, ("sft",))
    cfg["stages"]["loop"] = {
        "type": "rounds", "count": count,
        "first": {"ppo": "${output_dir}/sft/final", "reward": None},
        "stages": {
            "collect": {
                "type": "collect", "policy": "${previous.ppo}", "reward": "${previous.reward}",
                "prompts": str(QUICKSTART / "prompts_train.jsonl"), "prompts_per_round": 16, "candidates": 3,
                "selection": "uncertainty", "labels": labels,
                "labelers": {"simulated": {"count": 3, "gold": gold, "temperature": 1.0}},
                "generation": {"max_new_tokens": 8}, **collect},
            "reward": {
                "type": "reward", "model": "${output_dir}/sft/final", "warm_start": "${previous.reward}",
                "max_length": 64,
                "data": {"path": "${round_dir}/collect/final/prefs.jsonl",
                         "eval_path": "${round_dir}/collect/final/fresh.jsonl"},
                "train": {"max_steps": 3, "batch_size": 8, "learning_rate": 5.0e-4, "warmup": 0.0,
                          "logging_steps": 1}},
            "ppo": {
                "type": "ppo", "model": "${previous.ppo}", "reference": "${output_dir}/sft/final",
                "reward": "${round_dir}/reward/final", "data": {"path": str(QUICKSTART / "prompts_train.jsonl")},
                "steps": ppo_steps, "rollout_batch_size": 8, "num_minibatches": 2, "micro_batch_size": 4,
                "ppo_epochs": 1, "learning_rate": 1.0e-3, "generation": {"max_new_tokens": 8},
                "sample_every": 1, "save_every": 0,
                "eval": {"prompts": str(QUICKSTART / "prompts_test.jsonl"), "max_prompts": 16,
                         "gold": "rlhf.gold:vader_sentiment"}},
        },
    }
    cfg["stages"]["report"] = {"type": "rounds_report", "reference": "${output_dir}/sft/final",
                               "prompts": str(QUICKSTART / "prompts_test.jsonl"), "max_prompts": 16,
                               "gold": "rlhf.gold:vader_sentiment", "generation": {"max_new_tokens": 8},
                               "bootstrap_samples": 100}
    return cfg


@pytest.fixture(scope="module")
def sft_final(tmp_path_factory) -> Path:
    """A tiny SFT checkpoint, trained once for the module and copied into each run."""
    out = tmp_path_factory.mktemp("sft") / "out"
    path = write_recipe(out.parent / "sft.yaml", tiny_recipe_dict(out, ("sft",)))
    recipe_mod.run(recipe_mod.load_recipe(path))
    return out / "sft"


def _seed_sft(out: Path, sft_final: Path) -> None:
    shutil.copytree(sft_final, out / "sft")


def _labels(out: Path) -> list[tuple]:
    from rlhf.labeling.store import Store

    with Store.open(f"sqlite:///{out / 'labels.db'}") as store:
        project = store.project("rounds")
        pairs = store.pairs(project)
        return sorted((pairs[r.pair_id].key, r.labeler, r.choice) for r in store.current_labels(project.id))


# ---------------------------------------------------------------- the rounds block


def test_rounds_expand_in_place_with_previous_round_and_first(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", rounds_recipe(tmp_path / "out", count=3))
    recipe = recipe_mod.load_recipe(path)
    names = [s.name for s in recipe.stages]
    assert names == ["sft"] + [f"round-{k}/{s}" for k in (1, 2, 3) for s in ("collect", "reward", "ppo")] + ["report"]
    stage = {s.name: s for s in recipe.stages}
    out = str(tmp_path / "out")
    assert stage["round-1/collect"].config.policy == f"{out}/sft/final"
    assert stage["round-1/collect"].config.reward is None
    assert stage["round-3/collect"].config.policy == f"{out}/round-2/ppo/final"
    assert stage["round-3/collect"].config.reward == f"{out}/round-2/reward/final"
    assert stage["round-2/reward"].config.data.path == f"{out}/round-2/collect/final/prefs.jsonl"
    assert stage["round-2/ppo"].config.reference == f"{out}/sft/final"
    assert [s.round for s in recipe.stages] == [None] + [k for k in (1, 2, 3) for _ in range(3)] + [None]
    assert recipe.stage_dir("round-2/ppo") == tmp_path / "out" / "round-2" / "ppo"
    recipe_mod.validate(recipe)  # round 2 and 3 inputs do not exist yet: accepted as produced by earlier rounds


def test_round_variable_and_overrides_of_one_round(tmp_path):
    cfg = rounds_recipe(tmp_path / "out", count=2)
    cfg["stages"]["loop"]["stages"]["collect"]["project"] = "round-${round}"  # a string around ${round}
    path = write_recipe(tmp_path / "r.yaml", cfg)
    recipe = recipe_mod.load_recipe(path, ["stages.round-2/ppo.steps=5", "stages.loop.stages.ppo.ppo_epochs=3"])
    stage = {s.name: s for s in recipe.stages}
    assert (stage["round-1/ppo"].config.steps, stage["round-2/ppo"].config.steps) == (2, 5)
    assert stage["round-1/ppo"].config.ppo_epochs == stage["round-2/ppo"].config.ppo_epochs == 3
    assert stage["round-2/collect"].config.project == "round-2"
    one = recipe_mod.load_recipe(path, ["stages.loop.count=1"])
    assert [s.name for s in one.stages if s.round] == ["round-1/collect", "round-1/reward", "round-1/ppo"]


def test_rounds_mistakes_name_the_line_and_key(tmp_path):
    cfg = rounds_recipe(tmp_path / "out")
    del cfg["stages"]["loop"]["first"]["reward"]
    path = write_recipe(tmp_path / "r.yaml", cfg)
    with pytest.raises(BadInput, match=r"r\.yaml:\d+: .*previous\.reward.* round 1.*first: \{reward"):
        recipe_mod.load_recipe(path)
    cfg = rounds_recipe(tmp_path / "out")
    cfg["stages"]["loop"]["stages"]["ppo"]["model"] = "${previous.policy}"
    path = write_recipe(tmp_path / "r.yaml", cfg)
    with pytest.raises(BadInput, match=r"no stage 'policy' in the rounds block"):
        recipe_mod.load_recipe(path)
    cfg = rounds_recipe(tmp_path / "out")
    cfg["stages"]["loop"]["stages"]["ppo"]["stepz"] = 3
    path = write_recipe(tmp_path / "r.yaml", cfg)
    text = path.read_text().splitlines()
    line = next(i for i, t in enumerate(text, 1) if "stepz" in t)
    with pytest.raises(BadInput, match=rf"r\.yaml:{line}: .*stepz"):
        recipe_mod.load_recipe(path)
    cfg = rounds_recipe(tmp_path / "out")
    cfg["stages"]["loop"]["count"] = 0
    with pytest.raises(BadInput, match=r"count.*expected >= 1"):
        recipe_mod.load_recipe(write_recipe(tmp_path / "r.yaml", cfg))


def test_schema_documents_rounds_and_collect():
    text = recipe_mod.describe_stage("rounds")
    assert "previous" in text and "count" in text and "first" in text
    collect = recipe_mod.describe_stage("collect")
    for key in ("selection", "labels", "labelers", "wait", "held_out"):
        assert key in collect


# ---------------------------------------------------------------- selection and simulated labelers


def test_select_pairs_by_uncertainty_one_per_prompt_first():
    from rlhf.collect import select_pairs

    texts = [["a", "b", "c"], ["d", "e", "f"]]
    scores = [[[0.0], [0.1], [5.0]], [[0.0], [3.0], [6.0]]]  # one member
    chosen = select_pairs(texts, scores, 3, random.Random(0))
    # Prompt 0's closest pair (a, b: P = sigmoid(-0.1)) first, then prompt 1's closest (d, e or e, f: 3 apart),
    # and only then a prompt's second pair.
    assert [(p, i, j) for p, i, j, _ in chosen[:2]] == [(0, 0, 1), (1, 0, 1)]
    assert chosen[0][3] == pytest.approx(1 / (1 + math.exp(0.1)))
    assert chosen[2][0] in (0, 1) and chosen[2][1:3] != (0, 1)
    # Identical and empty responses are never paired.
    same = select_pairs([["x", "x", " "]], None, 5, random.Random(0))
    assert same == []
    rand = select_pairs(texts, None, 2, random.Random(0))
    assert sorted(p for p, *_ in rand) == [0, 1] and all(prob is None for *_, prob in rand)


def test_select_pairs_by_ensemble_disagreement():
    from rlhf.collect import select_pairs

    # Two members. Pair (0, 1): differences +1 and -1 (std 1); (0, 2): 2 and 2 (std 0); (1, 2): 1 and 3 (std 1).
    texts = [["a", "b", "c"]]
    members = [[[0.0, 0.0], [-1.0, 1.0], [-2.0, -2.0]]]
    got = select_pairs(texts, members, 3, random.Random(0), how="disagreement")
    assert [(i, j) for _, i, j, _ in got][:2] in ([(0, 1), (1, 2)], [(1, 2), (0, 1)])
    assert (got[2][1], got[2][2]) == (0, 2)  # the members agree on it: last
    assert got[-1][3] == pytest.approx(1 / (1 + math.exp(-2.0)))


def test_simulated_choices_follow_bradley_terry_and_are_reproducible():
    from rlhf.labeling.simulated import SimulatedConfig, choose

    rng = random.Random(0)
    draws = [choose(1.0, 0.0, 1.0, 0.0, False, rng) for _ in range(4000)]
    assert draws.count("A") / len(draws) == pytest.approx(1 / (1 + math.exp(-1.0)), abs=0.03)
    flipped = [choose(1.0, 0.0, 1.0, 0.0, True, random.Random(i)) for i in range(200)]
    straight = [choose(1.0, 0.0, 1.0, 0.0, False, random.Random(i)) for i in range(200)]
    assert all(a != b for a, b in zip(flipped, straight))
    skips = [choose(1.0, 0.0, 1.0, 0.5, False, random.Random(i)) for i in range(2000)]
    assert skips.count("skip") / len(skips) == pytest.approx(0.5, abs=0.04)
    assert choose(1.0, 0.0, 0.001, 0.0, False, random.Random(1)) == "A"  # a careful labeler
    cfg = SimulatedConfig(count=3, temperature=0.2, spread=4.0)
    assert [cfg.temperature_of(i) for i in range(3)] == pytest.approx([0.05, 0.2, 0.8])


# ---------------------------------------------------------------- end to end


def test_two_rounds_through_the_real_server_and_store(tmp_path, sft_final):
    out = tmp_path / "out"
    _seed_sft(out, sft_final)
    path = write_recipe(tmp_path / "r.yaml", rounds_recipe(out))
    assert run_in_process("run", path) == 0
    from rlhf.labeling.store import Store

    with Store.open(f"sqlite:///{out / 'labels.db'}") as store:
        project = store.project("rounds")
        assert sorted(lab.name for lab in store.labelers(project)) == ["sim-1", "sim-2", "sim-3"]
        labels = store.current_labels(project.id)
    for k in (1, 2):
        collect = json.loads((out / f"round-{k}" / "collect" / "metrics.json").read_text())
        assert collect["collect/labels"] == 24 and collect["collect/pairs"] == 24
        pairs = [json.loads(x) for x in (out / f"round-{k}" / "collect" / "pairs.jsonl").read_text().splitlines()]
        assert len(pairs) == 24
        sources = {p["source_a"].split("#")[0] for p in pairs}
        assert sources == {str(out / "sft" / "final") if k == 1 else str(out / "round-1" / "ppo" / "final")}
        prefs = (out / f"round-{k}" / "collect" / "final" / "prefs.jsonl").read_text().splitlines()
        fresh = (out / f"round-{k}" / "collect" / "final" / "fresh.jsonl").read_text().splitlines()
        assert len(prefs) + len(fresh) <= 24 * k and len(fresh) == math.ceil(0.2 * collect["collect/fresh_pairs"])
    assert sum(r.choice != "skip" for r in labels) == 48
    r2 = json.loads((out / "round-2" / "collect" / "metrics.json").read_text())
    assert 0.0 <= r2["collect/rm_accuracy_fresh"] <= 1.0  # round 1's reward model on round 2's labels
    assert "collect/rm_accuracy_fresh" not in json.loads((out / "round-1" / "collect" / "metrics.json").read_text())
    assert "collect/selected_margin" in r2
    table = json.loads((out / "report" / "rounds.json").read_text())
    assert [e["policy"] for e in table] == ["sft", "round-1", "round-2"]
    assert table[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert [e["labels_total"] for e in table[1:]] == [24, 48]
    assert table[2]["rm_accuracy_fresh_before"] == r2["collect/rm_accuracy_fresh"]
    assert all(0 <= e["win_vs_sft"] <= 1 for e in table)
    assert (out / "report" / "rounds.png").stat().st_size > 1000 and (out / "report" / "rounds.html").exists()
    # Round 1's reward model starts from the SFT trunk, round 2's from round 1's reward model.
    inits = [json.loads((out / f"round-{k}" / "reward" / "metrics.json").read_text())["model/init"] for k in (1, 2)]
    assert inits == [str(out / "sft" / "final"), str(out / "round-1" / "reward" / "final")]
    # The KL reference of every round's PPO stays the SFT policy.
    ppo2 = json.loads((out / "round-2" / "ppo" / "metrics.json").read_text())
    assert ppo2["gold/sft"] == pytest.approx(json.loads((out / "round-1" / "ppo" / "metrics.json").read_text())["gold/sft"])
    # A second run skips every finished round.
    before = (out / "round-2" / "ppo" / "final" / "model.safetensors").stat().st_mtime
    assert run_in_process("run", path) == 0
    assert (out / "round-2" / "ppo" / "final" / "model.safetensors").stat().st_mtime == before


def _popen(path: Path) -> subprocess.Popen:
    """``rlhf run`` in a subprocess; stderr goes to a file beside the recipe
    (a pipe nobody reads would stall the run once full)."""
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(TESTS)}
    log = path.with_suffix(".log").open("a")
    return subprocess.Popen([sys.executable, "-m", "rlhf", "run", str(path)], env=env, stdout=subprocess.PIPE,
                            stderr=log, text=True)


def _wait_for(cond, proc, log: Path, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended first (rc {proc.returncode}): {log.read_text()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out")


def _label_count(out: Path) -> int:
    import sqlite3

    db = out / "labels.db"
    if not db.exists():
        return 0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
    try:
        return con.execute("select count(*) from labeling_labels").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0
    finally:
        con.close()


def test_killed_during_collect_and_round_2_ppo_the_rerun_ends_as_an_uninterrupted_run(tmp_path, sft_final):
    def recipe(out):
        _seed_sft(out, sft_final)
        return write_recipe(out.parent / f"{out.name}.yaml", rounds_recipe(
            out, labels=30, gold="round_helpers:slow_vader", ppo_steps=40))

    plain = tmp_path / "plain"
    assert run_in_process("run", recipe(plain)) == 0

    out = tmp_path / "killed"
    path = recipe(out)
    proc = _popen(path)
    log = path.with_suffix(".log")
    _wait_for(lambda: _label_count(out) >= 12, proc, log)  # round 1's collect, half way
    proc.kill()
    proc.wait()
    assert not (out / "round-1" / "collect" / "final").exists()
    proc = _popen(path)
    metrics = out / "round-2" / "ppo" / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 5, proc, log)
    proc.send_signal(signal.SIGTERM)  # saves a checkpoint, exits
    proc.communicate(timeout=120)
    assert proc.returncode != 0, log.read_text()[-3000:]
    assert list((out / "round-2" / "ppo" / "checkpoints").glob("step-*"))
    proc = _popen(path)
    proc.communicate(timeout=600)
    assert proc.returncode == 0, log.read_text()[-3000:]

    assert _labels(out) == _labels(plain)
    for stage in ("round-1/collect", "round-2/collect"):
        a, b = (json.loads((o / stage / "metrics.json").read_text()) for o in (plain, out))
        assert a == b
    a, b = (json.loads((o / "round-2" / "ppo" / "metrics.json").read_text()) for o in (plain, out))
    for key in ("gold/ppo", "kl/ppo", "objective/scores_last"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))


def test_people_with_wait_false_pause_and_labels_in_the_store_count(tmp_path, sft_final, capsys):
    out = tmp_path / "out"
    _seed_sft(out, sft_final)
    cfg = rounds_recipe(out, count=1, labels=6, labelers="people", wait=False)
    path = write_recipe(tmp_path / "r.yaml", cfg)
    assert run_in_process("run", path) == 0
    said = capsys.readouterr().out
    assert re.search(r"stage round-1/collect: 0/6 labels on 6 pairs of project rounds in .*labels\.db", said)
    assert not (out / "round-1" / "collect" / "final").exists()
    assert not (out / "round-1" / "reward").exists()
    # People label in the store (as `rlhf label serve` would record it); a re-run continues.
    from rlhf.labeling.store import Store, Submission

    with Store.open(f"sqlite:///{out / 'labels.db'}") as store:
        project = store.project("rounds")
        who = store.add_labeler(project, "alice", "alice-token-0123456789")
        for n in range(6):
            view = store.next_pair(who)
            store.submit(who, Submission(f"alice-{n:08d}", view.id, "A" if n % 2 else "B"))
    assert run_in_process("run", path) == 0
    assert (out / "round-1" / "collect" / "final" / "prefs.jsonl").exists()
    assert json.loads((out / "round-1" / "collect" / "metrics.json").read_text())["collect/labels_by/alice"] == 6
    assert (out / "report" / "rounds.json").exists()


def test_people_get_sign_in_links_and_their_labels_over_http_finish_the_round(tmp_path, sft_final):
    from rlhf.labeling.simulated import Client

    out = tmp_path / "out"
    _seed_sft(out, sft_final)
    cfg = rounds_recipe(out, count=1, labels=4, labelers={"people": ["alice"]}, serve={"port": 0},
                        poll_seconds=0.2)
    path = write_recipe(tmp_path / "r.yaml", cfg)
    proc = _popen(path)
    link = None
    deadline = time.time() + 300
    while link is None and time.time() < deadline:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, path.with_suffix(".log").read_text()[-3000:]
        m = re.match(r"sign-in link for alice: (http://[^/]+)/#token=(\S+)", line)
        if m:
            link = m.groups()
    url, token = link
    assert urllib.request.urlopen(url + "/healthz", timeout=10).status == 200
    alice = Client(url, token)
    for n in range(4):
        pair = alice.call("GET", "/api/next")["pair"]
        alice.call("POST", "/api/labels", {"client_id": f"alice-{n:08d}", "pair_id": pair["id"], "choice": "A"})
    proc.communicate(timeout=600)
    assert proc.returncode == 0, path.with_suffix(".log").read_text()[-3000:]
    got = json.loads((out / "round-1" / "collect" / "metrics.json").read_text())
    assert got["collect/labels_by/alice"] == 4 and got["collect/labels"] == 4


def test_simulated_labels_on_an_earlier_rounds_open_pair_do_not_count_toward_this_round(tmp_path):
    from types import SimpleNamespace

    from rlhf.collect import Config, Labelers, _counts, _Progress, _simulate
    from rlhf.labeling.config import ProjectConfig
    from rlhf.labeling.simulated import SimulatedConfig
    from rlhf.labeling.store import NewPair, Store

    with Store.open(f"sqlite:///{tmp_path / 'labels.db'}", create=True) as store:
        project = store.create_project("rounds", ProjectConfig())
        store.add_pairs(project, [NewPair("old", "an unlabeled pair", "from round one")])  # lowest id: served first
        store.add_pairs(project, [NewPair(f"p{i}", "short", "a longer answer") for i in range(2)])
        ids = {pid for pid, row in store.pairs(project).items() if row.prompt != '"old"'}
        cfg = Config(policy="unused", prompts="unused", labels=2, labelers=Labelers(
            simulated=SimulatedConfig(count=1, gold="round_helpers:longer_is_better")))
        ctx = SimpleNamespace(stage_dir=tmp_path / "collect", name="round-2/collect", is_main=True)
        progress = _Progress(ctx, cfg.labels, 0)
        _simulate(cfg, store, project, ids, progress)
        progress.close()
        assert _counts(store, project, ids)[0] == 2  # both of this round's pairs, besides the old one
        assert len(store.current_labels(project.id)) == 3
