"""Recipes: loading, ${...} interpolation, key=value overrides, validation of every
recipe in recipes/, the resolved recipe in the run dir, and `rlhf schema`."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO, run_in_process, tiny_recipe_dict, write_recipe
from helpers.offline import swap_offline

from rlhf import recipe as recipe_mod
from rlhf.errors import BadInput
from rlhf.models import ModelConfig

RECIPES = sorted({*REPO.glob("recipes/**/*.yaml"), *REPO.glob("recipes/**/*.yml")})
# Accelerate launch configs (DeepSpeed, FSDP) live beside the recipes but are
# not rlhf recipes: they are checked as accelerate configs instead.
ACCELERATE_DIR = REPO / "recipes" / "accelerate"


def test_loads_stages_in_order_with_typed_configs(tiny_recipe, tmp_path):
    r = recipe_mod.load_recipe(tiny_recipe)
    assert [(s.name, s.type) for s in r.stages] == [("sft", "sft"), ("reward", "reward")]
    assert r.run.output_dir == str(tmp_path / "out") and r.run.seed == 7 and r.run.report_to == []
    sft = r.stages[0].config
    assert sft.model == "tiny" and sft.max_length == 64 and sft.train.max_steps == 4
    assert sft.train.grad_accum == 1  # unset keys get their declared defaults
    assert r.stage_dir("reward") == tmp_path / "out" / "reward"


def test_output_dir_interpolation(tiny_recipe, tmp_path):
    r = recipe_mod.load_recipe(tiny_recipe)
    assert r.stages[1].config.model == f"{tmp_path}/out/sft/final"
    assert r.resolved["stages"]["reward"]["model"] == f"{tmp_path}/out/sft/final"


def test_stage_type_defaults_to_stage_name(make_recipe):
    def edit(cfg):
        del cfg["stages"]["sft"]["type"]

    r = recipe_mod.load_recipe(make_recipe(edit, stages=("sft",)))
    assert r.stages[0].type == "sft"


def test_overrides(tiny_recipe, tmp_path):
    other = tmp_path / "elsewhere"
    r = recipe_mod.load_recipe(tiny_recipe, [
        "stages.sft.train.max_steps=3",
        f"output_dir={other}",
        "stages.sft.train.learning_rate=1e-4",  # YAML 1.1 would read this as a string
        "report_to=[tensorboard]",
        "stages.reward.data.columns={prompt: question}",
        "stages.sft.data.max_samples=null",
    ])
    sft, reward = r.stages[0].config, r.stages[1].config
    assert sft.train.max_steps == 3
    assert sft.train.learning_rate == pytest.approx(1e-4)
    assert r.run.output_dir == str(other) and r.run.report_to == ["tensorboard"]
    assert reward.model == f"{other}/sft/final"  # interpolation sees the overridden output_dir
    assert reward.data.columns == {"prompt": "question"}
    assert sft.data.max_samples is None


def test_override_wrong_type_names_override(tiny_recipe):
    with pytest.raises(BadInput) as e:
        recipe_mod.load_recipe(tiny_recipe, ["stages.sft.train.max_steps=three"])
    assert str(e.value).startswith("override stages.sft.train.max_steps: key 'stages.sft.train.max_steps': "
                                   "expected an integer")


def test_override_creating_unknown_key_is_rejected(tiny_recipe):
    with pytest.raises(BadInput) as e:
        recipe_mod.load_recipe(tiny_recipe, ["stages.sft.train.max_stepz=3"])
    msg = str(e.value)
    assert msg.startswith("override stages.sft.train.max_stepz:") and "unknown key" in msg
    # A mistyped stage name creates a new stage: the override is to blame, not the file.
    with pytest.raises(BadInput) as e:
        recipe_mod.load_recipe(tiny_recipe, ["stages.sfx.train.max_steps=3"])
    assert str(e.value) == "override stages.sfx.train.max_steps: no stage named 'sfx' (recipe has: sft, reward)"


@pytest.mark.parametrize("item", ["stages.sft.train.max_steps", "=3", "stages..sft=3", ".x=1", "x.=1"])
def test_bad_override_syntax(tiny_recipe, item):
    with pytest.raises(BadInput, match=r"expected key\.path=value"):
        recipe_mod.load_recipe(tiny_recipe, [item])


def test_bad_interpolation_names_key_and_line(make_recipe):
    def edit(cfg):
        cfg["stages"]["reward"]["model"] = "${outptu_dir}/sft/final"

    path = make_recipe(edit)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "outptu_dir" in text)
    with pytest.raises(BadInput) as e:
        recipe_mod.load_recipe(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:{line}: interpolation failed at 'stages.reward.model'")
    assert "outptu_dir" in msg


@pytest.mark.parametrize("text, expected", [
    ("- a\n- b\n", "expected a mapping with 'stages'"),
    ("output_dir: x\n", "key 'stages': expected a non-empty mapping"),
    ("stages: {}\n", "key 'stages': expected a non-empty mapping"),
    ("stages:\n  sft: 3\n", "key 'stages.sft': expected a mapping"),
    ("stages:\n  s1: {type: dpoo}\n", "key 'stages.s1.type': unknown stage type 'dpoo'"),
    ("stages:\n  sft: {type: sft}\nseed: x\n", "key 'seed': expected an integer"),
    ("stages:\n  sft: {type: sft}\nreport_to: [mlflow]\n", "key 'report_to.0': expected one of"),
    ("stages:\n  sft:\n    type: sft\n    model: tiny\n  bad: [\n", "malformed YAML"),
])
def test_malformed_recipes(tmp_path, text, expected):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(BadInput) as e:
        recipe_mod.load_recipe(path)
    assert str(e.value).startswith(str(path)) and expected in str(e.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(BadInput, match="recipe file not found"):
        recipe_mod.load_recipe(tmp_path / "nope.yaml")


# ------------------------------------------------- every recipe in recipes/


def test_there_are_recipes():
    assert REPO / "recipes" / "quickstart.yaml" in RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_recipe_loads_and_validates(path, tmp_path, monkeypatch):
    if path.is_relative_to(ACCELERATE_DIR):
        from accelerate.commands.config.config_args import load_config_from_file

        assert "distributed_type" in yaml.safe_load(path.read_text()), f"{path}: not an accelerate config"
        load_config_from_file(str(path))  # what `accelerate launch --config_file` does; unknown keys fail
        return
    monkeypatch.chdir(REPO)  # recipes name data relative to the repo root
    text = path.read_text()
    assert text.lstrip().startswith("#"), f"{path}: start with a comment block: what it does, how to run it"
    r = recipe_mod.load_recipe(path, [f"output_dir={tmp_path / 'out'}"])
    for stage in r.stages:
        swap_offline(stage.config, tmp_path / "out")
    recipe_mod.validate(r)


def test_swap_offline_replaces_hub_models_only(tiny_recipe, tmp_path):
    r = recipe_mod.load_recipe(tiny_recipe, ["stages.sft.model.name=HuggingFaceTB/SmolLM2-135M",
                                             "stages.sft.model.lora.r=4"])
    for stage in r.stages:
        swap_offline(stage.config, tmp_path / "out")
    assert r.stages[0].config.model.name == "tiny" and r.stages[0].config.model.lora.r == 4
    assert r.stages[1].config.model == f"{tmp_path}/out/sft/final"  # an earlier stage's output stays
    recipe_mod.validate(r)


# ------------------------------------------------------- run dir, schema


def test_resolved_recipe_saved_in_run_dir(tmp_path):
    """`rlhf run` writes <out>/recipe.yaml: interpolated, overridden, defaults filled in."""
    from rlhf.models import load_tokenizer

    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(out))
    # Both stages already finished: run validates, saves the recipe and skips them.
    load_tokenizer(ModelConfig("tiny")).save_pretrained(out / "sft" / "final")
    (out / "reward" / "final").mkdir(parents=True)
    assert run_in_process("run", recipe, "stages.reward.train.max_steps=2") == 0
    text = (out / "recipe.yaml").read_text()
    assert text.startswith(f"# resolved from {recipe}")
    saved = yaml.safe_load(text)
    assert saved["output_dir"] == str(out)
    assert saved["stages"]["reward"]["model"] == str(out / "sft" / "final")
    assert saved["stages"]["reward"]["train"]["max_steps"] == 2
    assert saved["stages"]["sft"]["train"]["grad_accum"] == 1
    assert saved["stages"]["sft"]["type"] == "sft"
    # ... and it is itself a valid recipe that resolves to the same thing.
    again = recipe_mod.load_recipe(out / "recipe.yaml")
    assert again.resolved == saved


@pytest.mark.parametrize("stage_type, keys", [
    ("sft", ["model:", "data:", "  path:", "  columns:", "train:", "  max_steps:", "  learning_rate:",
             "max_length:", "completion_only_loss:"]),
    ("reward", ["model:", "data:", "  on_invalid:", "train:", "max_length:", "use_margin:"]),
])
def test_schema_prints_documented_keys(capsys, stage_type, keys):
    assert run_in_process("schema", stage_type) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for key in keys:
        line = next((ln for ln in lines if ln.startswith(key)), None)
        assert line is not None, f"{key!r} missing from `rlhf schema {stage_type}`"
        assert "#" in line and line.split("#", 1)[1].strip(), f"{key!r} has no help text"
    # Every key is documented: a value line shows its type, a section its help.
    for ln in filter(str.strip, lines):
        key_part, _, doc = ln.partition("#")
        assert doc.strip(), f"undocumented: {ln!r}"
        assert key_part.rstrip().endswith(":") or doc.startswith(" ("), f"no type: {ln!r}"


def test_schema_unknown_stage_type(capsys):
    assert run_in_process("schema", "kto") == 2
    assert capsys.readouterr().err.startswith("error: unknown stage type 'kto'")


def test_validate_command(tiny_recipe, capsys):
    assert run_in_process("validate", tiny_recipe) == 0
    assert "OK" in capsys.readouterr().out
    assert not (tiny_recipe.parent / "out").exists()  # validation writes nothing
