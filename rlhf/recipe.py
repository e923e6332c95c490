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
from rlhf.threads import apply_threads, choose_threads  # noqa: F401 (re-exported)

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
    "dpo": "rlhf.dpo",
    "eval": "rlhf.evaluation",
    # Human-feedback rounds (type: rounds expands in place; docs/rounds.md).
    "collect": "rlhf.collect",
    "rounds_report": "rlhf.rounds_report",
    # Baselines (docs/baselines.md): the other generative architectures.
    "rnn_lm": "rlhf.baselines.rnn",
    "gan": "rlhf.baselines.gan",
    "vae": "rlhf.baselines.vae",
    "diffusion": "rlhf.baselines.diffusion",
    "diffusion_dpo": "rlhf.baselines.diffusion_pref",
    "baseline_report": "rlhf.baselines.report",
}


def load_plugins() -> None:
    """Import the modules that register themselves with the lower layers, so
    those layers never import them: the RNN LM baseline's architecture (model
    type ``rlhf_rnn``) with transformers' Auto classes, through which
    ``rlhf.models`` loads every checkpoint; and the labeling database reader
    with ``rlhf.data`` (``data.path: sqlite:///labels.db?project=NAME``).
    Every entry point (``rlhf`` commands, ``load_recipe``, ``validate``,
    ``run``) calls it; it is idempotent."""
    import rlhf.baselines.rnn_model  # noqa: F401
    import rlhf.labeling  # noqa: F401


@dataclass
class RunConfig:
    """Top-level recipe keys (besides `stages`)."""

    output_dir: str = opt("runs/default", "run directory; each stage writes <output_dir>/<stage>/")
    seed: int = opt(42, "seed for data order, initialisation and sampling")
    report_to: list[Literal["wandb", "tensorboard"]] = opt([], "extra trackers besides metrics.jsonl")
    wandb_project: str = opt("rlhf", "wandb project name")
    description: str = opt("", "free text, for people")
    threads: int | None = opt(None, "torch CPU threads per process (null = auto: $OMP_NUM_THREADS if set, else "
                                    "the CPUs this process may use / local ranks, at most 4 with a GPU)")

    def check(self, fail) -> None:
        if self.threads is not None and self.threads < 1:
            raise fail("threads", f"expected a positive integer or null (auto), got {self.threads}")


@dataclass
class RoundsConfig:
    """``type: rounds``: a block of stages run ``count`` times, in place.

    Round k's stage ``s`` is the stage ``round-<k>/s``, writing
    ``<output_dir>/round-<k>/s/``. Inside the block, ``${previous.s}`` is
    round k-1's ``<output_dir>/round-<k-1>/s/final`` (in round 1: ``first.s``),
    ``${round}`` is k and ``${round_dir}`` is ``<output_dir>/round-<k>``.
    """

    count: int = opt(1, "how many rounds; --only round-2/ppo picks one stage of one round")
    first: dict[str, str | None] = opt({}, "what ${previous.<stage>} means in round 1, e.g. "
                                           "{ppo: ${output_dir}/sft/final, reward: null}")
    stages: dict[str, Any] = opt({}, "the stages of one round, written as under `stages:`")


ROUND_NAME = re.compile(r"^round-(\d+)/")
_PREVIOUS = re.compile(r"\$\{previous\.([^}]*)\}")
_ROUND_VAR = re.compile(r"\$\{(round|round_dir)\}")


def round_of(stage_name: str) -> int | None:
    """k for ``round-<k>/<name>``, the name of a stage of a rounds block; else None."""
    m = ROUND_NAME.match(stage_name)
    return int(m.group(1)) if m else None


