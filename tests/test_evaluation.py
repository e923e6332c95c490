"""`rlhf eval` and the eval recipe stage end to end, on tiny random checkpoints (seconds).

The fake run (tests/eval_helpers.make_run) has a tiny policy saved as sft/
(the preset's seed-42 init, i.e. what `untrained=tiny --seed 42` loads),
another as ppo/, a random reward model and a few metrics.jsonl curves.
"""

from __future__ import annotations

import json
import math

import pytest
import yaml
from conftest import run_in_process, write_recipe
from eval_helpers import chromium_page, eval_args, make_run

POLICIES = ["untrained", "sft", "ppo"]
PNGS = ["metrics.png", "reward_vs_kl.png", "curves_sft.png", "curves_reward.png", "curves_ppo.png"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("eval"))


@pytest.fixture(scope="module")
def cli_out(paths):
    out = paths["run"].parent / "eval_a"
    assert run_in_process(*eval_args(paths, out)) == 0
    return out


def _read(out):
    return json.loads((out / "metrics.json").read_text())


# ---------------------------------------------------------------- rlhf eval


def test_eval_writes_every_file(cli_out, capsys):
    for name in ["metrics.json", "settings.json", "samples.jsonl", "report.html", *PNGS]:
        assert (cli_out / name).is_file() and (cli_out / name).stat().st_size > 0, name


def test_metrics_json_keyed_by_checkpoint_then_metric(cli_out):
    m = _read(cli_out)
    assert list(m) == [*POLICIES, "rm", "len"]  # policies, then reward sources
    for name in POLICIES:
        assert m[name]["kind"] == "policy"
        for key in ("reward/rm", "reward/len", "gold", "kl", "response_length", "eos_rate"):
            v = m[name][key]
            assert v["ci_low"] <= v["mean"] <= v["ci_high"] and v["n"] == 12, (name, key, v)  # 6 prompts x 2
        assert m[name]["perplexity"] > 1 and 0 <= m[name]["distinct_1"] <= 1 and 0 <= m[name]["distinct_2"] <= 1
    # Win rates against the baseline, by every scorer, for the others only.
    assert not any(k.startswith("win_rate/") for k in m["sft"])
    for name in ("untrained", "ppo"):
        assert {"win_rate/rm", "win_rate/len", "win_rate/gold"} <= set(m[name])
    # The reward model is scored on every held-out pair (10), ties counting half.
    assert m["rm"]["kind"] == "reward_source" and m["rm"]["pairs"] == 10
    assert 0 <= m["rm"]["pairwise_accuracy"]["mean"] <= 1 and m["rm"]["prompt_truncated"] == 0
    assert m["len"]["pairs"] == 10


