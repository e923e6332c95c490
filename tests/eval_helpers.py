"""Helpers for the evaluation tests: tiny checkpoints and a headless-Chromium page.

Chromium is Debian's ``chromium`` package (``apt-get install -y chromium``),
driven by the Playwright Python package through ``executable_path``; nothing is
downloaded (never ``playwright install``). Tests skip when either is missing.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "data" / "quickstart"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def head(src: Path, dst: Path, n: int) -> Path:
    """The first ``n`` lines of a JSONL file."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(src.read_text(encoding="utf-8").splitlines(keepends=True)[:n]), encoding="utf-8")
    return dst


def make_run(root: Path) -> dict[str, Path]:
    """A fake finished run in ``root/run``: random tiny policies as sft/ppo, a random
    tiny reward model, their metrics.jsonl curves; plus small data slices.

    ``sft`` is the tiny preset initialised with seed 42, i.e. exactly what
    ``untrained=tiny`` with seed 42 loads.
    """
    from rlhf.models import ModelConfig, load_causal_lm, load_sequence_classifier, load_tokenizer, save_checkpoint

    run = root / "run"
    tok = load_tokenizer(ModelConfig("tiny"))
    save_checkpoint(load_causal_lm(ModelConfig("tiny"), tok, seed=42), tok, _mkparent(run / "sft" / "final"))
    save_checkpoint(load_causal_lm(ModelConfig("tiny"), tok, seed=7), tok, _mkparent(run / "ppo" / "final"))
    save_checkpoint(load_sequence_classifier(ModelConfig("tiny"), tok, seed=3), tok,
                    _mkparent(run / "reward" / "final"))
    curves = {
        "sft": [{"step": s, "train/loss": 8.0 / s} for s in (1, 2, 3, 4)],
        "reward": [{"step": s, "train/loss": 0.7 - 0.05 * s, "train/accuracy": 0.5 + 0.05 * s} for s in (1, 2, 3)],
        "ppo": [{"step": s, "objective/scores": 0.1 * s, "objective/kl": 0.5 * s, "objective/kl_coef": 0.05,
                 "ppo/policy_loss": -0.01 * s, "perf/step_s": 1.0} for s in (1, 2, 3)],
    }
    for stage, rows in curves.items():
        (run / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "recipe.yaml").write_text(yaml.safe_dump({"stages": {"sft": {}, "reward": {}, "ppo": {}}}))
    data = root / "data"
    return {
        "run": run, "sft": run / "sft" / "final", "ppo": run / "ppo" / "final", "reward": run / "reward" / "final",
        "prompts": head(QUICKSTART / "prompts_test.jsonl", data / "prompts.jsonl", 6),
        "text": head(QUICKSTART / "sft_test.jsonl", data / "text.jsonl", 12),
        "prefs": head(QUICKSTART / "prefs_test.jsonl", data / "prefs.jsonl", 10),
    }


def _mkparent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def eval_args(paths: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """``rlhf eval`` arguments over the fake run (small and fast)."""
    return ["eval", "--checkpoint", "untrained=tiny", "--checkpoint", f"sft={paths['sft']}",
            "--checkpoint", str(paths["ppo"]),  # name derived: ppo
            "--prompts", str(paths["prompts"]), "--reward", f"rm={paths['reward']}",
            "--reward", "len=eval_rewards:length", "--gold", "rlhf.gold:vader_sentiment",
            "--reference", "sft", "--baseline", "sft", "--text", str(paths["text"]),
            "--preferences", str(paths["prefs"]), "--samples-per-prompt", "2", "--max-new-tokens", "8",
            "--batch-size", "5", "--bootstrap-samples", "200", "--seed", "42", "--out", str(out), *extra]


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    import importlib.util

    if importlib.util.find_spec("playwright") is None:
        return "the playwright Python package is not installed (pip install -e '.[dev]')"
    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
        return f"{CHROMIUM} not found (apt-get install -y chromium)"
    return None


@contextmanager
def chromium_page(html_file: Path, width: int = 1300):
    """Open ``html_file`` in headless Chromium; yields (page, errors, requests).

    ``errors`` collects console errors and uncaught exceptions; ``requests``
    every URL the page asked for. Anything but file: and data: URLs is aborted.
    """
    reason = chromium_missing()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.on("request", lambda r: requests.append(r.url))
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file:", "data:"))
                       else route.abort())
            page.goto(Path(html_file).resolve().as_uri())
            page.wait_for_load_state("load")
            yield page, errors, requests
        finally:
            browser.close()
