"""The reward-hacking watch: the alarm rule on synthetic series, and in PPO
(watch/* metrics, best/ kept, stop_on_hacking ending the run at best/)."""

from __future__ import annotations

import json

import pytest

import ppo_rewards
from rlhf.ppo.watch import alarm, first_alarm
from rlhf.textstats import top_ending_share
from test_ppo_faults import _recipe, _rows, _run


def test_alarm_fires_when_the_proxy_rises_while_the_heldout_signal_falls():
    proxy = [0.1, 0.3, 0.5, 0.7, 0.9]
    gold = [0.2, 0.5, 0.45, 0.40, 0.30]  # peak at index 1
    # patience 2: below the peak at indexes 2 and 3; drop 0.10 >= 0.05; proxy 0.7 > 0.3
    assert first_alarm(proxy, gold, patience=2, threshold=0.05) == 3
    assert first_alarm(proxy, gold, patience=3, threshold=0.05) == 4
    assert first_alarm(proxy, gold, patience=2, threshold=0.25) is None  # never falls that far


def test_alarm_stays_quiet_on_healthy_and_noisy_runs():
    rising = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert first_alarm(rising, rising, 2, 0.05) is None  # both rise: healthy
    noisy = [0.30, 0.50, 0.46, 0.52, 0.49, 0.55]  # dips shorter than the patience
    assert first_alarm(rising, noisy, 2, 0.03) is None
    falling_proxy = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]  # both fall: not hacking, just a bad run
    assert first_alarm(falling_proxy, [0.5, 0.6, 0.4, 0.3, 0.2, 0.1], 2, 0.05) is None
    assert alarm([0.1], [0.1], 1, 0.0) is False  # one point: nothing to compare


def test_top_ending_share():
    texts = ["a great film. recommend it to friends", "bad. recommend it to friends", "fine enough", ""]
    assert top_ending_share(texts, words=4) == pytest.approx(2 / 3)
    assert top_ending_share([]) == 0.0


def _watch(out, stop: bool):
    return _recipe(out, steps=6, reward="ppo_rewards:rising", sample_every=100,
                   eval={"prompts": str(ppo_rewards.__file__).replace("ppo_rewards.py", "") + "../data/quickstart/"
                         "prompts_test.jsonl", "max_prompts": 8, "gold": "ppo_rewards:falling"},
                   watch={"every": 1, "max_prompts": 8, "patience": 2, "threshold": 0.05, "stop_on_hacking": stop})


@pytest.mark.parametrize("stop", [False, True])
def test_watch_logs_keeps_best_and_stops_on_hacking(tmp_path, monkeypatch, stop, caplog):
    monkeypatch.setitem(ppo_rewards.WATCH_CALLS, "proxy", 0)
    monkeypatch.setitem(ppo_rewards.WATCH_CALLS, "heldout", 0)
    out = tmp_path / "run"
    final = _run(_watch(out, stop))["ppo"]
    rows = [r for r in _rows(out) if "watch/heldout" in r]
    summary = json.loads((out / "ppo" / "metrics.json").read_text())
    # Held-out falls from the first watch point on: best/ is step 1, the alarm fires at step 3.
    assert [r.get("watch/alarm") for r in rows][:3] == [None, None, 1]
    assert rows[0]["watch/best_step"] == 1 and all("watch/best_step" not in r for r in rows[1:])
    for key in ("watch/proxy", "watch/kl", "watch/length", "watch/distinct_2", "watch/top_ending_share"):
        assert key in rows[0]
    assert summary["watch/alarm_step"] == 3 and summary["best/step"] == 1
    assert json.loads((out / "ppo" / "best" / "best.json").read_text())["step"] == 1
    assert "reward hacking?" in caplog.text
    from safetensors.torch import load_file

    best = load_file(out / "ppo" / "best" / "model.safetensors")
    last = load_file(final / "model.safetensors")
    same = all((best[k] == last[k]).all() for k in best)
    if stop:
        assert len(rows) == 3 and summary["train/steps"] == 3 and summary["watch/stopped"] is True
        assert same  # final/ is the best checkpoint
    else:
        assert len(rows) == 6 and summary["train/steps"] == 6 and summary["watch/stopped"] is False
        assert not same


def test_watch_needs_prompts_and_a_heldout_signal(tmp_path):
    from rlhf.errors import BadInput

    with pytest.raises(BadInput, match=r"run\.yaml:\d+: key 'stages\.ppo\.watch\.prompts'"):
        _run(_recipe(tmp_path / "run", watch={"every": 2}))
    prompts = str(ppo_rewards.__file__).replace("ppo_rewards.py", "") + "../data/quickstart/prompts_test.jsonl"
    with pytest.raises(BadInput, match=r"watch\.heldout.*held-out signal"):
        _run(_recipe(tmp_path / "run", watch={"every": 2}, eval={"prompts": prompts}))


def test_eval_report_plots_the_overoptimisation_curve(tmp_path):
    """Tiny SFT -> reward -> PPO with the watch -> eval with best-of-n and the Gao fits."""
    from conftest import QUICKSTART, tiny_recipe_dict, write_recipe
    from rlhf import recipe as recipe_mod

    cfg = tiny_recipe_dict(tmp_path / "out")
    prompts = str(QUICKSTART / "prompts_test.jsonl")
    cfg["stages"]["ppo"] = {
        "type": "ppo", "model": "${output_dir}/sft/final", "reward": "${output_dir}/reward/final",
        "data": {"path": str(QUICKSTART / "prompts_train.jsonl")}, "steps": 4, "rollout_batch_size": 8,
        "num_minibatches": 2, "micro_batch_size": 4, "ppo_epochs": 1, "learning_rate": 1e-3,
        "generation": {"max_new_tokens": 8}, "sample_every": 100, "save_every": 0,
        "eval": {"prompts": prompts, "max_prompts": 8, "gold": "rlhf.gold:vader_sentiment"},
        "watch": {"every": 1, "max_prompts": 8}}
    cfg["stages"]["eval"] = {
        "type": "eval", "checkpoints": {"sft": "${output_dir}/sft/final", "ppo": "${output_dir}/ppo/final",
                                        "best": "${output_dir}/ppo/best"},
        "prompts": {"path": prompts, "max_samples": 8}, "rewards": {"rm": "${output_dir}/reward/final"},
        "gold": "rlhf.gold:vader_sentiment", "reference": "sft", "baseline": "sft",
        "generation": {"max_new_tokens": 8}, "bootstrap_samples": 100,
        "overoptimisation": {"stage": "ppo", "best_of_n": [1, 2, 4], "max_prompts": 4}}
    out = tmp_path / "out"
    recipe_mod.run(recipe_mod.load_recipe(write_recipe(tmp_path / "r.yaml", cfg)))
    got = json.loads((out / "eval" / "overoptimisation.json").read_text())
    assert [p["n"] for p in got["best_of_n"]] == [1, 2, 4] and len(got["rl"]) == 4
    assert got["best_of_n"][0]["kl"] == 0.0 and "bon_fit" in got and "rl_best" in got
    html = (out / "eval" / "report.html").read_text()
    assert 'id="overoptimisation"' in html and (out / "eval" / "overoptimisation.png").stat().st_size > 1000
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert 0.0 <= metrics["ppo"]["lc_win_rate/gold"] <= 1.0
