"""``rlhf eval``: compare checkpoints from the command line, hooked into ``rlhf.cli``.

The same engine as the ``type: eval`` recipe stage; flags map onto its Config.
Heavy imports happen when the command runs, so ``rlhf --help`` stays fast.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import re
import textwrap
from pathlib import Path

from rlhf.errors import BadInput

EPILOG = """\
examples:
  # the quickstart run's policies, plus the untrained one (the random-init tiny preset)
  rlhf eval --checkpoint untrained=tiny \\
            --checkpoint sft=runs/quickstart/sft/final --checkpoint ppo=runs/quickstart/ppo/final \\
            --prompts data/quickstart/prompts_test.jsonl \\
            --reward rm=runs/quickstart/reward/final --gold rlhf.gold:vader_sentiment \\
            --reference sft --baseline sft \\
            --text data/quickstart/sft_test.jsonl --preferences data/quickstart/prefs_test.jsonl \\
            --out runs/quickstart/eval_cli

  # a quick look: 16 prompts, 4 samples each, a reward function, no KL or win rates
  rlhf eval --checkpoint runs/a/ppo/final --checkpoint runs/b/ppo/final \\
            --prompts data/quickstart/prompts_test.jsonl --max-prompts 16 --samples-per-prompt 4 \\
            --reward rlhf.gold:vader_sentiment --out runs/a_vs_b

