#!/usr/bin/env python
"""PPO throughput, overhead and memory benchmark (issue 3, item 8).

    .venv/bin/python benchmarks/ppo_throughput.py            # full run, < 10 min on 2 CPU cores
    .venv/bin/python benchmarks/ppo_throughput.py --quick    # tiny model only, < 2 min (smoke test)

What it measures, on random-initialised presets (``tiny`` ~0.7M and
``mini-30m`` ~26M parameters; nothing is downloaded). The policy is a saved
random causal LM and the reward a saved reward-model-shaped checkpoint
(``load_sequence_classifier``), so the trainer's real loading, scoring and
value-model paths run; prompts are the quickstart's. The trainer runs through
the recipe runner, unmodified; the benchmark only wraps its phase functions
to time them (wall clock and process CPU time).

1. **Our PPO step, phase by phase**: generation, policy + reference + value
   forwards, scoring, optimisation; samples/s, response tokens/s, peak RSS.
   Full fine-tuning, frozen reference copy, value model initialised from the
   reward model (the defaults). The trainer's own ``perf/*`` (wall seconds)
   are in the JSON too.
2. **Overhead ratio** = one PPO step (the whole loop body) / the sum of the
   same step's unavoidable compute measured alone: bare ``model.generate``
   for the same prompts and number of new tokens (``min_new_tokens`` = the
   rollout's width, in the bare run only), one no-grad forward per model
   (policy, reference, value, reward) on the same sequences, and the update's
   forward/backward passes for the same micro-batches and epochs plus one
   AdamW step per minibatch; logits only where they are used. Each bare
   repetition runs right after the PPO step it is compared with, in the same
   process, and the ratio is the median of the per-step ratios. The headline
   ratio uses CPU seconds: with one intra-op thread they count this
   process's own work and move far less than wall seconds when other
   processes compete for the cores (the wall-clock ratio is printed too).
   Target: <= 1.15.
3. **Memory**: peak RSS of PPO with LoRA and the shared base (reference =
   adapters disabled, ``value_model: policy_head``, the reward model loaded)
   against the SFT stage with LoRA on the same model, micro-batch and
   sequence length. The SFT stage runs with TRL's default gradient
   checkpointing, so PPO is measured with ``gradient_checkpointing: true``
   for the comparison and, beside it, with its own default (off).
   Target: <= 1.5x.
4. **TRL**: samples/s of ``trl.RLOOTrainer`` on the tiny model at the same
   batch size (32 completions per rollout: 16 prompts x 2), response length
   cap (32), reward-model checkpoint and optimiser steps per rollout
   (4 iterations x 2 batches of 16), next to ours (value model, and value
   head on the policy, which like RLOO trains one network).

Every configuration runs in its own subprocess, so peak RSS (``ru_maxrss``) is
per configuration. The machine's cores are shared with other work: each
process uses ``--threads`` intra-op threads (default 1; with 2 OpenMP threads
on 2 oversubscribed cores we saw 10x slowdowns), and the load average is
printed with the results. Absolute times move with that load; the ratios are
measured within one run and are the figures to compare.

Results: a table on stdout and JSON in ``benchmarks/results/ppo_throughput.json``
(``--quick``: ``ppo_throughput_quick.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "data" / "quickstart" / "prompts_train.jsonl"
SFT_DATA = ROOT / "data" / "quickstart" / "sft_train.jsonl"
RESULTS = ROOT / "benchmarks" / "results"

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}

# One PPO step's shape, the same for every model and for TRL: 32 prompts x 32
# new tokens; 4 epochs x 2 minibatches of 16, one micro-batch each (8 optimiser
# steps per rollout).
WORKLOAD = dict(rollout_batch_size=32, max_new_tokens=32, ppo_epochs=4, num_minibatches=2, micro_batch_size=16,
                temperature=1.0)
LORA = {"r": 8, "alpha": 16}


# ---------------------------------------------------------------- worker-side helpers


def _peak_rss_mb() -> float:
    """High-water mark of this process's resident memory (Linux: KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _import_stack() -> float:
    """Import everything any configuration uses, then return RSS: the base that
    every configuration pays before it loads a model (compared across configs)."""
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    import rlhf.ppo.trainer  # noqa: F401
    import rlhf.sft  # noqa: F401

    return _rss_mb()


def _write_recipe(path: Path, output_dir: Path, stages: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"output_dir": str(output_dir), "seed": 0, "stages": stages}, sort_keys=False))
    return path


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