def _round_value(value: Any, k: int, block: dict, key: str, where) -> Any:
    """One value of round k's copy of the block, with ``${previous.s}``,
    ``${round}`` and ``${round_dir}`` replaced (``${output_dir}`` is left to
    OmegaConf)."""
    if isinstance(value, dict):
        return {n: _round_value(v, k, block, f"{key}.{n}", where) for n, v in value.items()}
    if isinstance(value, list):
        return [_round_value(v, k, block, f"{key}.{i}", where) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def previous(name: str, whole: bool) -> Any:
        if name not in block["stages"]:
            raise BadInput(f"{where(key)}${{previous.{name}}}: no stage {name!r} in the rounds block "
                           f"(it has: {', '.join(block['stages'])})")
        if k > 1:
            return f"${{output_dir}}/round-{k - 1}/{name}/final"
        if name not in block["first"]:
            raise BadInput(f"{where(key)}${{previous.{name}}} in round 1: set what it means there with "
                           f"first: {{{name}: <path or null>}} in the rounds block")
        found = block["first"][name]
        if found is None and not whole:
            raise BadInput(f"{where(key)}${{previous.{name}}} in round 1 is null (first.{name}), "
                           "which cannot be part of a longer string")
        return found

    whole = _PREVIOUS.fullmatch(value)
    if whole:
        return previous(whole.group(1), True)
    if value == "${round}":
        return k
    value = _PREVIOUS.sub(lambda m: str(previous(m.group(1), False)), value)
    return _ROUND_VAR.sub(lambda m: str(k) if m.group(1) == "round" else f"${{output_dir}}/round-{k}", value)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def expand_rounds(stages: dict, where) -> tuple[dict, dict[str, str]]:
    """Replace each ``type: rounds`` entry of a recipe's raw ``stages`` with
    its rounds' stages, in place and in order. Returns the new mapping and
    expanded stage key -> the key it was written under (for messages).

    An override naming an expanded stage (``stages.round-2/ppo.steps=5``)
    arrives as an entry of its own and is merged onto that stage."""
    overlays = {n: b for n, b in stages.items() if ROUND_NAME.match(str(n)) and isinstance(b, dict)}
    out: dict = {}
    aliases: dict[str, str] = {}
    for name, body in stages.items():
        if name in overlays:
            continue
        if not (isinstance(body, dict) and body.get("type") == "rounds"):
            out[name] = body
            continue
        key = f"stages.{name}"
        block = build(RoundsConfig, {k: v for k, v in body.items() if k != "type"}, key, where)
        if block.count < 1:
            raise BadInput(f"{where(key + '.count')}key '{key}.count': expected >= 1, got {block.count}")
        if not block.stages or not all(isinstance(b, dict) for b in block.stages.values()):
            raise BadInput(f"{where(key + '.stages')}key '{key}.stages': expected a non-empty mapping of "
                           "stage name -> config")
        for s in block.first:
            if s not in block.stages:
                raise BadInput(f"{where(key + '.first.' + s)}key '{key}.first.{s}': no stage {s!r} in the "
                               f"rounds block (it has: {', '.join(block.stages)})")
        spec = {"stages": block.stages, "first": block.first}
        for k in range(1, block.count + 1):
            for sname, sbody in block.stages.items():
                full = f"round-{k}/{sname}"
                aliases[f"stages.{full}"] = f"{key}.stages.{sname}"
                out[full] = _round_value(sbody, k, spec, f"stages.{full}", where)
    for name, body in overlays.items():
        out[name] = _merge(out[name], body) if name in out else body
    return out, aliases


@dataclass
class Stage:
    name: str
    type: str
    config: Any

    @property
    def round(self) -> int | None:
        """k for a stage of a rounds block (``round-<k>/<name>``), else None."""
        return round_of(self.name)


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
        """Whether ``path`` lies in the directory of one of this recipe's
        stages (its ``final/``, a PPO stage's ``best/``, a collect stage's
        exports), which validation (before anything runs) must accept as a
        source."""
        return any(_under(path, self.recipe.stage_dir(s.name).resolve()) for s in self.recipe.stages)

    @property
    def round(self) -> int | None:
        """k when this stage belongs to round k of a rounds block."""
        return round_of(self.name)

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

    load_plugins()
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
    file_stages = list(raw["stages"]) if isinstance(raw.get("stages"), dict) else []
    overridden = set()
    for item in overrides:
        keys, value = _parse_override(item)
        _set(raw, keys, value)
        overridden.add(".".join(keys))
    aliases: dict[str, str] = {}

    def where(key: str) -> str:
        for alias, orig in aliases.items():  # a stage of a rounds block: where the block wrote it
            if (key == alias or key.startswith(alias + ".")) and not any(
                    key == item or key.startswith(item + ".") for item in overridden):
                key = orig + key[len(alias):]
                break
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

    if isinstance(raw.get("stages"), dict):
        in_file = [n for n in file_stages if not (isinstance(raw["stages"].get(n), dict)
                                                  and raw["stages"][n].get("type") == "rounds")]
        raw["stages"], found = expand_rounds(raw["stages"], where)
        aliases.update(found)
        file_stages = in_file + [n for n in raw["stages"] if f"stages.{n}" in aliases]
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
        if name not in file_stages and "type" not in body:  # e.g. a mistyped stage name in an override
            raise BadInput(f"{where(key)}no stage named {name!r} (recipe has: {', '.join(map(str, file_stages))})")
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


def stage_context(recipe: Recipe, stage: Stage, is_main: bool = True) -> StageContext:
    return StageContext(recipe=recipe, name=stage.name, stage_dir=recipe.stage_dir(stage.name),
                        seed=recipe.run.seed, report_to=list(recipe.run.report_to), is_main=is_main)


def validate(recipe: Recipe) -> None:
    """Check every stage's inputs (files exist and parse, references resolve,
    prompts fit the context) without training. Raises BadInput."""
    load_plugins()
    for stage in recipe.stages:
        module = importlib.import_module(STAGE_MODULES[stage.type])
        module.validate(stage.config, stage_context(recipe, stage))


# ---------------------------------------------------------------- threads


# ---------------------------------------------------------------- what to run

# Keys that do not change a stage's results (how often it logs, samples for
# people or checkpoints): a finished stage is not "changed" by them.
IGNORED_KEYS = frozenset({"logging_steps", "log_every", "sample_every", "save_steps", "save_every"})


def _strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, (list, tuple)):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def _under(path: str, root: Path) -> bool:
    try:
        Path(path).resolve().relative_to(root)
        return True
    except (ValueError, OSError, RuntimeError):
        return False


