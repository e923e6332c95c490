"""``rlhf label ...``: the labeling commands, hooked into ``rlhf.cli``.

Heavy imports (torch, FastAPI, SQLAlchemy) happen inside the commands, so
``rlhf --help`` stays fast. Every user error raises BadInput naming the flag
or file (exit code 2); no command deletes or rewrites stored labels.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import unicodedata
from pathlib import Path

from rlhf.errors import BadInput

EPILOG = """\
workflow:
  rlhf label pairs --db sqlite:///runs/labels.db --project qs \\
      --prompts data/quickstart/prompts_test.jsonl --model runs/quickstart/sft/final --overlap 2 \\
      --guidelines-file data/quickstart/guidelines.txt
  rlhf label add-labeler --db sqlite:///runs/labels.db --project qs --name alice
  rlhf label add-labeler --db sqlite:///runs/labels.db --project qs --name boss --admin
  rlhf label serve --db sqlite:///runs/labels.db --project qs          # http://127.0.0.1:8000
  rlhf label stats --db sqlite:///runs/labels.db --project qs
  rlhf label export --db sqlite:///runs/labels.db --project qs --out runs/labeled.jsonl
  rlhf run recipes/quickstart.yaml output_dir=runs/labeled stages.reward.model=runs/quickstart/sft/final \\
      'stages.reward.data.path=sqlite:///runs/labels.db?project=qs' --only reward
"""

DB_HELP = "labeling database: sqlite:///PATH.db (or a bare path) or postgresql://USER@HOST/DB"


def _db(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", required=True, metavar="URL", help=DB_HELP)


def _project(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--project", required=required, metavar="NAME",
                   help="project name" + ("" if required else " (default: the database's only project)"))


def add_parser(sub) -> None:
    """Register ``rlhf label`` and its subcommands on the main parser's subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    label = sub.add_parser("label", help="collect preference labels: pairs, web app, export, stats",
                           description="Collect preference labels from people and export them to the reward stage.",
                           epilog=EPILOG, formatter_class=fmt)
    cmds = label.add_subparsers(dest="label_command", required=True, metavar="SUBCOMMAND")

    p = cmds.add_parser("pairs", help="make pairs (from checkpoints or a file) and load them into a project",
                        description="Sample responses for a prompt set from one or two checkpoints (or read "
                                    "pairs from a file, or sample image pairs from a diffusion checkpoint), drop "
                                    "identical and duplicate pairs, shuffle sides, and add them to a project "
                                    "(created if new). Re-running adds only new pairs.",
                        epilog=EPILOG, formatter_class=fmt)
    _db(p)
    _project(p, required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", metavar="FILE", help="prompt file ({prompt} records) to sample responses for")
    src.add_argument("--from-file", metavar="FILE",
                     help="ready-made pairs: {prompt, response_a, response_b} / {prompt, responses} / "
                          "{prompt, chosen, rejected}")
    src.add_argument("--diffusion", metavar="CKPT",
                     help="image pairs: sample --count pairs of images from a diffusion checkpoint (a diffusion "
                          "or diffusion_dpo stage's final/); the page shows the two images under --question")
    p.add_argument("--count", type=int, default=32, metavar="N", help="with --diffusion: image pairs (default 32)")
    p.add_argument("--question", default="Which image is the better digit?",
                   help="with --diffusion: the prompt shown above each image pair")
    p.add_argument("--sampling-steps", type=int, default=20, metavar="N",
                   help="with --diffusion: DDIM steps per image (default 20)")
    p.add_argument("--model", action="append", metavar="CKPT", default=[],
                   help="checkpoint to sample from (give twice for model A vs model B; once: two samples)")
    p.add_argument("--responses", type=int, default=2, metavar="K",
                   help="responses per prompt: 2 (default) makes A/B pairs; 3 to 9 makes one ranking item per "
                        "prompt, whose K responses labelers order best to worst (with --from-file: records "
                        "{prompt, responses: [K strings]}; with --prompts: K samples, split between two models)")
    p.add_argument("--limit", type=int, metavar="N", help="use only the first N prompts / pairs")
    p.add_argument("--max-new-tokens", type=int, default=48, help="response length cap (default 48)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0: off)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling and side shuffling")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads for sampling (default: $OMP_NUM_THREADS, else the CPUs this process "
                        "may use)")
    _project_settings(p)

    p = cmds.add_parser("project", help="create a project or change its settings (guidelines, overlap)",
                        epilog=EPILOG, formatter_class=fmt)
    _db(p)
    _project(p, required=True)
    _project_settings(p)

    p = cmds.add_parser("add-labeler", help="register a labeler (or admin) and print their token once",
                        description="Tokens are shown once and stored only as a SHA-256 hash.",
                        epilog=EPILOG, formatter_class=fmt)
    _db(p)
    _project(p)
    p.add_argument("--name", required=True, help="labeler name (shown in stats and the admin view)")
    p.add_argument("--admin", action="store_true", help="an admin token: the admin view, no labeling")
    p.add_argument("--new-token", action="store_true", help="replace an existing labeler's token")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server URL to print a sign-in link for")
    p.add_argument("--json", action="store_true", help="print {name, role, token, link} as JSON")

    p = cmds.add_parser("revoke", help="revoke a labeler's token at once; their open pairs go back to the pool",
                        description="The labeler's next request is refused (HTTP 401). Their labels stay in the "
                                    "database (labels are append-only): leave them out of an export with "
                                    "`export --exclude-labeler NAME`. `add-labeler --new-token` reinstates "
                                    "them.", epilog=EPILOG, formatter_class=fmt)
    _db(p)
    _project(p)
    p.add_argument("--name", required=True, help="the labeler (or admin) to revoke")

    p = cmds.add_parser("serve", help="run the labeling web app", epilog=EPILOG, formatter_class=fmt)
    _db(p)
    _project(p)
    _serve_options(p)

    p = cmds.add_parser("export", help="write labeled pairs in the reward stage's format",
                        description="Majority vote per pair over each labeler's current label (skips left "
                                    "out); ties dropped unless --ties random.", epilog=EPILOG, formatter_class=fmt)
    _db(p)
    _project(p)
    _export_options(p)

    p = cmds.add_parser("stats", help="counts, per-labeler throughput and agreement (kappa)",
                        epilog=EPILOG, formatter_class=fmt)
    _db(p)
    _project(p)
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")


def _serve_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; put a TLS proxy in front "
                        "before binding a public address)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-body-kb", type=int, default=64, help="largest request body accepted (default 64)")
    p.add_argument("--access-log", action="store_true", help="log every request (token=... in a URL is redacted)")
    # Read as text and checked in cmd_serve: a bad value is then one `error:` line (argparse prints its usage too).
    p.add_argument("--workers", default="1", metavar="N",
                   help="server processes sharing the port and the database (default 1). With more than one, "
                        "each log line names the process (pid) that wrote it")
    p.add_argument("--allowed-host", action="append", metavar="NAME", default=[],
                   help="also answer to this Host name, e.g. the one a TLS proxy forwards (repeatable; '*': any). "
                        "Bound to a loopback address the server otherwise answers only to localhost, 127.0.0.1, "
                        "::1 and --host (against DNS rebinding); bound to another address, to any name unless "
                        "this is given")


