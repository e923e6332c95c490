"""Bad input through the real CLI: exit code 2, one `error:` line on stderr that
names the file (and line or key), no traceback; and earlier outputs survive.

Every case runs in-process through ``rlhf.cli.main``; a few also run as real
subprocesses (``python -m rlhf ...``) so the exact stderr a user sees is
checked too, without paying seconds of torch import per case.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from conftest import run_cli_many, run_in_process, tiny_recipe_dict, write_recipe


def _line_of(path: Path, needle: str) -> int:
    return next(i for i, text in enumerate(path.read_text().splitlines(), 1) if needle in text)


def _jsonl(path: Path, rows: list[dict], raw_line: str | None = None, at: int | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    if raw_line is not None:
        lines.insert(at - 1, raw_line)
    path.write_text("\n".join(lines) + "\n")
    return path


PAIR = {"prompt": "Review of Sky:", "chosen": " Loved it.", "rejected": " Hated it."}
DEMO = {"prompt": "Review of Sky:", "completion": " Loved it."}


def _cases(d: Path) -> dict[str, tuple[list[str], str]]:
    """Case name -> (CLI args, text the error line must contain)."""
    out = d / "out"
    base = tiny_recipe_dict(out)
    recipe = write_recipe(d / "recipe.yaml", base)
    cases = {}

    def variant(name: str, edit) -> Path:
        cfg = tiny_recipe_dict(out)
        edit(cfg)
        return write_recipe(d / f"{name}.yaml", cfg)

    bad_yaml = d / "malformed.yaml"
    bad_yaml.write_text("output_dir: x\nstages:\n  sft:\n    type: sft: oops\n    model: tiny\n")
    cases["malformed_yaml"] = (["run", bad_yaml], f"{bad_yaml}:4: malformed YAML")

    r = variant("unknown_key", lambda c: c["stages"]["sft"].update(max_lenght=64))
    cases["unknown_key"] = (["run", r], f"{r}:{_line_of(r, 'max_lenght')}: key 'stages.sft.max_lenght': unknown key")

    r = variant("wrong_type", lambda c: c["stages"]["reward"]["train"].update(batch_size="eight"))
    cases["wrong_type"] = (["run", r], f"{r}:{_line_of(r, 'eight')}: key 'stages.reward.train.batch_size': "
                                       "expected an integer, got 'eight'")

    r = variant("stage_type", lambda c: c["stages"]["reward"].update(type="rewrad"))  # dpo is a stage type now
    cases["unknown_stage_type"] = (["run", r], f"{r}:{_line_of(r, 'rewrad')}: key 'stages.reward.type': "
                                               "unknown stage type 'rewrad'")

    missing = d / "no_such_data.jsonl"
    cases["missing_data_file"] = (["run", recipe, f"stages.sft.data.path={missing}"], f"{missing}: file not found")

    f = _jsonl(d / "malformed.jsonl", [DEMO, DEMO, DEMO], '{"prompt": "x", "completion": ', at=3)
    cases["malformed_jsonl_line"] = (["run", recipe, f"stages.sft.data.path={f}"], f"{f}:3: malformed JSON")

    # An empty response is valid (it is judged); a missing one is not.
    f = _jsonl(d / "null_chosen.jsonl", [PAIR, {**PAIR, "chosen": None}, PAIR])
    cases["null_chosen"] = (["run", recipe, f"stages.reward.data.path={f}"],
                            f"{f}:2: 'chosen' must be a string or a list of {{role, content}} messages")

    f = _jsonl(d / "identical.jsonl", [PAIR, PAIR, {**PAIR, "rejected": PAIR["chosen"]}])
    cases["identical_pair"] = (["run", recipe, f"stages.reward.data.eval_path={f}"],
                               f"{f}:3: 'chosen' and 'rejected' are identical")

    f = _jsonl(d / "long_prompt.jsonl", [DEMO, {**DEMO, "prompt": "Review of Sky: " * 40}])
    cases["prompt_over_max_length"] = (["run", recipe, f"stages.sft.data.path={f}"],
                                       f"{f}:2: prompt is")
    f = _jsonl(d / "longer_than_context.jsonl", [DEMO, {**DEMO, "prompt": "Review of Sky: " * 100}])
    cases["prompt_over_context"] = (["validate", recipe, f"stages.sft.data.eval_path={f}",
                                     "stages.sft.max_length=100000"], f"{f}:2: prompt is")
    cases["max_length_over_context"] = (["validate", recipe, "stages.reward.max_length=100000"],
                                        "stages.reward.max_length: 100000 exceeds the model's context of 256")

    cases["bad_override_syntax"] = (["run", recipe, "stages.sft.train.max_steps"],
                                    "override 'stages.sft.train.max_steps': expected key.path=value")
    cases["override_unknown_key"] = (["run", recipe, "stages.sft.train.max_stepz=3"],
                                     "override stages.sft.train.max_stepz: key 'stages.sft.train.max_stepz': "
                                     "unknown key")
    cases["only_unknown_stage"] = (["run", recipe, "--only", "ppo"], "--only ppo: no such stage")
    cases["missing_recipe"] = (["run", d / "nope.yaml"], f"{d / 'nope.yaml'}: recipe file not found")
    return cases


CASES = ["malformed_yaml", "unknown_key", "wrong_type", "unknown_stage_type", "missing_data_file",
         "malformed_jsonl_line", "null_chosen", "identical_pair", "prompt_over_max_length", "prompt_over_context",
         "max_length_over_context", "bad_override_syntax", "override_unknown_key", "only_unknown_stage",
         "missing_recipe"]
# These also run as real subprocesses (each costs seconds of torch import), to
# check the exact stderr a user sees; all run in-process below.
SUBPROCESS_CASES = ["malformed_yaml", "override_unknown_key", "malformed_jsonl_line", "prompt_over_max_length"]


def _check_error(rc: int, stderr: str, expected: str) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr, stderr
    assert rc == 2, stderr
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("error: "), lines[0]
    assert expected in lines[0], lines[0]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_error_line(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args, expected = _cases(tmp_path)[case]
    rc = run_in_process(*args)
    _check_error(rc, capsys.readouterr().err, expected)
    assert not (tmp_path / "out").exists()  # nothing was started


def test_bad_input_in_subprocess(tmp_path):
    cases = _cases(tmp_path)
    arg_lists = [list(map(str, cases[name][0])) for name in SUBPROCESS_CASES]
    arg_lists.append(["run", str(tmp_path / "recipe.yaml"), "--bogus"])
    *results, bogus = run_cli_many(arg_lists, cwd=tmp_path)
    for name, res in zip(SUBPROCESS_CASES, results):
        _check_error(res.rc, res.stderr, cases[name][1])
        assert res.stdout == ""
    # An unknown flag is argparse's usage error, also exit code 2.
    assert bogus.rc == 2 and "Traceback" not in bogus.stderr
    assert bogus.stderr.startswith("usage: rlhf")
    assert bogus.stderr.strip().splitlines()[-1] == "rlhf: error: unrecognized arguments: --bogus"
    assert not (tmp_path / "out").exists()


def test_all_cases_are_checked(tmp_path):
    assert set(_cases(tmp_path)) == set(CASES) and set(SUBPROCESS_CASES) <= set(CASES)


# ------------------------------------------------- earlier outputs survive


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_bad_input_never_destroys_earlier_outputs(tmp_path, capsys):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe_dict(out))
    assert run_in_process("run", recipe) == 0
    capsys.readouterr()  # the first run's progress bars
    before = _snapshot(out)
    assert {"recipe.yaml", "sft/final/model.safetensors", "sft/metrics.json", "reward/final/model.safetensors",
            "reward/metrics.jsonl", "reward/config.yaml"} <= set(before)

    identical = _jsonl(tmp_path / "identical.jsonl", [PAIR, {**PAIR, "rejected": PAIR["chosen"]}])
    broken = _jsonl(tmp_path / "broken.jsonl", [DEMO], "{not json", at=2)
    attempts = [
        ["run", recipe, "stages.sft.train.max_stepz=3"],
        ["run", recipe, "--force", "stages.sft.train.batch_size=eight"],
        ["run", recipe, "--force", f"stages.sft.data.path={broken}"],
        # sft is fine, reward's data is not: --force must not redo (delete) sft first.
        ["run", recipe, "--force", f"stages.reward.data.path={identical}"],
        ["run", recipe, "--force", "--only", "reward", f"stages.reward.data.eval_path={identical}"],
    ]
    for args in attempts:
        assert run_in_process(*args) == 2, args
        assert capsys.readouterr().err.startswith("error: "), args
    assert _snapshot(out) == before
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["stages"]["sft"]["train"]["max_steps"] == 4
