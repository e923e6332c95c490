"""The package's internal import graph: no cycles, and lower layers never import higher ones.

Every module under ``rlhf/`` is parsed with ``ast`` (nothing is imported); every
``import``/``from ... import`` anywhere in a module counts, function-local ones
included, since they are dependencies all the same, and so does
``importlib.import_module("rlhf.x")`` with a literal name.
``python tests/test_import_graph.py`` prints the graph (module -> the rlhf
modules it imports), the first cycle and every violation.

Layers, low to high (a module may import its own layer's modules or lower ones):

  0  rlhf.errors, rlhf.config, rlhf.tracking, rlhf.threads, rlhf.textstats
  1  rlhf.models, rlhf.encoders, rlhf.data, rlhf.sharding, rlhf.training
  2  rlhf.sampling, rlhf.rewards, rlhf.reward_head, rlhf.pair_baselines, rlhf.gold, rlhf.ppo (package),
     rlhf.ppo.core, rlhf.ppo.policy
  3  stages: rlhf.sft, rlhf.reward_model, rlhf.dpo, rlhf.ppo.trainer, rlhf.baselines.*,
     rlhf.collect, rlhf.rounds_report;
     rlhf.evaluation.*, rlhf.labeling.*
  4  rlhf.recipe, rlhf.plan, rlhf.cli, rlhf.__main__

A module belongs to the longest entry that names it or a package above it.
Within layer 3: the stages do not import each other, and rlhf.evaluation and
rlhf.ppo.trainer do not import each other (shared code goes down a layer).
A lower layer that needs a higher one's code gets it through a registry it
owns (``rlhf.data.register_reader``; transformers' Auto classes for the RNN
baseline), filled by the entry points (``rlhf.recipe.load_plugins``).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "rlhf"

LAYERS: list[tuple[str, ...]] = [
    ("rlhf.errors", "rlhf.config", "rlhf.tracking", "rlhf.threads", "rlhf.textstats", "rlhf.precision"),
    ("rlhf.models", "rlhf.encoders", "rlhf.data", "rlhf.sharding", "rlhf.training"),
    ("rlhf.sampling", "rlhf.rewards", "rlhf.reward_head", "rlhf.pair_baselines", "rlhf.gold", "rlhf.ppo",
     "rlhf.ppo.core", "rlhf.ppo.policy"),
    ("rlhf.sft", "rlhf.reward_model", "rlhf.dpo", "rlhf.ppo.trainer", "rlhf.collect", "rlhf.rounds_report",
     "rlhf.evaluation", "rlhf.labeling", "rlhf.baselines"),
    ("rlhf.recipe", "rlhf.plan", "rlhf.cli", "rlhf.__main__"),
]
# Stage modules (or packages of them): none imports another group's code.
STAGES = ("rlhf.sft", "rlhf.reward_model", "rlhf.dpo", "rlhf.ppo.trainer", "rlhf.baselines", "rlhf.collect",
          "rlhf.rounds_report")
# Pairs of groups that must not import each other in either direction.
APART = [("rlhf.evaluation", "rlhf.ppo.trainer")]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(name: str, known: set[str]) -> str | None:
    """The longest known module that ``name`` is or lies inside (``rlhf.a.b.func`` -> ``rlhf.a.b``)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports, anywhere in its source."""
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from rlhf import data` imports rlhf.data; `from rlhf.x import f` imports rlhf.x.
            targets = [f"{module}.{alias.name}" for alias in node.names] + [module]
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
              and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            targets = [node.args[0].value]
        else:
            continue
        for target in targets:
            if target == "rlhf" or target.startswith("rlhf."):
                resolved = _resolve(target, known)
                if resolved and resolved != name:
                    found.add(resolved)
    # A module's own enclosing packages are imported before it in any case (a
    # package __init__ that imports its submodules lazily is not a cycle), and
    # the bare package `rlhf` (its __init__ holds only the version) is no layer.
    return {m for m in found if not name.startswith(m + ".") and m != "rlhf"}


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def _group(module: str, groups) -> str | None:
    """The longest of ``groups`` that is ``module`` or a package above it."""
    matches = [g for g in groups if module == g or module.startswith(g + ".")]
    return max(matches, key=len) if matches else None


def layer_of(module: str) -> int | None:
    best = _group(module, [g for layer in LAYERS for g in layer])
    return next(i for i, layer in enumerate(LAYERS) if best in layer) if best else None


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(g):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def violations(g: dict[str, set[str]]) -> list[str]:
    """Every edge that breaks the layering rules, as readable lines."""
    bad = []
    for src, targets in sorted(g.items()):
        src_layer = layer_of(src)
        for dst in sorted(targets):
            dst_layer = layer_of(dst)
            if src_layer is not None and dst_layer is not None and dst_layer > src_layer:
                bad.append(f"{src} (layer {src_layer}) imports {dst} (layer {dst_layer})")
                continue
            s_stage, d_stage = _group(src, STAGES), _group(dst, STAGES)
            if s_stage and d_stage and s_stage != d_stage:
                bad.append(f"stage {src} imports stage {dst}")
                continue
            for a, b in APART:
                if (_group(src, (a,)) and _group(dst, (b,))) or (_group(src, (b,)) and _group(dst, (a,))):
                    bad.append(f"{src} imports {dst} ({a} and {b} must not import each other)")
    return bad


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in modules() if m != "rlhf" and layer_of(m) is None)
    assert not unplaced, f"modules with no layer in tests/test_import_graph.py: {unplaced}"


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layers():
    bad = violations(graph())
    assert not bad, "layering violations:\n  " + "\n  ".join(bad)


def test_the_parser_sees_local_and_relative_imports(tmp_path):
    pkg = tmp_path / "rlhf"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from rlhf import b\n")
    (pkg / "b.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import c\nfrom ..a import f\n")
    (pkg / "sub" / "c.py").write_text("import rlhf.b as b\nimportlib.import_module('rlhf.a')\n")
    known = {"rlhf", "rlhf.a", "rlhf.b", "rlhf.sub", "rlhf.sub.c"}
    assert imports_of("rlhf.a", pkg / "a.py", known) == {"rlhf.b"}
    assert imports_of("rlhf.sub", pkg / "sub" / "__init__.py", known) == {"rlhf.sub.c", "rlhf.a"}
    assert imports_of("rlhf.sub.c", pkg / "sub" / "c.py", known) == {"rlhf.a", "rlhf.b"}
    assert layer_of("rlhf.ppo.trainer") == 3 and layer_of("rlhf.ppo") == 2 and layer_of("rlhf.labeling.cli") == 3
    assert find_cycle({"x": {"y"}, "y": {"z"}, "z": {"x"}}) == ["x", "y", "z", "x"]


if __name__ == "__main__":
    g = graph()
    for mod in sorted(g):
        print(f"{mod} -> {', '.join(sorted(g[mod])) or '-'}")
    cycle = find_cycle(g)
    print("\ncycle:", " -> ".join(cycle) if cycle else "none")
    bad = violations(g)
    print("layering violations:" + ("".join(f"\n  {b}" for b in bad) if bad else " none"))
    sys.exit(1 if cycle or bad else 0)