class Sections:
    """Wall-clock and process CPU seconds of named sections. With one
    intra-op thread, CPU seconds are this process's own work and barely move
    when other processes compete for the cores; wall seconds do."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c

    def totals(self) -> dict:
        return {"wall": {**self.wall, "total": sum(self.wall.values())},
                "cpu": {**self.cpu, "total": sum(self.cpu.values())}}


class BareCompute:
    """The unavoidable compute of one PPO step, run alone on the batch the
    trainer just produced. Its own model copies are loaded from the same
    checkpoints (weights do not change the cost; the trainer's must not be
    touched by an extra optimiser step)."""

    def __init__(self, policy_dir: str, reward_dir: str, lora: bool, value_head: bool, tok):
        import torch

        from rlhf.models import LoraSpec, ModelConfig, load_causal_lm, load_sequence_classifier, peft_config
        from rlhf.ppo.policy import ScalarHeadModel

        self.tok, self.lora, self.value_head = tok, lora, value_head
        self.policy = load_causal_lm(ModelConfig(name=policy_dir), tok)
        if lora:
            from peft import get_peft_model

            self.policy = get_peft_model(self.policy, peft_config(LoraSpec(**LORA), "CAUSAL_LM", self.policy))
            self.reference = None
        else:
            self.reference = load_causal_lm(ModelConfig(name=policy_dir), tok).eval().requires_grad_(False)
        if value_head:
            hidden = self.policy.config.get_text_config().hidden_size
            self.value = torch.nn.Linear(hidden, 1)
        else:
            self.value = ScalarHeadModel(load_sequence_classifier(ModelConfig(name=reward_dir), tok))
        self.reward = load_sequence_classifier(ModelConfig(name=reward_dir), tok).eval().requires_grad_(False)
        params = [p for m in (self.policy, self.value) for p in m.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-7, eps=1e-5, weight_decay=0.0)  # the PPO defaults

    def _policy_forward(self, ids, attn, pos, r: int, grad: bool):
        """Log-probs of the r response tokens (fp32, as PPO needs) and the values.
        Logits only where they are used: the last r+1 positions."""
        import torch

        from rlhf.ppo.core import logprobs_from_logits

        with torch.set_grad_enabled(grad):
            out = self.policy(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False,
                              logits_to_keep=r + 1, output_hidden_states=self.value_head)
            lp = logprobs_from_logits(out.logits[:, :-1], ids[:, -r:], WORKLOAD["temperature"])
            if self.value_head:
                values = self.value(out.hidden_states[-1][:, -r - 1:-1]).squeeze(-1)
            else:
                values = None
        return lp, values

    def _value_forward(self, ids, attn, pos, r: int):
        return self.value(ids, attn, pos)[:, -r - 1:-1]

    def run(self, batch, epochs: int, num_minibatches: int, micro: int) -> dict[str, dict[str, float]]:
        import torch

        from rlhf.ppo.core import logprobs_from_logits
        from rlhf.ppo.policy import position_ids_from

        query, query_mask, response, response_mask = batch
        ids = torch.cat([query, response], 1)
        attn = torch.cat([query_mask, response_mask.long()], 1)
        pos = position_ids_from(attn)
        b, r = response.shape
        mask = response_mask.float()
        t = Sections()
        with torch.no_grad():
            with t("generate"):
                # Exactly r decode steps, like the rollout that produced this
                # batch (min_new_tokens here only: the trainer never forces a length).
                self.policy.generate(input_ids=query, attention_mask=query_mask, do_sample=True,
                                     temperature=WORKLOAD["temperature"], top_k=0, top_p=1.0, max_new_tokens=r,
                                     min_new_tokens=r, pad_token_id=self.tok.pad_token_id,
                                     eos_token_id=self.tok.eos_token_id, use_cache=True)
            with t("forward_policy"):
                self._policy_forward(ids, attn, pos, r, grad=False)
            with t("forward_reference"):
                if self.reference is not None:
                    out = self.reference(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False,
                                         logits_to_keep=r + 1)
                else:
                    with self.policy.disable_adapter():
                        out = self.policy(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False,
                                          logits_to_keep=r + 1)
                logprobs_from_logits(out.logits[:, :-1], response, WORKLOAD["temperature"])
            with t("forward_value"):
                if not self.value_head:
                    self._value_forward(ids, attn, pos, r)
            with t("forward_reward"):
                self.reward(input_ids=ids, attention_mask=attn, position_ids=pos)

        # The update: the same micro-batches and epochs, forward + backward of
        # policy and value, one AdamW step per minibatch.
        with t("update"):
            mini = b // num_minibatches
            for _ in range(epochs):
                order = torch.randperm(b)
                for start in range(0, b, mini):
                    mb = order[start:start + mini]
                    self.optimizer.zero_grad(set_to_none=True)
                    for ms in range(0, len(mb), micro):
                        idx = mb[ms:ms + micro]
                        lp, values = self._policy_forward(ids[idx], attn[idx], pos[idx], r, grad=True)
                        if values is None:
                            values = self._value_forward(ids[idx], attn[idx], pos[idx], r)
                        m = mask[idx]
                        loss = -(lp * m).sum() / m.sum() + ((values * m) ** 2).sum() / m.sum()
                        loss.backward()
                    self.optimizer.step()
        return t.totals()

    def warm_up(self, batch) -> None:
        """First calls allocate and pick kernels: do that on a slice, untimed."""
        q, qm, r, rm = batch
        self.run((q[:2], qm[:2], r[:2, :2], rm[:2, :2]), epochs=1, num_minibatches=1, micro=2)


def worker_ppo(spec: dict) -> dict:
    """Our trainer through the recipe runner; optionally paired bare compute."""
    import torch

    base_rss = _import_stack()
    from rlhf import recipe as recipe_mod
    from rlhf.ppo import trainer as ppo_trainer

    torch.set_num_threads(spec["threads"])
    work = Path(spec["work_dir"])
    w = WORKLOAD
    model = {"name": spec["policy"], **({"lora": dict(LORA)} if spec["lora"] else {}),
             "gradient_checkpointing": spec.get("gradient_checkpointing", False)}
    stage = {
        "type": "ppo", "model": model, "reward": spec["reward"], "value_model": spec["value_model"],
        "data": {"path": str(PROMPTS)}, "steps": spec["warmup_steps"] + spec["steps"],
        "rollout_batch_size": w["rollout_batch_size"], "num_minibatches": w["num_minibatches"],
        "micro_batch_size": w["micro_batch_size"], "ppo_epochs": w["ppo_epochs"],
        "learning_rate": 1e-5, "sample_every": 10_000,
        "generation": {"max_new_tokens": w["max_new_tokens"], "temperature": w["temperature"]},
        # fp32, as the bare compute and TRL's RLOO here (benchmarks/classic_ppo.py
        # measures auto, bf16 on CPUs with bf16 instructions).
        "precision": "fp32",
    }
    path = _write_recipe(work / "recipe.yaml", work / "run", {"ppo": stage})

    # Instrumentation, no changes to rlhf: time the trainer's phases on both
    # clocks, remember each rollout batch, and after each step's metrics are
    # logged, run the bare compute on that batch.
    captured: dict = {}
    sections = Sections()
    real_generate = ppo_trainer.generate

    def timed_generate(policy, tok, prompt_texts, gen, device, **kw):
        with sections("generation"):  # sampling and decoding the responses
            out = real_generate(policy, tok, prompt_texts, gen, device, **kw)
        captured["batch"] = (out.query_ids, out.query_mask, out.response_ids, out.response_mask)
        captured["tok"] = tok
        return out

    import rlhf.rewards

    real_score_ids = rlhf.rewards.score_ids

    def recording_score_ids(model, sequences, *a, **kw):
        # The reward model scores re-tokenised text: note how wide that is.
        captured["reward_width"] = max(len(x) for x in sequences)
        return real_score_ids(model, sequences, *a, **kw)

    rlhf.rewards.score_ids = recording_score_ids

    class TimedReward(ppo_trainer.CombinedReward):
        def __call__(self, prompts, responses):
            with sections("scoring"):
                return super().__call__(prompts, responses)

    state = {"last": None, "ours": [], "bare": [], "peak_step1": None, "bare_model": None}

    def after_step(step: int) -> None:
        now = (time.perf_counter(), time.process_time())
        if state["peak_step1"] is None:
            state["peak_step1"] = _peak_rss_mb()  # before any copy for the bare compute exists
        if state["last"] is not None and step > spec["warmup_steps"]:
            # Everything since the previous step's bookkeeping ended: the whole loop body.
            ours = sections.totals()
            for i, clock in enumerate(("wall", "cpu")):
                ours[clock]["total"] = now[i] - state["last"][i]
                ours[clock]["update_and_rest"] = ours[clock]["total"] - sum(
                    ours[clock].get(k, 0.0) for k in ("generation", "forwards", "scoring"))
            state["ours"].append(ours)
        if spec["bare"]:
            if state["bare_model"] is None:
                state["bare_model"] = BareCompute(spec["policy"], spec["reward"], spec["lora"],
                                                  spec["value_model"] == "policy_head", captured["tok"])
                state["bare_model"].warm_up(captured["batch"])
            if step > spec["warmup_steps"]:
                state["bare"].append(state["bare_model"].run(captured["batch"], w["ppo_epochs"],
                                                             w["num_minibatches"], w["micro_batch_size"]))
        sections.wall.clear(), sections.cpu.clear()
        state["last"] = (time.perf_counter(), time.process_time())

    class TimedLogger(ppo_trainer.MetricsLogger):
        def log(self, metrics, step):
            # The rollout forwards are timed by the trainer itself (wall clock only).
            sections.wall["forwards"] = sections.wall.get("forwards", 0.0) + metrics.get("perf/forward_s", 0.0)
            super().log(metrics, step)
            after_step(step)

    ppo_trainer.generate = timed_generate
    ppo_trainer.CombinedReward, ppo_trainer.MetricsLogger = TimedReward, TimedLogger
    t0 = time.perf_counter()
    recipe_mod.run(recipe_mod.load_recipe(path))
    total_s = time.perf_counter() - t0
    peak_end = _peak_rss_mb()

    rows = [json.loads(x) for x in (work / "run" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in rows if r["step"] > spec["warmup_steps"]]
    query, _, response, _ = captured["batch"]
    med = lambda reps, clock: {k: _median([x[clock][k] for x in reps]) for k in reps[0][clock]}  # noqa: E731
    result = {
        "config": spec["name"], "model": spec["model"], "lora": spec["lora"], "value_model": spec["value_model"],
        "gradient_checkpointing": model["gradient_checkpointing"],
        "measured_steps": len(measured), "run_s": total_s, "base_rss_mb": base_rss,
        "peak_rss_mb": state["peak_step1"] if spec["bare"] else peak_end,
        "peak_rss_step1_mb": state["peak_step1"], "peak_rss_end_mb": peak_end,
        "sequence_length": query.size(1) + response.size(1), "response_width": response.size(1),
        "reward_input_width": captured.get("reward_width"),
        "response_length": _median([r["rollout/response_length"] for r in measured]),
        "eos_rate": _median([r["rollout/eos_rate"] for r in measured]),
        # The trainer's own perf/* (wall seconds), median over measured steps.
        "phases": {k.split("/")[1]: _median([r[k] for r in measured])
                   for k in ("perf/generation_s", "perf/forward_s", "perf/scoring_s", "perf/training_s",
                             "perf/step_s")},
        "ours_wall": med(state["ours"], "wall"), "ours_cpu": med(state["ours"], "cpu"),
        "ours_steps": state["ours"],
    }
    result["step_wall_s"] = result["ours_wall"]["total"]
    result["samples_per_s"] = WORKLOAD["rollout_batch_size"] / result["step_wall_s"]
    result["tokens_per_s"] = result["response_length"] * WORKLOAD["rollout_batch_size"] / result["step_wall_s"]
    if spec["bare"]:
        result["bare_wall"], result["bare_cpu"] = med(state["bare"], "wall"), med(state["bare"], "cpu")
        result["bare_reps"] = state["bare"]
        for clock in ("cpu", "wall"):
            ratios = [o[clock]["total"] / b[clock]["total"] for o, b in zip(state["ours"], state["bare"])]
            result[f"overhead_ratios_{clock}"] = ratios
            result[f"overhead_ratio_{clock}"] = _median(ratios)
    return result


def worker_sft(spec: dict) -> dict:
    """The SFT stage with LoRA on the same model, micro-batch and sequence length."""
    import torch

    base_rss = _import_stack()
    from rlhf import recipe as recipe_mod

    torch.set_num_threads(spec["threads"])
    work = Path(spec["work_dir"])
    # Every example at least max_length tokens (prompt + two joined reviews),
    # truncated to exactly the PPO sequence length.
    rows = [json.loads(x) for x in SFT_DATA.read_text().splitlines()[: 2 * spec["examples"]]]
    data = work / "sft.jsonl"
    with data.open("w") as f:
        for a, b in zip(rows[0::2], rows[1::2]):
            f.write(json.dumps({"prompt": a["prompt"], "completion": a["completion"] + b["completion"] * 2}) + "\n")
    stage = {
        "type": "sft", "model": {"name": spec["policy"], "lora": dict(LORA)}, "data": {"path": str(data)},
        "max_length": spec["max_length"],
        "train": {"max_steps": spec["steps"], "batch_size": WORKLOAD["micro_batch_size"], "learning_rate": 1e-4,
                  "warmup": 0.0, "logging_steps": 1000, "save_steps": 100_000},
    }
    path = _write_recipe(work / "recipe.yaml", work / "run", {"sft": stage})

    # Record what the stage really ran with: batch shapes, gradient checkpointing.
    import trl

    seen: dict = {"shapes": set()}

    class RecordingSFTTrainer(trl.SFTTrainer):
        def training_step(self, model, inputs, *a, **kw):
            seen["shapes"].add(tuple(inputs["input_ids"].shape))
            seen["gradient_checkpointing"] = bool(self.args.gradient_checkpointing)
            return super().training_step(model, inputs, *a, **kw)

    trl.SFTTrainer = RecordingSFTTrainer
    t0 = time.perf_counter()
    recipe_mod.run(recipe_mod.load_recipe(path))
    return {"config": spec["name"], "model": spec["model"], "run_s": time.perf_counter() - t0,
            "steps": spec["steps"], "sequence_length": spec["max_length"], "base_rss_mb": base_rss,
            "batch_shapes": sorted(seen["shapes"]), "gradient_checkpointing": seen.get("gradient_checkpointing"),
            "peak_rss_mb": _peak_rss_mb()}


def worker_rloo(spec: dict) -> dict:
    """TRL's RLOOTrainer at our step's shape: 32 completions per rollout (16
    prompts x 2), 32 new tokens max, 4 iterations x 2 batches of 16 = 8
    optimiser steps per rollout, the same reward-model checkpoint, full
    fine-tuning with a reference copy (beta 0.05)."""
    import torch

    base_rss = _import_stack()
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    from rlhf.data import normalize_prompts, read_records, render_prompt
    from rlhf.models import ModelConfig, load_tokenizer

    torch.set_num_threads(spec["threads"])
    w = WORKLOAD
    tok = load_tokenizer(ModelConfig(name=spec["policy"]))
    tok.padding_side = "left"
    prompts = [render_prompt(tok, p) for p in normalize_prompts(read_records(str(PROMPTS), "train", {}))]
    per_rollout_steps = w["ppo_epochs"] * w["num_minibatches"]
    cycles = spec["warmup_steps"] + spec["steps"]
    args = RLOOConfig(
        output_dir=str(Path(spec["work_dir"]) / "rloo"), use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, per_device_train_batch_size=w["rollout_batch_size"] // w["num_minibatches"],
        steps_per_generation=w["num_minibatches"], num_iterations=w["ppo_epochs"], num_generations=2,
        max_completion_length=w["max_new_tokens"], temperature=w["temperature"], top_k=0, top_p=1.0, beta=0.05,
        learning_rate=1e-5, max_steps=cycles * per_rollout_steps, logging_steps=per_rollout_steps,
        save_strategy="no", report_to="none", disable_tqdm=True, disable_dropout=True, seed=0,
        dataloader_num_workers=0,
    )

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step % per_rollout_steps == 0:
                stamps.append((time.perf_counter(), time.process_time()))

    model = AutoModelForCausalLM.from_pretrained(spec["policy"])  # its path also builds the reference
    trainer = RLOOTrainer(model=model, reward_funcs=spec["reward"], args=args,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok,
                          reward_processing_classes=load_tokenizer(ModelConfig(name=spec["reward"])),
                          callbacks=[Stamp()])
    rollout_s: list[tuple[float, float]] = []
    real = trainer._generate_and_score_completions

    def timed(inputs):
        t0, c0 = time.perf_counter(), time.process_time()
        out = real(inputs)
        rollout_s.append((time.perf_counter() - t0, time.process_time() - c0))
        return out

    trainer._generate_and_score_completions = timed
    t0 = time.perf_counter()
    trainer.train()
    total_s = time.perf_counter() - t0
    # stamps[k] = end of rollout k+1; the first warmup_steps (>= 1) rollouts are warm-up.
    first = spec["warmup_steps"] - 1
    walls = [b[0] - a[0] for a, b in zip(stamps[first:], stamps[first + 1:])]
    cpus = [b[1] - a[1] for a, b in zip(stamps[first:], stamps[first + 1:])]
    lengths = [x["completions/mean_length"] for x in trainer.state.log_history if "completions/mean_length" in x]
    step, rollout = _median(walls), _median([x[0] for x in rollout_s[spec["warmup_steps"]:]])
    return {"config": spec["name"], "model": spec["model"], "run_s": total_s, "measured_steps": len(walls),
            "step_wall_s": step, "step_walls_s": walls, "samples_per_s": w["rollout_batch_size"] / step,
            "step_cpu_s": _median(cpus), "samples_per_cpu_s": w["rollout_batch_size"] / _median(cpus),
            "response_length": _median(lengths[spec["warmup_steps"]:] or lengths),
            "rollout_s": rollout, "update_s": step - rollout,
            "base_rss_mb": base_rss, "peak_rss_mb": _peak_rss_mb()}


WORKERS = {"ppo": worker_ppo, "sft": worker_sft, "rloo": worker_rloo}


# ---------------------------------------------------------------- parent


def _make_checkpoints(root: Path, models: list[str], threads: int) -> dict[str, dict[str, str]]:
    """A saved random causal LM (policy) and a saved reward-model-shaped
    sequence classifier per preset, in a subprocess (keeps this one light)."""
    code = (
        "import sys; from pathlib import Path\n"
        "from rlhf.models import ModelConfig, load_tokenizer, load_causal_lm, load_sequence_classifier, "
        "save_checkpoint\n"
        "root = Path(sys.argv[1])\n"
        "for name in sys.argv[2:]:\n"
        "    tok = load_tokenizer(ModelConfig(name))\n"
        "    save_checkpoint(load_causal_lm(ModelConfig(name), tok, seed=0), tok, root / name / 'policy')\n"
        "    save_checkpoint(load_sequence_classifier(ModelConfig(name), tok, seed=1), tok, root / name / 'reward')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(root), *models], check=False, env=_env(threads),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError("making the benchmark checkpoints failed:\n" + proc.stderr[-3000:])
    return {m: {"policy": str(root / m / "policy"), "reward": str(root / m / "reward")} for m in models}


def _env(threads: int) -> dict:
    n = str(threads)
    return {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _run_worker(kind: str, spec: dict, threads: int, timeout: float) -> dict:
    t0 = time.time()
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, json.dumps(spec)], env=_env(threads),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
        return {"config": spec["name"], "error": "\n".join(tail), "returncode": proc.returncode}
    result = json.loads(lines[-1][len("RESULT "):])
    result["process_s"] = time.time() - t0
    return result


def _loadavg() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def _fmt(x, spec=".2f"):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _table(results: dict, meta: dict) -> str:
    w = WORKLOAD
    out = []
    rule = "-" * 104
    out.append("=" * 104)
    out.append(f"PPO throughput benchmark ({meta['mode']} run)  {meta['date']}")
    out.append(f"machine: {meta['cores']} CPU cores ({meta['cpu']}), shared with colleagues' test runs; "
               f"torch {meta['torch']} CPU, {meta['threads']} intra-op thread(s) per process")
    out.append(f"load average (1/5/15 min): {meta['load_start']} at start, {meta['load_end']} at end; absolute "
               f"times move with it,")
    out.append("ratios are measured in the same run (each PPO step is paired with a bare-compute repetition "
               "right after it, same process)")
    out.append(f"workload: {w['rollout_batch_size']} prompts x {w['max_new_tokens']} new tokens per rollout, "
               f"{w['ppo_epochs']} epochs x {w['num_minibatches']} minibatches x micro-batch "
               f"{w['micro_batch_size']}, temperature {w['temperature']}; full fine-tuning, frozen reference copy, "
               f"value model from the reward model")
    out.append(rule)

    ppo = [results[k] for k in meta["ppo_configs"] if k in results]
    ok = [r for r in ppo if "error" not in r]
    for r in ppo:
        if "error" in r:
            out.append(f"{r['config']}: FAILED\n{r['error']}")
    if ok:
        out.append(f"{'':36}" + "".join(f"{r['model']:^34}" for r in ok))
        out.append(f"{'per PPO step, median seconds':36}" + f"{'wall':>8}{'cpu':>8}{'bare cpu':>10}{'ratio':>8}" * len(ok))
        rows = [
            ("generation", "generation", ("generate",)),
            ("policy + reference + value forwards", "forwards",
             ("forward_policy", "forward_reference", "forward_value")),
            ("scoring (decode + reward model)", "scoring", ("forward_reward",)),
            ("optimisation (+ rewards, GAE, log)", "update_and_rest", ("update",)),
            ("step (whole loop body)", "total", ("total",)),
        ]
        for label, ours_key, bare_keys in rows:
            line = f"{label:36}"
            for r in ok:
                wall, cpu = r["ours_wall"].get(ours_key, 0.0), r["ours_cpu"].get(ours_key, 0.0)
                bare = sum(r["bare_cpu"][k] for k in bare_keys)
                line += f"{wall:>8.3f}{cpu:>8.3f}{bare:>10.3f}{_fmt(cpu / bare if bare else None):>8}"
            out.append(line)
        for label, key in (("OVERHEAD RATIO, CPU time", "overhead_ratio_cpu"),
                           ("overhead ratio, wall clock", "overhead_ratio_wall")):
            out.append(f"{label:36}" + "".join(f"{'':>26}{r[key]:>8.3f}" for r in ok)
                       + ("   target <= 1.15" if key.endswith("cpu") else ""))
        for label, fn in (("samples/s (wall)", lambda r: _fmt(r["samples_per_s"])),
                          ("response tokens/s (wall)", lambda r: _fmt(r["tokens_per_s"], ".0f")),
                          ("mean response length, tokens", lambda r: _fmt(r["response_length"], ".1f")),
                          ("sequence length (prompt + response)", lambda r: str(r["sequence_length"])),
                          ("reward-model input (re-tokenised)", lambda r: str(r.get("reward_input_width"))),
                          ("peak RSS MB (through step 1)", lambda r: _fmt(r["peak_rss_mb"], ".0f")),
                          ("measured steps (after 1 warm-up)", lambda r: str(r["measured_steps"]))):
            out.append(f"{label:36}" + "".join(f"{fn(r):>16}{'':>18}" for r in ok))
        out.append("  ratio = our CPU seconds / bare CPU seconds; overhead ratios are medians of per-step ratios, "
                   "each step paired with")
        out.append("  the bare repetition run right after it. bare = generate (min_new_tokens = the rollout's "
                   "width) + one no-grad")
        out.append("  forward per model + the update's forward/backward passes and AdamW steps, logits only "
                   "where used. Scoring")
        out.append("  decodes, re-tokenises for the reward model and pads to the longest: random models emit byte "
                   "pieces that decode")
        out.append("  to U+FFFD and re-encode longer, hence the wider reward input and most of the scoring ratio")
        out.append(rule)

    mem = meta["memory_pairs"]
    if mem:
        out.append(f"{'memory, LoRA r=8 (peak RSS, MB)':44}{'PPO':>8}{'SFT':>8}{'ratio':>7}"
                   f"{'PPO-base':>10}{'SFT-base':>10}{'ratio':>7}")
        for model, (pk, sk) in mem.items():
            s = results.get(sk, {})
            for key, label in ((pk, "grad ckpt on (as SFT)"), (pk.replace("ppo-lora/", "ppo-lora-nockpt/"),
                                                                "grad ckpt off (PPO default)")):
                p = results.get(key)
                if p is None:
                    continue
                if "error" in p or "error" in s or not s:
                    out.append(f"{model} {label}: FAILED\n{p.get('error', '')}{s.get('error', '')}")
                    continue
                dp, ds = p["peak_rss_mb"] - p["base_rss_mb"], s["peak_rss_mb"] - s["base_rss_mb"]
                out.append(f"{model + ', PPO ' + label:44}{p['peak_rss_mb']:>8.0f}{s['peak_rss_mb']:>8.0f}"
                           f"{p['peak_rss_mb'] / s['peak_rss_mb']:>7.2f}{dp:>10.0f}{ds:>10.0f}{dp / ds:>7.2f}"
                           + ("   target <= 1.5" if "on" in label else ""))
        out.append("  PPO: LoRA policy, reference = adapters disabled, value_model: policy_head, the reward-model "
                   "checkpoint loaded")
        out.append("  (a 2nd model the SFT stage does not have). SFT: the SFT stage with LoRA (TRL default: "
                   "gradient checkpointing on).")
        out.append("  Both: micro-batch 16, every sequence the PPO length; base = RSS after imports "
                   "(interpreter, torch, transformers, trl)")
        for model, (pk, sk) in mem.items():
            p, s = results.get(pk, {}), results.get(sk, {})
            if p and s and "error" not in p and "error" not in s:
                out.append(f"  {model}: PPO-LoRA {p['samples_per_s']:.2f} samples/s, sequence {p['sequence_length']}; "
                           f"SFT-LoRA batches {s.get('batch_shapes')}, gradient checkpointing "
                           f"{s.get('gradient_checkpointing')}")
        out.append(rule)

    if "rloo/tiny" in results:
        r, ours = results["rloo/tiny"], results.get("ppo/tiny", {})
        if "error" in r:
            out.append("TRL RLOOTrainer on tiny: could not run -> " + r["error"].replace("\n", "\n    "))
        elif "error" not in ours:
            out.append(f"{'TRL comparison, tiny (same run)':36}{'samples/s':>10}{'/CPU-s':>8}{'step s':>8}"
                       f"{'rollout s':>10}{'update s':>9}{'resp len':>9}{'peak MB':>9}")
            for label, o in (("ours: PPO, separate value model", ours),
                             ("ours: PPO, value head on policy", results.get("ppo-head/tiny", {}))):
                if not o or "error" in o:
                    continue
                ow = o["ours_wall"]
                out.append(f"{label:36}{o['samples_per_s']:>10.2f}"
                           f"{WORKLOAD['rollout_batch_size'] / o['ours_cpu']['total']:>8.2f}{o['step_wall_s']:>8.3f}"
                           f"{ow['total'] - ow['update_and_rest']:>10.3f}{ow['update_and_rest']:>9.3f}"
                           f"{o['response_length']:>9.1f}{o['peak_rss_mb']:>9.0f}")
            out.append(f"{'TRL ' + meta['trl'] + ' RLOOTrainer':36}{r['samples_per_s']:>10.2f}"
                       f"{r['samples_per_cpu_s']:>8.2f}{r['step_wall_s']:>8.3f}{r['rollout_s']:>10.3f}{r['update_s']:>9.3f}"
                       f"{r['response_length']:>9.1f}{r['peak_rss_mb']:>9.0f}")
            head = results.get("ppo-head/tiny", {})
            for label, o in (("separate value model", ours), ("value head", head)):
                if o and "error" not in o:
                    per_cpu = WORKLOAD["rollout_batch_size"] / o["ours_cpu"]["total"]
                    out.append(f"  ours ({label}) / TRL: {o['samples_per_s'] / r['samples_per_s']:.2f}x samples/s, "
                               f"{per_cpu / r['samples_per_cpu_s']:.2f}x samples per CPU-second")
            out.append("  all: full fine-tuning, reference copy, the same reward-model checkpoint, 32 samples "
                       "and 8 optimiser steps of 16 per rollout;")
            out.append("  RLOO trains no value model (its baseline is the other sample of the same prompt). The runs "
                       "are consecutive processes:")
            out.append("  samples per CPU-second is the figure that the machine's changing load moves least")
        out.append(rule)
    out.append(f"JSON: {meta['json']}   total benchmark time {meta['total_s']:.0f}s")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model only, fewer steps (< 2 minutes)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per benchmark process")
    ap.add_argument("--out", type=Path, default=None, help="JSON results path")
    ap.add_argument("--keep", action="store_true", help="keep the temporary run directories")
    ap.add_argument("--only", nargs="+", metavar="CONFIG", help="run only these configurations (e.g. ppo/tiny)")
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        kind, spec = args.worker
        os.environ.update(OFFLINE_ENV)
        result = WORKERS[kind](json.loads(spec))
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    t_start = time.time()
    mode = "quick" if args.quick else "full"
    out_path = args.out or RESULTS / ("ppo_throughput_quick.json" if args.quick else "ppo_throughput.json")
    meta = {"mode": mode, "date": time.strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count(), "cpu": _cpu_name(),
            "torch": _version("torch").split("+")[0], "trl": _version("trl"), "threads": args.threads,
            "load_start": _loadavg(), "workload": WORKLOAD, "lora": LORA, "json": str(out_path)}
    models = ["tiny"] if args.quick else ["tiny", "mini-30m"]
    # (warm-up steps, measured steps) per model; the first step pays one-off costs.
    steps = {"tiny": (1, 2) if args.quick else (1, 5), "mini-30m": (1, 2)}
    tmp = Path(tempfile.mkdtemp(prefix="ppo_bench_"))
    results: dict[str, dict] = {}
    try:
        ckpts = _make_checkpoints(tmp / "ckpt", models, args.threads)
        plan: list[tuple[str, str, dict]] = []
        for m in models:
            warm, n = steps[m]
            plan.append(("ppo", f"ppo/{m}", dict(model=m, lora=False, value_model="reward", bare=True,
                                                  warmup_steps=warm, steps=n)))
        memory_models = ["tiny"] if args.quick else ["tiny", "mini-30m"]
        for m in memory_models:
            # TRL's SFTConfig turns gradient checkpointing on by default and the
            # SFT stage keeps that default, so PPO is compared with it on too;
            # PPO's own default (off) is measured beside it on the larger model.
            plan.append(("ppo", f"ppo-lora/{m}", dict(model=m, lora=True, value_model="policy_head", bare=False,
                                                       gradient_checkpointing=True, warmup_steps=1, steps=1)))
            if m != "tiny":
                plan.append(("ppo", f"ppo-lora-nockpt/{m}", dict(model=m, lora=True, value_model="policy_head",
                                                                  bare=False, warmup_steps=1, steps=1)))
            plan.append(("sft", f"sft-lora/{m}", dict(model=m, steps=WORKLOAD["ppo_epochs"] *
                                                       WORKLOAD["num_minibatches"], examples=256)))
        if not args.quick:
            # Closest to RLOO's work (one trained trunk): our PPO with the value head on the policy.
            plan.append(("ppo", "ppo-head/tiny", dict(model="tiny", lora=False, value_model="policy_head",
                                                       bare=False, warmup_steps=1, steps=3)))
        plan.append(("rloo", "rloo/tiny", dict(model="tiny", warmup_steps=1, steps=1 if args.quick else 3)))
        if args.only:
            plan = [p for p in plan if p[1] in args.only]

        for kind, name, spec in plan:
            m = spec["model"]
            work = tmp / name.replace("/", "_")
            work.mkdir(parents=True)
            spec = {**spec, "name": name, "threads": args.threads, "work_dir": str(work), **ckpts[m]}
            if kind == "sft":
                lora_ppo = results.get(f"ppo-lora/{m}", {})
                spec["max_length"] = lora_ppo.get("sequence_length", 48)
            print(f"[{time.time() - t_start:5.0f}s] running {name} ...", file=sys.stderr, flush=True)
            results[name] = _run_worker(kind, spec, args.threads, timeout=900)
            if "error" in results[name]:
                print(f"  {name} failed:\n{results[name]['error']}", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    meta.update(load_end=_loadavg(), total_s=time.time() - t_start,
                ppo_configs=[f"ppo/{m}" for m in models],
                memory_pairs={m: (f"ppo-lora/{m}", f"sft-lora/{m}") for m in memory_models})
    table = _table(results, meta)
    print(table)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({"meta": meta, "results": results, "table": table}, indent=2) + "\n")
    failed = [k for k, v in results.items() if "error" in v and not k.startswith("rloo")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
