"""Metrics sinks, one method each, `log(metrics)`: OUT/metrics.jsonl, TensorBoard (optional) and the tqdm bar;
and the resume-side reading of metrics.jsonl."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..atomic import write_text_atomic

METRICS_FILE = "metrics.jsonl"


def _metrics_up_to(text: str, step: int) -> tuple[list[str], int]:
    """The metrics.jsonl lines logged at or before `step`, and how many lines could not be read (cut by a kill)."""
    kept, damaged = [], 0
    for line in filter(None, text.splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            damaged += 1
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    return kept, damaged


class JsonlLogger:
    """Appends one JSON object per logging step to OUT/metrics.jsonl."""

    def __init__(self, path: Path):
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, metrics: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(metrics) + "\n")


class TensorBoardLogger:
    """Scalars (lists become one scalar per layer) to a TensorBoard event file, when tensorboard is installed."""

    def __init__(self, directory: Path):
        from torch.utils.tensorboard import SummaryWriter  # ImportError without the tensorboard package

        self.writer = SummaryWriter(str(directory))

    def log(self, metrics: dict) -> None:
        step = metrics.get("step", 0)
        for key, value in metrics.items():
            if isinstance(value, list):
                for i, v in enumerate(value):
                    if isinstance(v, int | float):
                        self.writer.add_scalar(f"{key}/{i:02d}", v, step)
            elif isinstance(value, int | float) and key != "step":
                self.writer.add_scalar(key, value, step)
        self.writer.flush()


class ProgressBar:
    """The tqdm bar: advanced every step, its postfix refreshed from each metrics record."""

    def __init__(self, total: int, initial: int, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, disable=not enabled, desc="fit", dynamic_ncols=True)

    def advance(self) -> None:
        self.bar.update(1)

    def log(self, metrics: dict) -> None:
        if self.bar.disable:
            return
        if "loss" not in metrics:
            keys = [k for k in ("val/lm_loss", "val/lm_loss/tool_call", "val/lm_loss/planning") if k in metrics]
            self.bar.write(" ".join(f"{k}={metrics[k]:.4f}" for k in keys) + f" (step {metrics.get('step')})")
            return
        def f(key: str, spec: str) -> str:
            value = metrics.get(key)
            return "-" if value is None else format(value, spec)

        self.bar.set_postfix_str(
            f"loss={f('loss', '.4f')} lm={f('lm_loss', '.4f')} reg={f('reg', '.4f')} "
            f"run tool={f('run_rate/tool_call', '.2f')} plan={f('run_rate/planning', '.2f')} "
            f"tok/s={f('tokens_per_s', '.0f')}",
            refresh=False,
        )

    def close(self) -> None:
        self.bar.close()


def _finite_or_none(x: float):
    return x if math.isfinite(x) else None


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the records of metrics.jsonl logged at or before `step` (a resume drops what the interrupted session
    wrote after its checkpoint); returns how many unreadable lines were dropped with the rest."""
    kept, damaged = _metrics_up_to(path.read_text(), step)
    write_text_atomic(path, "".join(ln + "\n" for ln in kept))
    return damaged


def make_sinks(output_dir: Path, total: int, initial: int, *, progress: bool, main_process: bool) -> list:
    """The progress bar (shown on the main process only), then metrics.jsonl and TensorBoard on the main process."""
    sinks = [ProgressBar(total, initial, progress and main_process)]
    if main_process:
        sinks.append(JsonlLogger(output_dir / METRICS_FILE))
        try:
            sinks.append(TensorBoardLogger(output_dir / "tensorboard"))
        except ImportError:
            pass  # tensorboard is optional
    return sinks