def upstream(recipe: Recipe) -> dict[str, dict[str, str]]:
    """Stage name -> {earlier stage it consumes -> the path it names there}:
    a stage consumes another when its config names a path in that stage's dir."""
    deps: dict[str, dict[str, str]] = {}
    for i, stage in enumerate(recipe.stages):
        refs = _strings(to_dict(stage.config))
        deps[stage.name] = {}
        for other in recipe.stages[:i]:
            root = recipe.stage_dir(other.name).resolve()
            hit = next((r for r in refs if _under(r, root)), None)
            if hit is not None:
                deps[stage.name][other.name] = hit
    return deps


def _config_diff(saved: Any, new: Any, out_dir: Path, key: str = "") -> list[str]:
    """``key: old -> new`` for each leaf that differs. A path into the run dir
    matches the same path in a moved run dir (same tail after output_dir)."""
    if isinstance(saved, dict) and isinstance(new, dict):
        diffs = []
        for k in list(saved) + [k for k in new if k not in saved]:
            if k in IGNORED_KEYS:
                continue
            diffs += _config_diff(saved.get(k, "<unset>"), new.get(k, "<unset>"), out_dir, f"{key}.{k}" if key else k)
        return diffs
    if isinstance(saved, list) and isinstance(new, list) and len(saved) == len(new):
        return [d for i, (a, b) in enumerate(zip(saved, new)) for d in _config_diff(a, b, out_dir, f"{key}.{i}")]
    if saved == new:
        return []
    if isinstance(saved, str) and isinstance(new, str) and _under(new, out_dir):
        tail = Path(new).resolve().relative_to(out_dir).as_posix()
        if saved == tail or saved.endswith("/" + tail):
            return []
    return [f"{key}: {saved!r} -> {new!r}"]


