"""`python tests/deepspeed_cpu.py ARGS` = `python -m rlhf ARGS`, with DeepSpeed ZeRO-3 on CPU (tests only).

Like tests/fsdp_cpu.py for FSDP2: Accelerate only turns DeepSpeed on for
accelerator devices (on CPU processes it picks plain DDP, "MULTI_CPU"), but
ZeRO-3 itself runs on CPU over gloo (DeepSpeed's CPU accelerator, without
oneCCL or IPEX). Under torchrun this wrapper switches every Accelerator to
ZeRO-3 with the settings of recipes/accelerate/deepspeed_zero3.yaml (fp32:
CPUs have no bf16 matmul worth testing), so the tests drive the ZeRO-3 code
paths (TRL's prepare_deepspeed for frozen models, GatheredParameters for
generation, the final checkpoint gathered from partitions) without a GPU.

Needs deepspeed importable (CI: `pip install deepspeed` in a separate target,
see tests/test_zero3_ppo.py) and a C++ compiler: DeepSpeed JIT-builds its
shared-memory collective op on first use.

RLHF_TEST_ZERO_STAGE=2 runs ZeRO-2 instead (recipes/accelerate/deepspeed_zero2.yaml).
RLHF_TEST_CRASH_AFTER_SAVE=1: see cpu_launch.py.
"""

import os
import sys

# The same settings `accelerate launch --config_file recipes/accelerate/deepspeed_zero3.yaml`
# passes to the processes; Accelerator() builds its DeepSpeedPlugin from them.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"] = os.environ.get("RLHF_TEST_ZERO_STAGE", "3")  # 2: deepspeed_zero2.yaml
os.environ["ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"] = "none"
os.environ["ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"] = "none"
os.environ["ACCELERATE_DEEPSPEED_ZERO3_INIT"] = str(os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3").lower()
os.environ["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] = "true"
os.environ["ACCELERATE_GRADIENT_CLIPPING"] = "1.0"

from accelerate import state
from accelerate.utils import DistributedType

_init = state.AcceleratorState.__init__


def _zero3_on_cpu(self, *args, deepspeed_plugin=None, **kwargs):
    _init(self, *args, deepspeed_plugin=deepspeed_plugin, **kwargs)
    # What AcceleratorState.__init__ does for DeepSpeed on an accelerator
    # (it skips it when cpu=True, which rlhf.recipe sets on CPU machines).
    if self.distributed_type == DistributedType.MULTI_CPU and deepspeed_plugin is not None:
        self.distributed_type = DistributedType.DEEPSPEED
        deepspeed_plugin.set_mixed_precision(self._mixed_precision)
        deepspeed_plugin.select(_from_accelerator_state=True)
        self.deepspeed_plugins = deepspeed_plugin
        self._mixed_precision = "no"  # DeepSpeed owns mixed precision
        # Every later AcceleratorState() copies PartialState's fields over its
        # own (DeepSpeed and TRL code call it): keep both on DEEPSPEED.
        state.PartialState._shared_state["distributed_type"] = self.distributed_type


state.AcceleratorState.__init__ = _zero3_on_cpu

if __name__ == "__main__":
    from cpu_launch import main

    sys.exit(main())