Names default to the checkpoint's stage (runs/x/ppo/final -> ppo) or the function's name.
Outputs in --out: metrics.json (checkpoint -> metric -> mean, 95% interval), settings.json,
samples.jsonl, metrics.png, reward_vs_kl.png, curves_<stage>.png and report.html (open it in a browser).
In a recipe, the same evaluation is a stage with `type: eval` (see `rlhf schema eval`).
"""

FLAGS = {
    "checkpoints": "--checkpoint", "rewards": "--reward", "prompts": "--prompts", "gold": "--gold",
    "reference": "--reference", "baseline": "--baseline", "text": "--text", "preferences": "--preferences",
    "max_length": "--max-length", "bootstrap_samples": "--bootstrap-samples", "run_dir": "--run-dir",
    "generation.max_new_tokens": "--max-new-tokens", "generation.temperature": "--temperature",
    "generation.samples_per_prompt": "--samples-per-prompt", "generation.batch_size": "--batch-size",
    "prompts.max_samples": "--max-prompts", "prompts.path": "--prompts",
}
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")


def add_parser(sub) -> None:
    """Register ``rlhf eval`` on the main parser's subparsers."""
    p = sub.add_parser(
        "eval", help="compare checkpoints: rewards, gold, win rates, KL, perplexity; HTML report",
        description=textwrap.fill(
            "Sample every checkpoint on one prompt set with the same settings and seed, score the responses "
            "with each reward source and the gold scorer, and write metrics with 95% bootstrap intervals, the "
            "samples side by side, plots and a self-contained report.html.", 100),
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True, metavar="[NAME=]PATH",
                   help="a policy to evaluate (repeat): checkpoint dir, hub id, or a preset such as "
                        "untrained=tiny (random init, seeded with --seed)")
    p.add_argument("--prompts", required=True, metavar="FILE", help="prompts (JSONL with a `prompt` field)")
    p.add_argument("--max-prompts", type=int, metavar="N", help="use only the first N prompts")
    p.add_argument("--reward", action="append", default=[], metavar="[NAME=]SOURCE",
                   help="a reward source (repeat): reward-model dir or module:function")
    p.add_argument("--gold", metavar="SOURCE", help="gold scorer, e.g. rlhf.gold:vader_sentiment")
    p.add_argument("--reference", metavar="NAME|PATH", help="KL reference: a --checkpoint name or a model dir")
    p.add_argument("--baseline", metavar="NAME", help="win rates of the others against this --checkpoint name")
    p.add_argument("--text", metavar="FILE", help="held-out text for perplexity (prompt/completion, text or messages)")
    p.add_argument("--preferences", metavar="FILE", help="held-out preference pairs for reward-model accuracy")
    p.add_argument("--samples-per-prompt", type=int, default=1, metavar="N", help="responses per prompt (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="response length cap (default 32)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--seed", type=int, default=42, help="sampling, bootstrap and preset-init seed (default 42)")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="sequences per batch (default 64)")
    p.add_argument("--max-length", type=int, metavar="N",
                   help="tokens per prompt + response for pairs and text (default: the model's context)")
    p.add_argument("--bootstrap-samples", type=int, default=1000, metavar="N", help="bootstrap resamples")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads (default: the CPUs this process may use, or OMP_NUM_THREADS)")
    p.add_argument("--run-dir", metavar="DIR",
                   help="plot training curves from DIR/<stage>/metrics.jsonl (default: the run the checkpoints "
                        "come from, when they are runs/<x>/<stage>/final)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")


def _default_name(source: str) -> str:
    if ":" in source and not Path(source).exists():
        return source.rsplit(":", 1)[1]  # module:function -> function
    path = Path(source.rstrip("/"))
    return path.parent.name if path.name == "final" and path.parent.name else path.name


def _named(values: list[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        name, sep, source = value.partition("=")
        if not (sep and _NAME.match(name)):
            name, source = _default_name(value), value
        if not source:
            raise BadInput(f"{flag} {value!r}: expected [NAME=]SOURCE")
        if not _NAME.match(name):
            raise BadInput(f"{flag} {value!r}: cannot derive a name from it; give one as NAME={value}")
        if name in out:
            raise BadInput(f"{flag}: the name '{name}' is used twice ({out[name]} and {source}); "
                           f"name them, e.g. {flag} other={source}")
        out[name] = source
    return out


def _label(key: str) -> str:
    if key in FLAGS:
        return FLAGS[key]
    group, _, name = key.partition(".")
    return f"{FLAGS.get(group, key)} {name}".strip()


def infer_run_dir(checkpoints: dict[str, str]) -> str | None:
    """The run most checkpoints come from, when they are ``<run>/<stage>/final``."""
    runs = [Path(p).parent.parent for p in checkpoints.values()
            if Path(p).name == "final" and (Path(p).parent / "metrics.jsonl").is_file()]
    return str(collections.Counter(runs).most_common(1)[0][0]) if runs else None


def build_config(args):
    """argparse namespace -> (eval Config, seed). Raises BadInput naming the flag."""
    from rlhf.evaluation.runner import Config, EvalData, SamplingConfig

    def fail(prefix):
        return lambda key, msg: BadInput(f"{_label(prefix + key)}: {msg}")

    checkpoints = _named(args.checkpoint, "--checkpoint")
    gen = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         samples_per_prompt=args.samples_per_prompt, batch_size=args.batch_size, seed=args.seed)
    gen.check(fail("generation."))
    prompts = EvalData(path=args.prompts, max_samples=args.max_prompts)
    prompts.check(fail("prompts."))
    cfg = Config(checkpoints=checkpoints, prompts=prompts, rewards=_named(args.reward, "--reward"),
                 gold=args.gold, reference=args.reference, baseline=args.baseline, text=args.text,
                 preferences=args.preferences, max_length=args.max_length, generation=gen,
                 bootstrap_samples=args.bootstrap_samples,
                 run_dir=args.run_dir if args.run_dir is not None else infer_run_dir(checkpoints))
    cfg.check(fail(""))
    return cfg, args.seed


def run(args) -> int:
    from rlhf.evaluation.report import markdown_table
    from rlhf.evaluation.runner import check_inputs, evaluate
    from rlhf.threads import apply_threads

    if args.threads is not None and args.threads < 1:
        raise BadInput(f"--threads {args.threads}: expected a positive integer")
    cfg, seed = build_config(args)
    check_inputs(cfg, _label)
    logging.getLogger(__name__).info("threads: %d (%s)", *apply_threads(args.threads))
    out = Path(args.out)
    results = evaluate(cfg, out, seed, cfg.run_dir or None)
    settings = json.loads((out / "settings.json").read_text())
    print(markdown_table(results, settings))
    print(f"\nreport: {out / 'report.html'}")
    return 0