def _export_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="PATH",
                   help="FILE.jsonl, FILE.parquet, or a directory for a Hugging Face dataset (save_to_disk)")
    p.add_argument("--format", choices=("jsonl", "parquet", "hf"), help="default: from --out's suffix")
    p.add_argument("--min-votes", type=int, help="leave out pairs with fewer non-skip labels (default 1)")
    p.add_argument("--ties", choices=("drop", "random"), help="pairs without a strict winner (default drop)")
    p.add_argument("--margin", nargs="?", const="votes", choices=("votes", "strength"),
                   help="add a `margin` column for margin losses: `votes` (the default when the flag is bare) "
                        "(winner - loser votes) / votes; `strength` the labelers' preference strength, "
                        "significantly better 3, better 2, slightly better 1, negligibly better or unsure 0")
    p.add_argument("--include-both-bad", action="store_true", default=None,
                   help="keep pairs most labelers marked 'both bad' (flagged both_bad: true; left out by default)")
    p.add_argument("--seed", type=int, help="seed for --ties random (default 0)")
    p.add_argument("--exclude-labeler", action="append", metavar="NAME",
                   help="leave this labeler's labels out (repeatable), e.g. one revoked for bad work")


def _project_settings(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML", help="project settings file (guidelines, overlap, lease_seconds)")
    p.add_argument("--guidelines-file", metavar="FILE", help="labeling guidelines shown to labelers (text)")
    p.add_argument("--overlap", type=int, help="distinct labelers per pair (default 1)")


# ---------------------------------------------------------------- commands


def _settings(args, existing=None):
    """The project config from --config / --guidelines-file / --overlap, over ``existing``."""
    from rlhf.config import to_dict
    from rlhf.labeling.config import load_project_config

    guidelines = None
    if args.guidelines_file:
        path = Path(args.guidelines_file)
        if not path.is_file():
            raise BadInput(f"--guidelines-file {path}: file not found")
        try:
            guidelines = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise BadInput(f"--guidelines-file {path}: not UTF-8 text") from None
    if args.overlap is not None and args.overlap < 1:
        raise BadInput(f"--overlap {args.overlap}: expected a positive integer")
    base = to_dict(existing) if existing is not None and not args.config else {}
    flags = {k: v for k, v in (("guidelines", guidelines), ("overlap", args.overlap)) if v is not None}
    cfg = load_project_config(args.config, **{**base, **flags})
    changed = any(v is not None for v in (args.config, guidelines, args.overlap))
    return cfg, changed


def _open_project(store, args, create: bool):
    """The named project, created (or its settings updated) as the flags say."""
    names = {p.name for p in store.projects()}
    if args.project not in names:
        if not create:
            return store.project(args.project)
        _check_name(args.project, "--project")
        cfg, _ = _settings(args)
        print(f"created project {args.project} (overlap {cfg.overlap})")
        return store.create_project(args.project, cfg)
    project = store.project(args.project)
    cfg, changed = _settings(args, project.config)
    if changed:
        project = store.set_project_config(project, cfg)
        print(f"updated project {args.project} settings (overlap {cfg.overlap})")
    return project


def _check_name(name: str, flag: str) -> None:
    if not name.strip() or len(name) > 100 or any(unicodedata.category(ch).startswith("C") for ch in name):
        raise BadInput(f"{flag} {name!r}: expected 1-100 printable characters")


def _check_pairs_args(args) -> None:
    """Every ``label pairs`` argument, before any model is loaded or sampled
    from (which takes minutes): the database URL, names, numbers in range, the
    settings files, the prompt file and the checkpoints."""
    from rlhf.labeling.store import parse_db_url

    parse_db_url(args.db)
    _check_name(args.project, "--project")
    _settings(args)  # --config, --guidelines-file, --overlap
    from rlhf.labeling.pairs import check_responses

    check_responses(args.responses)
    if args.limit is not None and args.limit < 1:
        raise BadInput(f"--limit {args.limit}: expected a positive integer")
    if args.from_file:
        if args.model:
            raise BadInput("--model: not used with --from-file (the file already has the responses)")
        return
    if args.diffusion:
        _check_image_pairs_args(args)
        return
    if not args.model:
        raise BadInput("--model: required with --prompts (one checkpoint, or two to compare)")
    if len(args.model) > 2:
        raise BadInput(f"--model: expected one or two checkpoints, got {len(args.model)}")
    if args.max_new_tokens < 1:
        raise BadInput(f"--max-new-tokens {args.max_new_tokens}: expected a positive integer")
    if args.temperature <= 0 or not 0 < args.top_p <= 1:
        raise BadInput("--temperature must be > 0 and --top-p in (0, 1]")
    if args.threads is not None and args.threads < 1:
        raise BadInput(f"--threads {args.threads}: expected a positive integer")
    from rlhf.data import is_local

    if is_local(args.prompts) and not Path(args.prompts).is_file():
        raise BadInput(f"--prompts {args.prompts}: file not found")
    from rlhf.models import ModelConfig, check_model

    for name in args.model:
        try:
            check_model(ModelConfig(name=name))
        except BadInput as e:
            raise BadInput(f"--model {name}: {e}") from None


def _check_image_pairs_args(args) -> None:
    if args.model:
        raise BadInput("--model: not used with --diffusion (the images come from the diffusion checkpoint)")
    if args.responses != 2:
        raise BadInput(f"--responses {args.responses}: image items are pairs; only 2 works with --diffusion")
    for flag, value in (("--count", args.count), ("--sampling-steps", args.sampling_steps)):
        if value < 1:
            raise BadInput(f"{flag} {value}: expected a positive integer")
    if not args.question.strip():
        raise BadInput("--question: expected some text to show above the images")
    if not (Path(args.diffusion) / "unet" / "config.json").is_file():
        raise BadInput(f"--diffusion {args.diffusion}: not a diffusion checkpoint (a diffusion stage's final/, "
                       "with unet/config.json)")


def cmd_pairs(args) -> int:
    """``label pairs``: A/B pairs, or with ``--responses K`` (K >= 3) one ranking item of K responses per prompt."""
    from rlhf.labeling import pairs as pairs_mod
    from rlhf.labeling.store import Store

    _check_pairs_args(args)
    ranking = args.responses != 2
    if args.from_file:
        candidates = (pairs_mod.read_ranking_file(args.from_file, args.responses) if ranking
                      else pairs_mod.read_pair_file(args.from_file))[: args.limit]
    elif args.diffusion:
        from rlhf.labeling.images import sample_image_pairs
        from rlhf.threads import apply_threads

        apply_threads(args.threads)
        candidates = sample_image_pairs(args.diffusion, args.count, args.question, args.sampling_steps, args.seed)
    else:
        import logging

        from rlhf.threads import apply_threads

        logging.getLogger(__name__).info("threads: %d (%s)", *apply_threads(args.threads))
        sampling = (args.max_new_tokens, args.temperature, args.top_p, args.seed)
        candidates = (pairs_mod.generate_rank_candidates(args.prompts, args.model, args.responses, *sampling,
                                                         limit=args.limit) if ranking
                      else pairs_mod.generate_candidates(args.prompts, args.model, *sampling, limit=args.limit))
    items, st = (pairs_mod.make_rankings if ranking else pairs_mod.make_pairs)(candidates, args.seed)
    if args.diffusion:
        from rlhf.labeling.images import as_image_pairs

        items = as_image_pairs(items)
    # Everything above can fail on bad input without the database being touched.
    with Store.open(args.db, create=True) as store:
        project = _open_project(store, args, create=True)
        added, already = store.add_pairs(project, items)
    what, same = ((f"candidate ranking items of {args.responses} responses", "repeated") if ranking
                  else ("candidate pairs", "identical"))
    print(f"{st.candidates} {what}: dropped {st.identical} with {same} responses, {st.empty} with an empty "
          f"response, {st.duplicates} duplicates; {added} added to project {project.name}"
          + (f" ({already} were already there)" if already else ""))
    return 0


def cmd_project(args) -> int:
    from rlhf.config import to_dict
    from rlhf.labeling.store import Store

    with Store.open(args.db, create=True) as store:
        project = _open_project(store, args, create=True)
    print(json.dumps(to_dict(project.config), indent=2, ensure_ascii=False))
    return 0


def cmd_add_labeler(args) -> int:
    from rlhf.labeling.store import Store

    _check_name(args.name, "--name")
    with Store.open(args.db) as store:
        project = store.project(args.project)
        token = "rlhf_" + secrets.token_urlsafe(32)  # 256 bits; the prefix helps secret scanners spot leaks
        role = "admin" if args.admin else "labeler"
        store.add_labeler(project, args.name, token, role=role, replace_token=args.new_token)
    link = args.url.rstrip("/") + ("/admin" if args.admin else "/") + f"#token={token}"
    if args.json:
        print(json.dumps({"name": args.name, "role": role, "project": project.name, "token": token, "link": link}))
    else:
        print(f"{role} {args.name} of project {project.name}. Token (shown once; only its hash is stored):\n"
              f"  {token}\nsign-in link (the token stays in the URL fragment, never sent to the server):\n  {link}")
    return 0


def cmd_revoke(args) -> int:
    from rlhf.labeling.store import Store

    with Store.open(args.db) as store:
        project = store.project(args.project)
        revoked, released = store.revoke_labeler(project, args.name)
    if revoked:
        print(f"revoked {args.name} of project {project.name}: their token no longer works; "
              f"{released} open pair(s) released to other labelers; their labels are kept")
    else:
        print(f"{args.name} of project {project.name} was already revoked")
    return 0


def _workers(text: str) -> int:
    """``--workers``: a whole number from 1 to 64 (more processes than that
    only queue on the one database)."""
    try:
        workers = int(text)
    except ValueError:
        raise BadInput(f"--workers {text!r}: expected a whole number of server processes, e.g. 2") from None
    if not 1 <= workers <= 64:
        raise BadInput(f"--workers {workers}: expected 1 to 64 server processes")
    return workers


def cmd_serve(args) -> int:
    from rlhf.labeling.server import is_loopback, listen_socket, serve, serve_workers
    from rlhf.labeling.store import Store

    workers = _workers(args.workers)
    if args.max_body_kb < 1:
        raise BadInput(f"--max-body-kb {args.max_body_kb}: expected a positive integer")
    for name in args.allowed_host:
        if name != "*" and (not name.strip() or any(ch in name for ch in "/ \t@")):
            raise BadInput(f"--allowed-host {name!r}: expected a host name or address (no scheme, path or "
                           "spaces), or '*'")
    if not 0 < args.port < 65536:
        raise BadInput(f"--port {args.port}: expected 1-65535")
    listen_socket(args.host, args.port).close()  # a taken port or bad address: said before the database is opened
    # Checks (and upgrades) the database once, before any worker starts; and that the workers can share it.
    with Store.open(args.db, shared=workers > 1) as store:
        project = store.project(args.project)
        if not is_loopback(args.host):
            print(f"warning: listening on {args.host}, reachable from other machines; tokens travel in "
                  "clear text unless a TLS proxy is in front", file=sys.stderr)
        url = f"http://{args.host}:{args.port}"
        procs = f" in {workers} processes" if workers > 1 else ""
        print(f"serving project {project.name} from {store.display} on {url}{procs} (Ctrl-C to stop)", flush=True)
        options = (args.host, args.port, args.max_body_kb * 1024, args.access_log, args.allowed_host)
        if workers == 1:
            serve(store, project, *options)
            return 0
    # Each worker opens its own Store; this one's connections are closed first.
    serve_workers(args.db, project, workers, *options)
    return 0


def _too_few(n: int, min_votes: int) -> str:
    return f"{n} not labeled yet" if min_votes == 1 else f"{n} with fewer than {min_votes} votes"


def _both_bad(st, cfg) -> str:
    if cfg.include_both_bad:
        return f"{st.both_bad} marked both bad kept (both_bad: true)"
    return f"{st.both_bad} marked both bad left out (--include-both-bad keeps them)"


def cmd_export(args) -> int:
    from rlhf.labeling.config import ExportConfig, replace
    from rlhf.labeling.export import export_rows, output_format, write_rows
    from rlhf.labeling.store import Store, parse_db_url

    out = Path(args.out)
    fmt = output_format(out, args.format)
    if args.min_votes is not None and args.min_votes < 1:
        raise BadInput(f"--min-votes {args.min_votes}: expected a positive integer")
    db = parse_db_url(args.db)
    with Store.open(db) as store:
        project = store.project(args.project)
        cfg = replace(ExportConfig(project=project.name), min_votes=args.min_votes, ties=args.ties,
                      margin=args.margin, seed=args.seed, exclude_labelers=args.exclude_labeler,
                      include_both_bad=args.include_both_bad)
        rows, st = export_rows(store, project, cfg)
    protect = [Path(db.url.database)] if db.url.get_backend_name() == "sqlite" else []
    if not rows:
        raise BadInput(f"--project {project.name}: no labeled pairs to export yet ({st.pairs} pairs, "
                       f"{_too_few(st.too_few_votes, cfg.min_votes)}, {st.ties_dropped} ties dropped, "
                       f"{_both_bad(st, cfg)})")
    write_rows(rows, out, fmt, protect)
    print(f"{st.exported} preference pairs -> {out} ({fmt}); of {st.pairs} pairs: "
          f"{_too_few(st.too_few_votes, cfg.min_votes)}, {st.ties_dropped} ties dropped, {st.ties_randomised} ties "
          f"given a random side, {_both_bad(st, cfg)}")
    return 0


def cmd_stats(args) -> int:
    from rlhf.labeling.stats import compute, format_stats
    from rlhf.labeling.store import Store

    with Store.open(args.db) as store:
        st = compute(store, store.project(args.project))
    print(json.dumps(st, indent=2, ensure_ascii=False) if args.json else format_stats(st))
    return 0


COMMANDS = {"pairs": cmd_pairs, "project": cmd_project, "add-labeler": cmd_add_labeler, "revoke": cmd_revoke,
            "serve": cmd_serve, "export": cmd_export, "stats": cmd_stats}


def run(args) -> int:
    """Dispatch ``rlhf label SUBCOMMAND``; BadInput propagates to the exit-code-2 handler."""
    return COMMANDS[args.label_command](args)
