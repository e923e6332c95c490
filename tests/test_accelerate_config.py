"""The default multi-GPU launch config at the repo root, checked the way
`accelerate launch` reads it (no GPU needed)."""

from __future__ import annotations

import yaml
from conftest import REPO

CONFIG = REPO / "accelerate_config.yaml"
LAUNCH = "accelerate launch --config_file accelerate_config.yaml -m rlhf run RECIPE"


def test_parses_with_the_expected_settings():
    cfg = yaml.safe_load(CONFIG.read_text())
    assert cfg["distributed_type"] == "MULTI_GPU"
    assert cfg["mixed_precision"] == "bf16"
    assert cfg["num_machines"] == 1 and cfg["machine_rank"] == 0
    assert cfg["num_processes"] == 8
    assert cfg["main_training_function"] == "main"
    assert cfg["use_cpu"] is False


def test_comments_say_how_to_launch_and_change_it():
    text = CONFIG.read_text()
    assert LAUNCH in text
    assert "set to your GPU count" in text
    for key in ("num_machines", "machine_rank", "main_process_ip", "recipes/accelerate/"):
        assert key in text


def test_accelerate_accepts_it():
    # accelerate rejects unknown keys; _validate_launch_command merges the file
    # into the launch arguments exactly as `accelerate launch` does.
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    loaded = load_config_from_file(str(CONFIG))
    assert loaded.num_processes == 8 and loaded.mixed_precision == "bf16"
    args = launch_command_parser().parse_args(
        ["--config_file", str(CONFIG), "-m", "rlhf", "run", "recipes/quickstart.yaml"])
    args, _, _ = _validate_launch_command(args)
    assert args.multi_gpu and args.num_processes == 8 and args.mixed_precision == "bf16"
    assert args.module and args.training_script == "rlhf"
    assert args.training_script_args == ["run", "recipes/quickstart.yaml"]
