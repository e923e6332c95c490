"""Recipes: load YAML, apply ``key.path=value`` overrides, interpolate ``${...}``,
validate every stage (schema and inputs) before any runs, then run them in order.

A recipe::

    output_dir: runs/quickstart
    seed: 42
    stages:
      sft:    {type: sft, model: tiny, data: {path: data/quickstart/sft_train.jsonl}}
      reward: {type: reward, model: "${output_dir}/sft/final", data: {...}}

Each stage writes ``<output_dir>/<stage name>/`` with ``final/``,
``metrics.jsonl``, ``metrics.json`` and ``config.yaml``; a stage whose
``final/`` exists is skipped unless forced.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from rlhf.config import build, opt, to_dict
from rlhf.errors import BadInput

log = logging.getLogger(__name__)


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float (YAML 1.1 makes it a string).

    People write learning rates that way, in recipes and in overrides, and the
    strict config would then reject them as "expected a number".
    """


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 (a SafeLoader subclass)

# Stage type -> module. Each module defines `Config` (a dataclass), and
# `validate(cfg, ctx)` (checks inputs without training) and `train(cfg, ctx) -> Path`.
STAGE_MODULES = {
    "sft": "rlhf.sft",
    "reward": "rlhf.reward_model",
    "ppo": "rlhf.ppo.trainer",
    "eval": "rlhf.evaluation",
    # Baselines (rlhf/baselines/README_SECTION.md): the other generative architectures.
    "rnn_lm": "rlhf.baselines.rnn",
    "gan": "rlhf.baselines.gan",
    "vae": "rlhf.baselines.vae",
    "diffusion": "rlhf.baselines.diffusion",
    "baseline_report": "rlhf.baselines.report",
}


@dataclass
class RunConfig:
    """Top-level recipe keys (besides `stages`)."""

    output_dir: str = opt("runs/default", "run directory; each stage writes <output_dir>/<stage>/")
    seed: int = opt(42, "seed for data order, initialisation and sampling")
    report_to: list[Literal["wandb", "tensorboard"]] = opt([], "extra trackers besides metrics.jsonl")
    wandb_project: str = opt("rlhf", "wandb project name")
    description: str = opt("", "free text, for people")


@dataclass
class Stage:
    name: str
    type: str
    config: Any


@dataclass
class Recipe:
    path: Path
    run: RunConfig
    stages: list[Stage]
    resolved: dict  # the fully interpolated recipe, as saved in the run dir

    def stage_dir(self, name: str) -> Path:
        return Path(self.run.output_dir) / name


@dataclass
class StageContext:
    """What a stage needs to know about the run besides its own config."""

    recipe: Recipe
    name: str
    stage_dir: Path
    seed: int
    report_to: list[str]
    is_main: bool = True

    def produces(self, path: str) -> bool:
        """Whether ``path`` is the ``final/`` of one of this recipe's stages,
        which validation (before anything runs) must accept as a source."""
        finals = {(self.recipe.stage_dir(s.name) / "final").resolve() for s in self.recipe.stages}
        return Path(path).resolve() in finals

    def loadable(self, model):
        """The ModelConfig to read tokenizer and shapes from before training.

        A stage may start from an earlier stage's ``final/`` that does not
        exist yet (validation runs before any stage); then the model that
        earlier stage starts from stands in for it (same tokenizer, same
        context length).
        """
        from rlhf.models import as_model_config

        model = as_model_config(model)
        for stage in self.recipe.stages:
            final = self.recipe.stage_dir(stage.name) / "final"
            if Path(model.name).resolve() == final.resolve() and not final.exists():
                earlier = getattr(stage.config, "model", None)
                if earlier is not None:
                    return self.loadable(earlier)
        return model


# ---------------------------------------------------------------- loading


