"""`python tests/fsdp_cpu.py ARGS` = `python -m rlhf ARGS`, with Accelerate's FSDP2 on CPU (tests only).

Accelerate only turns FSDP on for accelerator devices: on CPU processes it
picks plain DDP ("MULTI_CPU") whatever the config says. FSDP2 itself runs on
CPU over gloo, so under torchrun this wrapper switches every Accelerator to
FSDP2 with the settings of recipes/accelerate/fsdp.yaml. That lets the tests
drive the sharded code paths (weights gathered once for generation, sharded
reference and reward models, checkpoints gathered from shards) on the CI
machine, which has no GPU.

RLHF_TEST_CRASH_AFTER_SAVE=1: see cpu_launch.py.
"""

import sys

from accelerate import state
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = state.AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
            state_dict_type="FULL_STATE_DICT", cpu_ram_efficient_loading=True)


state.AcceleratorState.__init__ = _fsdp_on_cpu

if __name__ == "__main__":
    from cpu_launch import main

    sys.exit(main())
