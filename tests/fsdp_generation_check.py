"""Run under `torchrun --nproc_per_node 2`: FSDP2 on CPU (see fsdp_cpu.py), a
tiny policy sharded as PPO shards it, generation counted.

Writes ``<out_dir>/rank<r>.json`` (out_dir = argv[1]): the all-gathers FSDP2 issued while a sharded
model generated, plainly (a reference model prepared like PPO's) and inside
``rlhf.sharding.full_weights`` (that reference, and PPO's policy+value
module), and whether each produced the same tokens as the unsharded model.
"""

import contextlib
import json
import sys
from pathlib import Path

import fsdp_cpu  # noqa: F401  (switches Accelerate to FSDP2 on CPU)
import torch
import torch.distributed as dist
from accelerate import Accelerator

from rlhf.models import as_model_config, load_causal_lm, load_tokenizer
from rlhf.ppo.policy import PolicyAndValue
from rlhf.sharding import full_weights, prepare_frozen

NEW_TOKENS = 12

accelerator = Accelerator(cpu=True)
cfg = as_model_config("tiny")
tok = load_tokenizer(cfg)
plain = load_causal_lm(cfg, tok, seed=0).eval()
reference = prepare_frozen(load_causal_lm(cfg, tok, seed=0), accelerator)
model = PolicyAndValue(load_causal_lm(cfg, tok, seed=0), None)
optimizer = torch.optim.AdamW(model.parameters())
model, optimizer = accelerator.prepare(model, optimizer)
model.eval()

gathers = 0
real_all_gather = dist.all_gather_single


def counting(*args, **kwargs):  # FSDP2's all-gather of a unit's weights
    global gathers
    gathers += 1
    return real_all_gather(*args, **kwargs)


dist.all_gather_single = counting
ids = torch.tensor([[5, 6, 7, 8]]) + accelerator.process_index
kwargs = dict(input_ids=ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
              pad_token_id=tok.pad_token_id)
results = {"rank": accelerator.process_index, "world": accelerator.num_processes,
           "units": sum(1 for m in model.modules() if type(m).__name__.startswith("FSDP"))}


def generate_counted(name, module, context=None):
    """Generate with ``module`` (inside ``context``); record gathers and tokens."""
    global gathers
    gathers = 0
    with context or contextlib.nullcontext():
        entry = gathers
        out = module.generate(**kwargs)
    results[name] = {"gathers_at_entry": entry, "gathers_while_generating": gathers - entry,
                     "same_tokens": torch.equal(out, expected)}


with torch.no_grad():
    expected = plain.generate(**kwargs)
    generate_counted("reference_plain", reference)
    generate_counted("reference_full_weights", reference, full_weights(reference, accelerator))
    model(ids, torch.ones_like(ids), 2, 1.0)  # the training loop's forwards come first in PPO too
    policy = accelerator.unwrap_model(model).policy
    generate_counted("policy_full_weights", policy, full_weights(model, accelerator))
Path(sys.argv[1], f"rank{accelerator.process_index}.json").write_text(json.dumps(results))
accelerator.wait_for_everyone()
accelerator.state.destroy_process_group()  # an exit with gloo threads running can abort
