"""One metrics path: flat dicts with namespaced keys -> metrics.jsonl (+ wandb, tensorboard).

Only the main process writes. wandb runs offline when no API key is set, so a
recipe with ``report_to: [wandb]`` works on a machine without network.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

log = logging.getLogger(__name__)


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible rather than crash
    return v


class MetricsLogger:
    """Appends one JSON object per logged step to ``<stage_dir>/metrics.jsonl``.

    Appending (not truncating) is what makes a resumed stage's file continue
    where the interrupted one stopped; ``truncate_after(step)`` drops rows a
    crashed run logged past its last checkpoint.
    """

    def __init__(self, stage_dir: Path, run_name: str, report_to: list[str], config: dict | None = None,
                 enabled: bool = True, project: str = "rlhf"):
        self.enabled = enabled
        self.path = Path(stage_dir) / "metrics.jsonl"
        self._wandb = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if "wandb" in report_to:
            import wandb

            if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
                os.environ["WANDB_MODE"] = "offline"
            self._wandb = wandb.init(project=project, name=run_name, config=config,
                                     dir=str(stage_dir), reinit="finish_previous")
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(stage_dir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        if self.enabled:
            truncate_jsonl(self.path, step)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({k: _jsonable(v) for k, v in metrics.items()})
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_summary(stage_dir: Path, summary: dict[str, Any]) -> None:
    """The stage's final summary, ``metrics.json``, with ``run/threads`` (torch's
    CPU threads in this process, set by ``rlhf.threads.apply_threads``)."""
    import torch

    out = Path(stage_dir) / "metrics.json"
    summary = {**summary, "run/threads": summary.get("run/threads", torch.get_num_threads())}
    out.write_text(json.dumps({k: _jsonable(v) for k, v in summary.items()}, indent=2) + "\n")


def _namespaced(logs: dict[str, float]) -> dict[str, float]:
    """HF Trainer keys -> ours: ``loss`` -> ``train/loss``, ``eval_loss`` -> ``eval/loss``,
    ``train_loss`` (the run's average) -> ``train/mean_loss``."""
    out = {}
    for k, v in logs.items():
        if k == "train_loss":
            # HF's end-of-training average; `train/loss` is the per-step loss.
            out["train/mean_loss"] = v
        elif k.startswith("eval_"):
            out[f"eval/{k[5:]}"] = v
        elif k.startswith("train_"):
            out[f"train/{k[6:]}"] = v
        elif "/" in k:
            out[k] = v
        else:
            out[f"train/{k}"] = v
    return out


class MetricsCallback(TrainerCallback):
    """Forwards the HF Trainer's logs (TRL stages) into a MetricsLogger."""

    def __init__(self, logger: MetricsLogger):
        self.logger = logger

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run starts from a checkpoint's step: drop the rows the
        # interrupted run logged after that checkpoint.
        if state.global_step > 0 and state.is_world_process_zero:
            self.logger.truncate_after(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            metrics = _namespaced(logs)
            metrics["train/epoch"] = state.epoch
            self.logger.log(metrics, step=state.global_step)


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep only the rows of ``path`` with ``step <= step`` (a resumed run then
    appends exactly what an uninterrupted one would have). A torn last line
    (a crash mid-write) is dropped too. Written to a temp file, then renamed."""
    path = Path(path)
    if not path.exists():
        return
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if line.strip() and json.loads(line).get("step", 0) <= step:
                rows.append(line)
        except ValueError:
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
