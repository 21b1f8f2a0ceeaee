"""Training curves of several runs side by side (PNG + JSON line): LM loss and the fraction of blocks run per step
type, read from each run's metrics.jsonl (what `layerroute train` logs every `train.log_every` steps).

Made to show how stable a recipe is across seeds (issue 23: the paper's recipe at paper scale has LM-loss spikes
in every seed, where the routers close blocks the model still needs):

    PYTHONPATH=. python benchmarks/plot_training_curves.py \\
        runs/qwen/paper_soft_mean-s0 runs/qwen/paper_soft_mean-s1 runs/qwen/paper_soft_mean-s2 \\
        runs/qwen/lora_only-s0 runs/qwen/default-s0 --output docs/qwen_training_curves.png

A run is a training output directory (or NAME=DIR). The last line printed is JSON: per run, the steps logged, the
largest LM loss and its step, the final LM loss and the final run rates.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from layerroute.eval.bench import emit_json_line
from layerroute.train.metrics import METRICS_FILE

RUN_RATES = ("run_rate/tool_call", "run_rate/planning")


def read_run(directory: Path) -> list[dict]:
    """The run's logged training steps (records with an LM loss), in step order; unreadable lines are skipped and
    counted on stderr (a run killed mid-write leaves a cut last line)."""
    path = directory / METRICS_FILE
    if not path.is_file():
        raise SystemExit(f"{path}: not found (is {directory} a `layerroute train` output directory?)")
    rows, bad = [], 0
    for line in filter(None, path.read_text().splitlines()):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec.get("lm_loss"), (int, float)) and "step" in rec:
            rows.append(rec)
    if bad:
        print(f"{path}: {bad} unreadable line(s) skipped", flush=True)
    if not rows:
        raise SystemExit(f"{path}: no logged training step with an lm_loss")
    return sorted(rows, key=lambda r: r["step"])


def summary(rows: list[dict]) -> dict:
    peak = max(rows, key=lambda r: r["lm_loss"] if math.isfinite(r["lm_loss"]) else math.inf)
    return {"steps_logged": len(rows), "last_step": rows[-1]["step"], "max_lm_loss": peak["lm_loss"],
            "max_lm_loss_step": peak["step"], "final_lm_loss": rows[-1]["lm_loss"],
            **{f"final_{k}": rows[-1].get(k) for k in RUN_RATES}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="training output directories, optionally NAME=DIR")
    p.add_argument("--output", required=True, help="PNG path")
    args = p.parse_args()
    runs = {}
    for spec in args.runs:
        name, _, directory = spec.rpartition("=")
        runs[name or Path(directory).name] = read_run(Path(directory))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharex=True)
    for name, rows in runs.items():
        steps = [r["step"] for r in rows]
        line, = axes[0].plot(steps, [r["lm_loss"] for r in rows], label=name)
        for ax, key in zip(axes[1:], RUN_RATES, strict=True):
            ax.plot(steps, [r.get(key, math.nan) for r in rows], color=line.get_color(), label=name)
    axes[0].set(title="LM loss", xlabel="optimizer step", ylabel="nats/token")
    for ax, key in zip(axes[1:], RUN_RATES, strict=True):
        ax.set(title=f"blocks run, {key.split('/')[1].replace('_', ' ')} steps", xlabel="optimizer step",
               ylabel="fraction of blocks run", ylim=(-0.02, 1.02))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    emit_json_line({"output": str(out), "runs": {n: summary(r) for n, r in runs.items()}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