def test_untrained_preset_is_the_seeded_random_init(cli_out):
    """untrained=tiny with seed 42 is the same model as sft/ (saved from that init):
    same samples, KL exactly 0, win rates exactly 0.5 (all ties)."""
    m = _read(cli_out)
    for key in ("kl", "gold", "reward/rm", "response_length"):
        assert m["untrained"][key] == m["sft"][key], key
    assert m["sft"]["kl"] == {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n": 12}
    for key in ("win_rate/rm", "win_rate/len", "win_rate/gold"):
        assert m["untrained"][key]["mean"] == 0.5
    assert m["ppo"]["kl"]["mean"] > 0  # a different random model is far from the reference


def test_samples_jsonl_side_by_side(cli_out):
    rows = [json.loads(line) for line in (cli_out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    assert [(r["prompt_index"], r["sample"]) for r in rows[:4]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    prompts = [json.loads(line)["prompt"] for line in (cli_out.parent / "data" / "prompts.jsonl").open()]
    assert rows[2]["prompt"] == prompts[1]
    for r in rows:
        assert list(r["responses"]) == POLICIES
        for resp in r["responses"].values():
            assert isinstance(resp["response"], str) and set(resp["scores"]) == {"reward/rm", "reward/len", "gold"}
            assert 1 <= resp["length"] <= 8 and isinstance(resp["eos"], bool)
    # Win rates recompute from the samples: ties count half.
    m = _read(cli_out)
    outcomes = []
    for r in rows:
        a, b = r["responses"]["ppo"]["scores"]["reward/len"], r["responses"]["sft"]["scores"]["reward/len"]
        outcomes.append(1.0 if a > b else 0.5 if a == b else 0.0)
    assert m["ppo"]["win_rate/len"]["mean"] == pytest.approx(sum(outcomes) / len(outcomes))


def test_settings_record_generation_and_seed(cli_out):
    s = json.loads((cli_out / "settings.json").read_text())
    assert s["seed"] == 42
    assert s["generation"] == {"max_new_tokens": 8, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                               "stop_strings": None, "samples_per_prompt": 2, "batch_size": 5}
    assert s["prompts"]["count"] == 6 and s["responses_per_checkpoint"] == 12
    assert s["reference"] == "sft" and s["baseline"] == "sft"


def test_same_seed_gives_identical_metrics(paths, cli_out):
    again = paths["run"].parent / "eval_b"
    assert run_in_process(*eval_args(paths, again)) == 0
    assert (again / "metrics.json").read_bytes() == (cli_out / "metrics.json").read_bytes()
    assert (again / "samples.jsonl").read_bytes() == (cli_out / "samples.jsonl").read_bytes()


def test_another_seed_gives_other_samples(paths, cli_out):
    other = paths["run"].parent / "eval_seed"
    assert run_in_process(*eval_args(paths, other, "--seed", "43", "--max-prompts", "2")) == 0
    rows = [json.loads(line) for line in (other / "samples.jsonl").read_text().splitlines()]
    base = [json.loads(line) for line in (cli_out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    assert [r["responses"]["ppo"]["response"] for r in rows] != [r["responses"]["ppo"]["response"] for r in base[:4]]


def test_perplexity_matches_per_example_losses(paths):
    """The batched, padded pass equals summing HF's own per-example completion loss."""
    import torch

    from rlhf.data import normalize_sft, read_records
    from rlhf.evaluation.runner import text_perplexity
    from rlhf.models import ModelConfig, load_causal_lm, load_tokenizer
    from rlhf.rewards import encode_response

    cfg = ModelConfig(str(paths["ppo"]))
    tok = load_tokenizer(cfg)
    model = load_causal_lm(cfg, tok).eval()
    rows = normalize_sft(read_records(str(paths["text"])))
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            p, r = encode_response(tok, row["prompt"], row["completion"])
            ids = torch.tensor([p + r])
            labels = ids.clone()
            labels[0, :len(p)] = -100
            nll += model(input_ids=ids, labels=labels).loss.item() * len(r)
            count += len(r)
    expected = math.exp(nll / count)
    assert text_perplexity(model, tok, rows, 256, 5, "cpu") == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("change, expected", [
    (["--checkpoint", "x=/no/such/dir"], "--checkpoint x: '/no/such/dir' is not a checkpoint directory"),
    (["--checkpoint", "runs/nothing/here/final"], "--checkpoint here: 'runs/nothing/here/final' is not a checkpoint"),
    (["--baseline", "nope"], "--baseline: 'nope' is not one of the checkpoints"),
    (["--reward", "bad=/no/such/rm"], "--reward bad: reward source '/no/such/rm'"),
    (["--gold", "no_such_module:fn"], "--gold: reward function 'no_such_module:fn': cannot import"),
    (["--temperature", "0"], "--temperature: expected a finite number > 0"),
    (["--checkpoint", "sft=tiny"], "--checkpoint: the name 'sft' is used twice"),
    (["--reward", "sft=rlhf.gold:vader_sentiment"], "--reward sft: a reward source needs a name unlike"),
    (["--prompts", "/no/prompts.jsonl"], "/no/prompts.jsonl: file not found"),
    (["--reference", "./missing"], "--reference: './missing' is not a checkpoint directory"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(paths, tmp_path, capsys, change, expected):
    out = tmp_path / "out"
    args = eval_args(paths, out)
    flag = change[0]
    if flag in ("--baseline", "--prompts", "--reference", "--gold"):  # replace the flag's value
        args[args.index(flag) + 1] = change[1]
    else:
        args += change
    assert run_in_process(*args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert expected in err, err
    assert not out.exists()


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as e:
        run_in_process("eval", "--help")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--checkpoint untrained=tiny" in out and "--baseline" in out


# ---------------------------------------------------------------- the report in Chromium


def test_report_renders_in_chromium_with_table_and_every_plot(cli_out):
    with chromium_page(cli_out / "report.html") as (page, errors, requests):
        header = page.locator("#metrics-table thead th").all_inner_texts()
        assert [h.strip() for h in header] == ["metric", *POLICIES]
        metrics = page.locator("#metrics-table tbody tr").evaluate_all("rows => rows.map(r => r.dataset.metric)")
        assert {"reward/rm", "gold", "win_rate/gold", "kl", "perplexity", "distinct_2", "eos_rate"} <= set(metrics)
        assert page.locator("#reward-table tbody tr").count() == 2
        plots = page.locator("img.plot")
        ids = plots.evaluate_all("imgs => imgs.map(i => i.id)")
        assert sorted(ids) == sorted(["plot-metrics", "plot-reward-kl", "plot-curves-sft", "plot-curves-reward",
                                      "plot-curves-ppo"])
        # Every plot decoded to a real image of a sensible size.
        sizes = plots.evaluate_all("imgs => imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        assert all(ok and w > 300 and h > 200 for ok, w, h in sizes), sizes
        # The sample browser: 10 per page, side by side, paging and search work.
        assert page.locator(".sample:not([hidden])").count() == 10
        assert page.locator(".sample:not([hidden]) .card").count() == 30
        page.click("#sample-next")
        assert page.locator(".sample:not([hidden])").count() == 2
        assert "11–12 of 12" in page.inner_text("#sample-info")
        page.fill("#sample-search", "zzz-not-there")
        assert page.locator(".sample:not([hidden])").count() == 0
        page.fill("#sample-search", "")
        page.select_option("#sample-sort", "ppo|reward/len")
        first = page.locator(".sample:not([hidden])").first.get_attribute("data-sort")
        assert json.loads(first)["ppo|reward/len"] == max(
            json.loads(line)["responses"]["ppo"]["scores"]["reward/len"]
            for line in (cli_out / "samples.jsonl").read_text().splitlines())
    assert errors == []
    assert all(u.startswith(("file:", "data:")) for u in requests), requests


# ---------------------------------------------------------------- recipe stage


def _eval_stage(paths) -> dict:
    return {
        "type": "eval",
        "checkpoints": {"untrained": "tiny", "sft": str(paths["sft"]), "ppo": str(paths["ppo"])},
        "prompts": {"path": str(paths["prompts"]), "max_samples": 3},
        "rewards": {"rm": str(paths["reward"])},
        "gold": "rlhf.gold:vader_sentiment",
        "reference": "sft", "baseline": "sft",
        "preferences": str(paths["prefs"]),
        "generation": {"max_new_tokens": 6, "batch_size": 8},
        "bootstrap_samples": 200,
        "run_dir": str(paths["run"]),
    }


def test_eval_stage_runs_in_a_recipe_and_is_skipped_when_done(paths, tmp_path, capsys):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", {"output_dir": str(out), "seed": 42,
                                                "stages": {"eval": _eval_stage(paths)}})
    assert run_in_process("validate", recipe) == 0
    assert run_in_process("run", recipe) == 0
    stage = out / "eval"
    for name in ["metrics.json", "settings.json", "samples.jsonl", "report.html", "metrics.png",
                 "reward_vs_kl.png", "curves_ppo.png", "config.yaml", "metrics.jsonl"]:
        assert (stage / name).is_file(), name
    assert (stage / "final").is_dir()
    m = _read(stage)
    assert set(m) == {"untrained", "sft", "ppo", "rm"} and m["sft"]["gold"]["n"] == 3
    assert json.loads((stage / "settings.json").read_text())["seed"] == 42  # the recipe's seed
    row = json.loads((stage / "metrics.jsonl").read_text().splitlines()[0])
    assert row["eval/ppo/gold"] == m["ppo"]["gold"]["mean"]  # one metrics path: metrics.jsonl (+ trackers)
    # Done: a re-run skips the stage and leaves its outputs alone.
    before = (stage / "metrics.json").stat().st_mtime_ns
    capsys.readouterr()
    assert run_in_process("run", recipe) == 0
    assert (stage / "metrics.json").stat().st_mtime_ns == before
    assert f"eval: {stage / 'final'}" in capsys.readouterr().out


def test_eval_stage_validates_checkpoints_an_earlier_stage_will_make(paths, tmp_path):
    """Validation runs before any stage: a checkpoint dir the recipe will produce is fine."""
    from conftest import tiny_recipe_dict

    cfg = tiny_recipe_dict(tmp_path / "out", ("sft",))
    stage = _eval_stage(paths)
    stage["checkpoints"]["sft"] = "${output_dir}/sft/final"
    cfg["stages"]["eval"] = stage
    assert run_in_process("validate", write_recipe(tmp_path / "r.yaml", cfg)) == 0
    stage["checkpoints"]["sft"] = "${output_dir}/sfft/final"  # a typo: nothing makes it
    assert run_in_process("validate", write_recipe(tmp_path / "r2.yaml", cfg)) == 2


@pytest.mark.parametrize("edit, expected", [
    (lambda s: s.update(checkpoints={}), "key 'stages.eval.checkpoints': required"),
    (lambda s: s.update(baseline="nope"), "key 'stages.eval.baseline': 'nope' is not one of the checkpoints"),
    (lambda s: s.update(rewards={"sft": "rlhf.gold:vader_sentiment"}), "key 'stages.eval.rewards.sft'"),
    (lambda s: s["generation"].update(temperature=0), "key 'stages.eval.generation.temperature'"),
    (lambda s: s.update(colour="red"), "key 'stages.eval.colour': unknown key"),
])
def test_eval_stage_config_errors_name_the_key(paths, tmp_path, capsys, edit, expected):
    stage = _eval_stage(paths)
    edit(stage)
    recipe = write_recipe(tmp_path / "r.yaml", {"output_dir": str(tmp_path / "out"), "stages": {"eval": stage}})
    assert run_in_process("validate", recipe) == 2
    assert expected in capsys.readouterr().err


def test_schema_eval_documents_every_key(capsys):
    assert run_in_process("schema", "eval") == 0
    out = capsys.readouterr().out
    for key in ("checkpoints:", "prompts:", "rewards:", "gold:", "reference:", "baseline:", "text:",
                "preferences:", "generation:", "  temperature:", "  samples_per_prompt:", "  seed:"):
        assert any(line.startswith(key) for line in out.splitlines()), key
    for line in filter(str.strip, out.splitlines()):
        assert line.partition("#")[2].strip(), f"undocumented: {line!r}"


def test_quickstart_recipe_ends_with_the_eval_stage():
    from eval_helpers import REPO

    saved = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    name, stage = list(saved["stages"].items())[-1]
    assert stage["type"] == "eval"
    assert set(stage["checkpoints"]) == {"untrained", "sft", "ppo"} and stage["checkpoints"]["untrained"] == "tiny"