def _line_map(text: str) -> dict[str, int]:
    """Dotted key path -> 1-based line of that key in the YAML text."""
    lines: dict[str, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                path = f"{prefix}.{k.value}" if prefix else str(k.value)
                lines[path] = k.start_mark.line + 1
                walk(v, path)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                path = f"{prefix}.{i}"
                lines[path] = v.start_mark.line + 1
                walk(v, path)

    try:
        walk(yaml.compose(text), "")
    except yaml.YAMLError:
        pass
    return lines


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise BadInput(f"override '{item}': expected key.path=value")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise BadInput(f"override '{item}': expected key.path=value")
    try:
        value = _yaml_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set(tree: dict, keys: list[str], value: Any) -> None:
    node = tree
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def load_recipe(path: str | Path, overrides: list[str] | tuple = ()) -> Recipe:
    """Load, override, interpolate and schema-check a recipe. Raises BadInput."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: recipe file not found")
    text = path.read_text(encoding="utf-8")
    try:
        raw = _yaml_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise BadInput(f"{where}: malformed YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise BadInput(f"{path}: expected a mapping with 'stages' at the top level")
    lines = _line_map(text)
    overridden = set()
    for item in overrides:
        keys, value = _parse_override(item)
        _set(raw, keys, value)
        overridden.add(".".join(keys))

    def where(key: str) -> str:
        for item in overridden:  # an override set this key or a mapping around it
            if key == item or key.startswith(item + "."):
                return f"override {item}: "
        probe = key
        while probe:  # nearest enclosing key: in the file, or created by an override
            if probe in lines:
                return f"{path}:{lines[probe]}: "
            created = sorted(item for item in overridden if item.startswith(probe + "."))
            if created:  # e.g. a mistyped stage name in an override
                return f"override {created[0]}: "
            probe = probe.rpartition(".")[0]
        return f"{path}: "

    try:
        resolved = OmegaConf.to_container(OmegaConf.create(raw), resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        msg = str(e).splitlines()[0]
        raise BadInput(f"{where(key)}interpolation failed at '{key}': {msg}") from None

    stages_raw = resolved.pop("stages", None)
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise BadInput(f"{where('stages')}key 'stages': expected a non-empty mapping of stage name -> config")
    run = build(RunConfig, resolved, "", where)
    stages = []
    for name, body in stages_raw.items():
        key = f"stages.{name}"
        if not isinstance(body, dict):
            raise BadInput(f"{where(key)}key '{key}': expected a mapping")
        body = dict(body)
        stype = body.pop("type", name)
        if stype not in STAGE_MODULES:
            raise BadInput(f"{where(key + '.type')}key '{key}.type': unknown stage type {stype!r} "
                           f"(expected one of: {', '.join(STAGE_MODULES)})")
        module = importlib.import_module(STAGE_MODULES[stype])
        stages.append(Stage(name, stype, build(module.Config, body, key, where)))
    resolved["stages"] = stages_raw
    return Recipe(path, run, stages, resolved={**to_dict(run), "stages": {
        s.name: {"type": s.type, **to_dict(s.config)} for s in stages}})


def _context(recipe: Recipe, stage: Stage, is_main: bool = True) -> StageContext:
    return StageContext(recipe=recipe, name=stage.name, stage_dir=recipe.stage_dir(stage.name),
                        seed=recipe.run.seed, report_to=list(recipe.run.report_to), is_main=is_main)


def validate(recipe: Recipe) -> None:
    """Check every stage's inputs (files exist and parse, references resolve,
    prompts fit the context) without training. Raises BadInput."""
    for stage in recipe.stages:
        module = importlib.import_module(STAGE_MODULES[stage.type])
        module.validate(stage.config, _context(recipe, stage))


def run(recipe: Recipe, force: bool = False, only: list[str] | None = None) -> dict[str, Path]:
    """Run the recipe's stages in order; returns stage name -> final checkpoint dir."""
    import torch
    from accelerate import PartialState

    if not torch.cuda.is_available():
        # Without this Accelerate ignores torchrun's environment on CPU and every
        # rank believes it is alone; HF Trainer and our PPO Accelerator read it too.
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    state = PartialState(cpu=not torch.cuda.is_available())
    if "wandb" in recipe.run.report_to:
        # Offline unless the user configured wandb: these machines have no network.
        if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
            os.environ["WANDB_MODE"] = "offline"
        os.environ.setdefault("WANDB_PROJECT", recipe.run.wandb_project)
    if only:
        unknown = [s for s in only if s not in {st.name for st in recipe.stages}]
        if unknown:
            raise BadInput(f"--only {unknown[0]}: no such stage (recipe has: "
                           f"{', '.join(s.name for s in recipe.stages)})")
    validate(recipe)
    out = Path(recipe.run.output_dir)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(
            f"# resolved from {recipe.path} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
            + yaml.safe_dump(recipe.resolved, sort_keys=False))
    results: dict[str, Path] = {}
    for stage in recipe.stages:
        ctx = _context(recipe, stage, state.is_main_process)
        final = ctx.stage_dir / "final"
        if only and stage.name not in only:
            results[stage.name] = final
            continue
        if final.exists() and not force:
            log.info("stage %s: %s exists, skipping (use --force to redo)", stage.name, final)
            results[stage.name] = final
            continue
        state.wait_for_everyone()
        if state.is_main_process:
            ctx.stage_dir.mkdir(parents=True, exist_ok=True)
            if force:
                # A forced stage starts from scratch: without this it would
                # resume from the previous run's last checkpoint and append to
                # its metrics.jsonl.
                for old in (final, ctx.stage_dir / "checkpoints"):
                    if old.exists():
                        shutil.rmtree(old)
                for old in ("metrics.jsonl", "metrics.json", "initial_eval.json"):
                    (ctx.stage_dir / old).unlink(missing_ok=True)
            (ctx.stage_dir / "config.yaml").write_text(yaml.safe_dump(
                {"type": stage.type, **to_dict(stage.config)}, sort_keys=False))
        state.wait_for_everyone()
        log.info("stage %s (%s): starting", stage.name, stage.type)
        t0 = time.time()
        module = importlib.import_module(STAGE_MODULES[stage.type])
        results[stage.name] = module.train(stage.config, ctx)
        # A later stage reads this one's output: every rank waits for it.
        state.wait_for_everyone()
        log.info("stage %s: done in %.1fs -> %s", stage.name, time.time() - t0, results[stage.name])
    if state.use_distributed:
        # Leave the process group cleanly: a rank exiting while gloo/NCCL
        # threads still run can abort ("terminate called without an active
        # exception") after all the work is done.
        state.wait_for_everyone()
        state.destroy_process_group()
    return results


def describe_stage(stype: str) -> str:
    from rlhf.config import describe

    module = importlib.import_module(STAGE_MODULES[stype])
    return describe(module.Config)
