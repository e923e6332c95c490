"""The report (rlhf.evaluation.report) on hand-made results: no models, so fast.

Model output is untrusted text: it must show up as text, never run as HTML or
script, and the page must load nothing from anywhere.
"""

from __future__ import annotations

import json
import re

import pytest
from eval_helpers import chromium_page

from rlhf.evaluation import report

HOSTILE = '<script>window.__pwned = 1</script><img src="http://example.invalid/x.png" onerror="window.__pwned = 2">'


def _ci(mean, half=0.1, n=4):
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": n}


def _inputs(with_kl=True, with_baseline=True):
    results = {}
    for i, name in enumerate(["a", "b"]):
        m = {"kind": "policy", "reward/rm": _ci(0.5 * i), "gold": _ci(0.1 * i)}
        if with_baseline and name == "b":
            m["win_rate/rm"] = _ci(0.75)
            m["win_rate/gold"] = _ci(0.5)
        if with_kl:
            m["kl"] = _ci(3.0 * i, 0.5)
        m.update({"perplexity": 10.0 - i, "distinct_1": 0.5, "distinct_2": 0.7, "response_length": _ci(5.0),
                  "eos_rate": _ci(0.5, 0.25)})
        results[name] = m
    results["rm"] = {"kind": "reward_source", "pairwise_accuracy": _ci(0.75), "margin": 0.3, "pairs": 4,
                     "prompt_truncated": 1, "response_truncated": 0}
    settings = {"seed": 1, "generation": {"max_new_tokens": 8, "temperature": 1.0, "samples_per_prompt": 1,
                                          "batch_size": 4},
                "prompts": {"path": "p.jsonl", "count": 2}, "responses_per_checkpoint": 2,
                "checkpoints": {"a": "runs/x/a/final", "b": "runs/x/b/final"},
                "rewards": {"rm": [{"source": "runs/x/reward/final", "weight": 1.0}]}, "gold": "m:f",
                "reference": "a" if with_kl else None, "baseline": "a" if with_baseline else None, "text": None,
                "preferences": "prefs.jsonl", "max_length": None, "bootstrap_samples": 100, "confidence": 0.95}
    rows = []
    for i, prompt in enumerate([f"Review of {HOSTILE}:", "Plain prompt & more"]):
        rows.append({"prompt": prompt, "prompt_index": i, "sample": 0, "responses": {
            "a": {"response": f"fine {HOSTILE}", "scores": {"reward/rm": 0.0, "gold": float("nan")},
                  "kl": 0.0 if with_kl else None, "length": 5, "eos": True},
            "b": {"response": "", "scores": {"reward/rm": 1.0, "gold": 0.2},
                  "kl": 3.0 if with_kl else None, "length": 8, "eos": False}}})
    curves = {"ppo": {"KL coefficient": {"objective/kl_coef": [(1, 0.05), (2, 0.05)]},
                      "Reward": {"objective/scores": [(1, 0.1), (2, 0.3)]}}}
    return results, settings, rows, curves


def test_report_escapes_model_text_and_names_no_external_asset(tmp_path):
    results, settings, rows, curves = _inputs()
    html_text = report.write_report(tmp_path, results, settings, rows, curves).read_text()
    assert "<script>window.__pwned" not in html_text and "onerror=" not in html_text.replace("onerror=&quot;", "")
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in html_text
    # Self-contained: no src/href to anything but in-page anchors and data: URIs.
    for attr in re.findall(r'(?:src|href)="([^"]*)"', html_text):
        assert attr.startswith(("#", "data:image/png;base64,")), attr
    assert "<link" not in html_text and "@import" not in html_text
    for png in ("metrics.png", "reward_vs_kl.png", "curves_ppo.png"):
        assert (tmp_path / png).is_file()


def test_report_without_kl_or_baseline_skips_those_parts(tmp_path):
    results, settings, rows, _ = _inputs(with_kl=False, with_baseline=False)
    html_text = report.write_report(tmp_path, results, settings, rows, {}).read_text()
    assert (tmp_path / "metrics.png").is_file()
    assert not (tmp_path / "reward_vs_kl.png").exists() and 'id="plot-reward-kl"' not in html_text
    assert "win rate" not in html_text and 'id="curves"' not in html_text


def test_rerun_removes_stale_curve_plots(tmp_path):
    results, settings, rows, curves = _inputs()
    report.write_report(tmp_path, results, settings, rows, curves)
    report.write_report(tmp_path, results, settings, rows, {})
    assert not list(tmp_path.glob("curves_*.png"))


def test_markdown_table(tmp_path):
    results, settings, _, _ = _inputs()
    table = report.markdown_table(results, settings)
    lines = table.splitlines()
    assert lines[0] == "| metric | a | b |"
    assert "| reward (rm) | 0.000 [-0.100, 0.100] | 0.500 [0.400, 0.600] |" in lines
    assert "| win rate vs a (rm) | baseline | 0.750 [0.650, 0.850] |" in lines
    assert "| rm | 0.750 [0.650, 0.850] | 4 |" in lines


def test_read_curves_groups_keys_and_skips_summaries_and_eval_stages(tmp_path):
    run = tmp_path / "run"
    rows = {
        "sft": [{"step": 0, "eval/loss": 7.0}, {"step": 10, "train/loss": 3.0}, {"step": 20, "train/loss": 2.0},
                {"step": 20, "eval/loss": 1.5}, {"step": 20, "train/loss": 2.5, "train/runtime": 9.0},
                {"step": 20, "summary/eval/loss": 1.5}],
        "ppo": [{"step": s, "objective/kl": s, "objective/kl_coef": 0.1, "perf/step_s": 1.0,
                 "objective/scores": -s, "ppo/value_loss": 1.0 / s} for s in (1, 2, 3)],
        "eval": [{"step": 0, "eval/a/gold": 0.5}, {"step": 0, "eval/a/gold": 0.5}],
    }
    for stage, rs in rows.items():
        (run / stage).mkdir(parents=True)
        (run / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs) + '{"step": 4, "tru')
    (run / "eval" / "config.yaml").write_text("type: eval\n")
    curves = report.read_curves(run, order=["sft", "ppo"])
    assert list(curves) == ["sft", "ppo"]
    assert curves["sft"] == {"Loss": {"eval/loss": [(0, 7.0), (20, 1.5)], "train/loss": [(10, 3.0), (20, 2.0)]}}
    assert set(curves["ppo"]) == {"Loss", "Reward", "KL (nats / sequence)", "KL coefficient"}
    assert curves["ppo"]["KL (nats / sequence)"] == {"objective/kl": [(1, 1.0), (2, 2.0), (3, 3.0)]}


@pytest.mark.parametrize("width", [1300, 420])
def test_hostile_text_stays_text_in_chromium(tmp_path, width):
    results, settings, rows, curves = _inputs()
    path = report.write_report(tmp_path, results, settings, rows, curves)
    with chromium_page(path, width=width) as (page, errors, requests):
        assert page.evaluate("window.__pwned") is None
        first = page.locator(".sample").first
        assert HOSTILE in first.locator(".prompt").inner_text()
        assert HOSTILE in first.locator(".card .text").first.inner_text()
        assert page.locator(".sample img").count() == 0
        assert page.locator("img.plot").count() == 3
        assert page.locator("#metrics-table tbody tr").count() == 10
        # The table fits the page or scrolls inside it: nothing is cut off.
        assert page.evaluate("document.querySelector('#metrics-table').getBoundingClientRect().width") > 0
    assert errors == []
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
