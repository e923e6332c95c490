"""Issue 13, a fresh clone is green, fast and truthful: the thread count is
chosen on purpose and recorded, `--only` with a missing upstream output and
changed settings of a finished stage are one-line errors (exit 2) before
anything runs, downstream stages of a re-run stage are re-run or reported
stale, the CLI goes offline at once without network, and small noise fixes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, run_in_process, tiny_recipe_dict, write_recipe

from rlhf import recipe as recipe_mod


def _one_error(capsys, rc) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny SFT -> reward run: (recipe, output dir); tests copy it."""
    d = tmp_path_factory.mktemp("finished")
    recipe = write_recipe(d / "recipe.yaml", tiny_recipe_dict(d / "out"))
    assert run_in_process("run", recipe) == 0
    return recipe, d / "out"


def _copy(finished, tmp_path):
    recipe, out = finished
    shutil.copytree(out, tmp_path / "out")
    return recipe, tmp_path / "out", f"output_dir={tmp_path / 'out'}"


def _mtimes(root):
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ threads


def test_threads_from_recipe_and_flag_recorded_in_metrics(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="rlhf")

    def edit(cfg):
        cfg["threads"] = 1
    cfg = tiny_recipe_dict(tmp_path / "a", stages=("sft",))
    edit(cfg)
    assert run_in_process("run", write_recipe(tmp_path / "a.yaml", cfg)) == 0
    assert json.loads((tmp_path / "a" / "sft" / "metrics.json").read_text())["run/threads"] == 1
    assert "threads: 1 (set by the recipe" in caplog.text

    cfg = tiny_recipe_dict(tmp_path / "b", stages=("sft",))
    assert run_in_process("run", write_recipe(tmp_path / "b.yaml", cfg), "--threads", "1") == 0
    assert json.loads((tmp_path / "b" / "sft" / "metrics.json").read_text())["run/threads"] == 1


@pytest.mark.parametrize("args", [["--threads", "0"], ["--threads", "-1"], ["threads=0"], ["threads=-1"]])
def test_invalid_threads_exit_2(tiny_recipe, tmp_path, capsys, args):
    line = _one_error(capsys, run_in_process("run", tiny_recipe, *args))
    assert "threads" in line and "positive integer" in line
    assert not (tmp_path / "out").exists()


def test_auto_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n, why = recipe_mod.choose_threads(None)
    assert 1 <= n <= cpus and why.startswith("auto")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cpus * 4))  # more ranks than CPUs: still 1
    assert recipe_mod.choose_threads(None)[0] == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert recipe_mod.choose_threads(None, on_gpu=True)[0] <= min(cpus, 4)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert recipe_mod.choose_threads(None) == (3, "auto: OMP_NUM_THREADS is set")
    assert recipe_mod.choose_threads(2)[0] == 2


# ------------------------------------------------------------------ --only


def test_only_with_missing_upstream_output_is_one_line(tiny_recipe, tmp_path, capsys):
    line = _one_error(capsys, run_in_process("run", tiny_recipe, "--only", "reward"))
    sft_final = tmp_path / "out" / "sft" / "final"
    assert f"stage reward needs {sft_final}, the output of stage sft, which does not exist" in line
    assert "--only sft" in line
    assert not (tmp_path / "out").exists()


def test_only_prints_only_stages_that_exist(tiny_recipe, tmp_path, capsys):
    assert run_in_process("run", tiny_recipe, "--only", "sft") == 0
    out = capsys.readouterr().out
    assert f"sft: {tmp_path / 'out' / 'sft' / 'final'}" in out and "reward:" not in out


# ------------------------------------------------------------ changed settings


def test_changed_settings_of_finished_stage_exit_2(finished, tmp_path, capsys):
    recipe, out, where = _copy(finished, tmp_path)
    before = _mtimes(out)
    line = _one_error(capsys, run_in_process("run", recipe, where, "stages.reward.train.learning_rate=0.002",
                                             "seed=8"))
    assert "stage sft: seed: 7 -> 8" in line
    assert "stage reward: seed: 7 -> 8, train.learning_rate: 0.0005 -> 0.002" in line
    assert "--force --only sft,reward" in line and "new output_dir" in line
    assert _mtimes(out) == before  # nothing ran, nothing was rewritten
    # Keys that do not change results are not compared; a moved run dir is the same run.
    assert run_in_process("run", recipe, where, "stages.reward.train.logging_steps=2") == 0
    assert {k: v for k, v in _mtimes(out).items() if k != "recipe.yaml"} == {
        k: v for k, v in before.items() if k != "recipe.yaml"}


