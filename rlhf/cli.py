"""The ``rlhf`` command.

Exit codes: 0 success; 2 bad input (recipe, data, arguments) with one line on
stderr naming the file, line or key; 1 anything else (with a traceback).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import textwrap

from rlhf.errors import BadInput, Paused, RunFailed

# Subcommands that live beside their feature: each module has add_parser(sub) and run(args).
SUBCOMMANDS = {"label": "rlhf.labeling.cli", "eval": "rlhf.evaluation.cli", "plan": "rlhf.plan"}

EPILOG_RUN = """\
examples:
  rlhf run recipes/quickstart.yaml
  rlhf run recipes/quickstart.yaml output_dir=runs/try2 stages.sft.train.max_steps=50
  rlhf run recipes/quickstart.yaml --force --only reward   # redo reward; ppo and eval are then stale
  rlhf run recipes/quickstart.yaml --threads 2
  torchrun --nproc_per_node 2 -m rlhf run recipes/quickstart.yaml        # 2 CPU processes
  accelerate launch --config_file accelerate_config.yaml -m rlhf run RECIPE  # GPUs
"""

EPILOG_VALIDATE = """\
examples:
  rlhf validate recipes/quickstart.yaml
  rlhf validate recipes/quickstart.yaml stages.reward.max_length=128