def stage_changes(recipe: Recipe, stage: Stage) -> list[str]:
    """How the stage's config differs from the one its finished run saved
    (``<stage>/config.yaml``); empty when equal or nothing was saved."""
    saved_path = recipe.stage_dir(stage.name) / "config.yaml"
    if not saved_path.is_file():
        return []
    try:
        saved = yaml.safe_load(saved_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return []
    if not isinstance(saved, dict):
        return []
    new = yaml.safe_load(yaml.safe_dump(_saved_config(recipe, stage), sort_keys=False))
    if "seed" not in saved:  # written before the seed was saved with the stage
        new.pop("seed")
    return _config_diff(saved, new, Path(recipe.run.output_dir).resolve())


def _saved_config(recipe: Recipe, stage: Stage) -> dict:
    """What ``<stage>/config.yaml`` holds: the stage's type, the run's seed and its config."""
    return {"type": stage.type, "seed": recipe.run.seed, **to_dict(stage.config)}


def plan_stages(recipe: Recipe, force: bool = False, only: list[str] | None = None,
                notes: list[tuple[int, str]] | None = None) -> list[str]:
    """The names of the stages this run trains, in order (make-like); appends
    (log level, message) to ``notes`` for the caller to log once input is valid.

    A selected stage (all, or those in ``only``) runs when it has not finished
    (no ``final/``), when forced, or when a stage it consumes (its config names
    a path in that stage's dir) re-runs now or finished after it did. A
    finished stage left out by ``only`` whose input re-runs is reported stale.
    Raises BadInput, before anything is loaded, when a selected stage needs an
    upstream output that does not exist and will not be made, or when a
    finished stage's settings differ from its saved ``config.yaml``
    (``IGNORED_KEYS`` aside) and it is not forced."""
    notes = [] if notes is None else notes
    deps = upstream(recipe)
    finals = {s.name: recipe.stage_dir(s.name) / "final" for s in recipe.stages}
    done = {name: final.exists() for name, final in finals.items()}
    todo: list[str] = []
    changed: dict[str, list[str]] = {}
    for stage in recipe.stages:
        selected = not only or stage.name in only
        redone = [d for d in deps[stage.name] if d in todo]
        if done[stage.name] and not redone:  # an input that finished after this stage did
            mtime = finals[stage.name].stat().st_mtime
            redone = [d for d in deps[stage.name] if done[d] and finals[d].stat().st_mtime > mtime]
        if not selected:
            if done[stage.name] and redone:
                notes.append((logging.WARNING, f"stage {stage.name}: stale: it was built from an older output of "
                              f"stage {redone[0]}; a later run without --only (or with --only {stage.name}) re-runs it"))
            continue
        for dep, ref in deps[stage.name].items():
            if not done[dep] and dep not in todo:
                missing = "" if Path(ref).resolve() == finals[dep].resolve() else f" ({finals[dep]} missing)"
                raise BadInput(f"stage {stage.name} needs {ref}, the output of stage {dep}, which does not exist"
                               f"{missing}: run without --only, or add --only {dep}")
        if not done[stage.name] or force:
            todo.append(stage.name)
            continue
        diffs = stage_changes(recipe, stage)
        if diffs:
            changed[stage.name] = diffs
        elif redone:
            notes.append((logging.INFO, f"stage {stage.name}: re-running: it consumes the output of stage "
                                        f"{redone[0]}, which is newer or re-runs now"))
            todo.append(stage.name)
    if changed:
        what = "; ".join(f"stage {name}: {', '.join(diffs)}" for name, diffs in changed.items())
        raise BadInput(f"settings changed since these finished stages ran ({what}): to redo them run with "
                       f"--force --only {','.join(changed)} (or --force for every stage), or use a new output_dir")
    return todo


def run(recipe: Recipe, force: bool = False, only: list[str] | None = None) -> dict[str, Path]:
    """Run the recipe's stages in order (those ``plan_stages`` picks); returns
    stage name -> final checkpoint dir, for the stages that ran or had finished."""
    import torch
    from accelerate import PartialState

    load_plugins()
    if not torch.cuda.is_available():
        # Without this Accelerate ignores torchrun's environment on CPU and every
        # rank believes it is alone; HF Trainer and our PPO Accelerator read it too.
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    state = PartialState(cpu=not torch.cuda.is_available())
    threads = apply_threads(recipe.run.threads, on_gpu=torch.cuda.is_available())
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
    notes: list[tuple[int, str]] = []
    todo = plan_stages(recipe, force, only, notes)
    validate(recipe)
    # Logged after validation: bad input gets one line on stderr.
    log.info("threads: %d (%s)", *threads)
    for level, msg in notes:
        log.log(level, msg)
    out = Path(recipe.run.output_dir)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(
            f"# resolved from {recipe.path} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
            + yaml.safe_dump(recipe.resolved, sort_keys=False))
    results: dict[str, Path] = {}
    for stage in recipe.stages:
        ctx = stage_context(recipe, stage, state.is_main_process)
        final = ctx.stage_dir / "final"
        if stage.name not in todo:
            if final.exists() and (not only or stage.name in only):  # --only: report the chosen ones
                log.info("stage %s: %s exists, skipping (use --force to redo)", stage.name, final)
                results[stage.name] = final
            continue
        state.wait_for_everyone()
        if state.is_main_process:
            ctx.stage_dir.mkdir(parents=True, exist_ok=True)
            if force or final.exists():
                # A forced (or re-run) stage starts from scratch: without this it would
                # resume from the previous run's last checkpoint and append to
                # its metrics.jsonl.
                for old in (final, ctx.stage_dir / "checkpoints"):
                    if old.exists():
                        shutil.rmtree(old)
                for old in ("metrics.jsonl", "metrics.json", "initial_eval.json"):
                    (ctx.stage_dir / old).unlink(missing_ok=True)
            (ctx.stage_dir / "config.yaml").write_text(yaml.safe_dump(_saved_config(recipe, stage), sort_keys=False))
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

    if stype == "rounds":
        return (RoundsConfig.__doc__ or "") + "\n" + describe(RoundsConfig)
    module = importlib.import_module(STAGE_MODULES[stype])
    return describe(module.Config)