def test_forced_upstream_makes_downstream_stale_then_rerun(finished, tmp_path, capsys, caplog):
    recipe, out, where = _copy(finished, tmp_path)
    caplog.set_level(logging.INFO, logger="rlhf")
    reward_before = (out / "reward" / "final" / "model.safetensors").stat().st_mtime_ns
    assert run_in_process("run", recipe, where, "--force", "--only", "sft") == 0
    assert "stage reward: stale" in caplog.text
    assert (out / "reward" / "final" / "model.safetensors").stat().st_mtime_ns == reward_before
    caplog.clear()
    # The next run without --only brings reward up to date.
    assert run_in_process("run", recipe, where) == 0
    assert "stage reward: re-running" in caplog.text and "stage sft (sft): starting" not in caplog.text
    assert (out / "reward" / "final" / "model.safetensors").stat().st_mtime_ns != reward_before
    caplog.clear()
    assert run_in_process("run", recipe, where) == 0
    assert "starting" not in caplog.text and "stale" not in caplog.text


def test_forced_upstream_reruns_downstream_in_the_same_run(finished, tmp_path, caplog):
    recipe, out, where = _copy(finished, tmp_path)
    caplog.set_level(logging.INFO, logger="rlhf")
    assert run_in_process("run", recipe, where, "--force", "--only", "sft", "--only", "reward") == 0
    assert "stage sft (sft): starting" in caplog.text and "stage reward (reward): starting" in caplog.text


# ------------------------------------------------------------------ offline


def test_no_network_goes_offline_at_once(tiny_recipe):
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # a closed port: the probe fails at once
    proc = subprocess.run([sys.executable, "-m", "rlhf", "validate", str(tiny_recipe)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "unreachable: working offline (HF_HUB_OFFLINE=1)" in proc.stderr
    assert "retry" not in proc.stderr.lower() and "Traceback" not in proc.stderr


# ------------------------------------------------------------------ noise


def test_override_of_unknown_stage_names_the_stages(tiny_recipe, capsys):
    line = _one_error(capsys, run_in_process("validate", tiny_recipe, "stages.ppx.steps=3"))
    assert line == "error: override stages.ppx.steps: no stage named 'ppx' (recipe has: sft, reward)"


# ------------------------------------------------------------------ labeling

GUIDELINES = REPO / "data" / "quickstart" / "guidelines.txt"
PROMPTS = REPO / "data" / "quickstart" / "prompts_test.jsonl"


@pytest.mark.parametrize("bad, expected", [
    (["--guidelines-file", "missing.txt"], "--guidelines-file missing.txt: file not found"),
    (["--overlap", "0"], "--overlap 0: expected a positive integer"),
    (["--config", "nope.yaml"], "--config nope.yaml: file not found"),
    (["--db", "mysql://u@h/db"], "unsupported database 'mysql'"),
    (["--model", "runs/nowhere/sft/final"], "--model runs/nowhere/sft/final: "),
    (["--model", "tiny", "--model", "tiny", "--model", "tiny"], "expected one or two checkpoints"),
    (["--prompts", "nope.jsonl"], "--prompts nope.jsonl: file not found"),
    (["--project", " "], "--project ' ': expected 1-100 printable characters"),
    (["--threads", "0"], "--threads 0: expected a positive integer"),
])
def test_label_pairs_checks_every_argument_before_sampling(bad, expected, tmp_path, monkeypatch, capsys):
    from rlhf.labeling import pairs

    def no_sampling(*a, **k):
        raise AssertionError("sampled before the arguments were checked")

    monkeypatch.setattr(pairs, "generate_candidates", no_sampling)
    monkeypatch.chdir(tmp_path)
    args = {"--db": f"sqlite:///{tmp_path / 'labels.db'}", "--project": "qs", "--prompts": str(PROMPTS),
            "--guidelines-file": str(GUIDELINES)}
    flags = [b for b in bad if b.startswith("--")]
    for flag in flags:
        args.pop(flag, None)
    argv = [x for kv in args.items() for x in kv] + (["--model", "tiny"] if "--model" not in flags else []) + bad
    line = _one_error(capsys, run_in_process("label", "pairs", *argv))
    assert expected in line
    assert not (tmp_path / "labels.db").exists()


def test_label_help_examples_use_shipped_files_and_only_reward(capsys):
    with pytest.raises(SystemExit):
        run_in_process("label", "--help")
    text = capsys.readouterr().out
    assert "--guidelines-file data/quickstart/guidelines.txt" in text and GUIDELINES.is_file()
    run_line = text[text.index("rlhf run "):]
    assert "--only reward" in run_line
    docs = (REPO / "docs" / "labeling.md").read_text()
    assert "--guidelines-file guidelines.txt" not in docs


# ------------------------------------------------------------------ benchmarks


@pytest.mark.parametrize("script", ["ppo_throughput.py", "sharded_generation.py", "labeling_throughput.py"])
def test_every_benchmark_takes_a_thread_setting(script):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--threads" in proc.stdout


def test_license_is_an_spdx_string_not_a_deprecated_table():
    import tomllib

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0"  # a {text = ...} table warns at every install
    assert any(r.replace(" ", "").startswith("setuptools>=77") for r in meta["build-system"]["requires"])