"""

EPILOG_SCHEMA = """\
examples:
  rlhf schema sft
  rlhf schema reward
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rlhf",
        description="SFT -> reward model -> PPO -> eval, chained by one YAML recipe.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `rlhf COMMAND --help` for a command's options and examples.",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run a recipe's stages in order",
                       description=textwrap.fill("Validate the whole recipe, then run its stages in order. Finished stages "
                                   "(final/ exists) are skipped; an interrupted stage resumes from its last "
                                   "checkpoint. A finished stage re-runs when a stage it consumes (its config "
                                   "names a path in that stage's dir) re-runs or finished after it did. If a "
                                   "finished stage's settings differ from its saved config.yaml, nothing runs "
                                   "(exit 2, naming the keys): use --force, --force --only STAGE or a new "
                                   "output_dir. Keys that do not change results are not compared: "
                                   "logging_steps, log_every, sample_every, save_steps, save_every, and the "
                                   "top-level report_to, wandb_project, description, threads. With --only, "
                                   "other stages are left as they are (reported if stale), and a selected "
                                   "stage whose upstream output does not exist is an error.", 100),
                       epilog=EPILOG_RUN, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("recipe", help="recipe YAML file")
    r.add_argument("overrides", nargs="*", metavar="key.path=value", help="override recipe values")
    r.add_argument("--force", action="store_true", help="redo stages even if their final/ exists")
    r.add_argument("--only", action="append", metavar="STAGE",
                   help="run only this stage (repeatable, or comma-separated); other stages are left as they are")
    r.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads per process (default: the recipe's threads, else $OMP_NUM_THREADS, "
                        "else the CPUs this process may use / local ranks)")

    v = sub.add_parser("validate", help="check a recipe and its data without training",
                       description="Load the recipe, apply overrides, resolve ${...}, check every key and type, "
                                   "and check that data files exist and parse and prompts fit the model.",
                       epilog=EPILOG_VALIDATE, formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("recipe", help="recipe YAML file")
    v.add_argument("overrides", nargs="*", metavar="key.path=value", help="override recipe values")

    s = sub.add_parser("schema", help="print a stage type's config keys, defaults and docs",
                       epilog=EPILOG_SCHEMA, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("stage_type", help="sft, reward, ppo, eval, collect, rounds, ...")
    for module in SUBCOMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return p


def _setup_logging(quiet: bool) -> None:
    rank = int(os.environ.get("RANK", "0"))
    level = logging.WARNING if quiet or rank != 0 else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _run(args) -> int:
    from rlhf import recipe as recipe_mod

    # `rlhf label` commands other than `pairs` (which samples from checkpoints) touch
    # only the labeling database. The model plugin imports torch: in the labeling
    # server that took ~465,000 objects to its heap instead of ~123,000, and each
    # full garbage collection ~240 ms instead of ~55, a stall for every request in
    # flight (see rlhf.labeling.server._freeze_startup_heap).
    database_only = args.command == "label" and args.label_command != "pairs"
    if args.command != "schema" and not database_only:
        recipe_mod.load_plugins()
    if args.command in SUBCOMMANDS:
        return importlib.import_module(SUBCOMMANDS[args.command]).run(args)

    if args.command == "schema":
        if args.stage_type not in (*recipe_mod.STAGE_MODULES, "rounds"):
            raise BadInput(f"unknown stage type {args.stage_type!r} (expected one of: "
                           f"{', '.join(recipe_mod.STAGE_MODULES)}, rounds)")
        print(recipe_mod.describe_stage(args.stage_type))
        return 0
    recipe = recipe_mod.load_recipe(args.recipe, args.overrides)
    if args.command == "validate":
        recipe_mod.validate(recipe)
        names = ", ".join(f"{s.name} ({s.type})" for s in recipe.stages)
        print(f"{args.recipe}: OK — stages: {names}; output_dir: {recipe.run.output_dir}")
        return 0
    only = [name for item in args.only for name in item.split(",") if name] if args.only else None
    if args.threads is not None:
        if args.threads < 1:
            raise BadInput(f"--threads: expected a positive integer, got {args.threads}")
        recipe.run.threads = recipe.resolved["threads"] = args.threads
    results = recipe_mod.run(recipe, force=args.force, only=only)
    if int(os.environ.get("RANK", "0")) == 0:
        for name, final in results.items():
            print(f"{name}: {final}")
    return 0


def _hub_reachable(timeout: float = 2.0) -> tuple[bool, str]:
    """(can this process open a TCP connection to the hub, host:port) within
    ``timeout`` seconds, name lookup included; uses $HF_ENDPOINT when set."""
    import socket
    import threading
    from urllib.parse import urlsplit

    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = url.hostname or "huggingface.co"
    try:
        port = url.port or (80 if url.scheme == "http" else 443)
    except ValueError:
        port = 443
    ok: list[bool] = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok), f"{host}:{port}"


def _offline_if_no_network(command: str) -> None:
    """Without network, huggingface_hub retries each request for minutes; one
    quick probe here (before transformers, datasets or huggingface_hub are
    imported: they read the environment at import) turns that into offline
    mode. Skipped when HF_HUB_OFFLINE is set either way."""
    if command == "schema" or "HF_HUB_OFFLINE" in os.environ:
        return
    reachable, where = _hub_reachable()
    if not reachable:
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            os.environ.setdefault(var, "1")
        logging.getLogger("rlhf").info("hub %s unreachable: working offline (HF_HUB_OFFLINE=1); set "
                                       "HF_HUB_OFFLINE=0 to skip this check", where)


def main(argv: list[str] | None = None) -> int:
    rc = _main(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_distributed_worker(rc)
    return rc


def _exit_distributed_worker(rc: int) -> None:
    """End a torchrun/accelerate worker without interpreter finalization.

    Every output is written and the process group destroyed by now, yet on
    CPU (gloo) a worker still aborts now and then while Python tears down
    ("terminate called without an active exception", SIGABRT: gloo's C++
    worker threads release tensors whose Python owners are already gone;
    pytorch/pytorch#179291 tried an atexit fix and was withdrawn). The
    launcher then reports a finished, successful run as failed and kills
    the other ranks. Nothing is left to finalize (loggers, wandb and
    tensorboard are closed by each stage), so flush and leave directly.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(rc)


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    # Overrides may follow flags (`run R --force a.b=1`); argparse stops filling
    # a positional list at the first flag, so collect the rest here.
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    _setup_logging(args.quiet)
    _offline_if_no_network(args.command)
    try:
        return _run(args)
    except BadInput as e:
        msg = " ".join(str(e).split("\n"))
        print(f"error: {textwrap.shorten(msg, 2000)}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except Paused as e:
        print(" ".join(str(e).split()))
        return 0
    except KeyboardInterrupt:
        # PPO saves a checkpoint on the first Ctrl-C; SFT and reward resume from
        # their last save_steps checkpoint.
        print("interrupted: re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
