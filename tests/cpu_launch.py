"""Shared tail of the CPU launchers (fsdp_cpu.py, deepspeed_cpu.py): run the rlhf CLI.

RLHF_TEST_CRASH_AFTER_SAVE=1 makes every rank die right after PPO's first
resumable checkpoint is written (a simulated crash, for the resume tests).
"""

import os
import sys


def main() -> int:
    from rlhf.cli import main as cli

    if os.environ.get("RLHF_TEST_CRASH_AFTER_SAVE"):
        from rlhf.ppo import trainer

        real_save = trainer._save_state

        def crash_after_save(run, step):
            real_save(run, step)
            sys.exit(3)

        trainer._save_state = crash_after_save
    return cli()
