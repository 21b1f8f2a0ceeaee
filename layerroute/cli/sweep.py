"""`layerroute sweep --config X.yaml --seeds 3 --output-dir OUT`: train and evaluate several seeds, one table.

Each seed trains into OUT/seed-<s>/ (a finished seed is not trained again: rerunning the sweep after an
interruption resumes where it stopped), then every adapter is evaluated together (OUT/eval/eval.json and
report.md, with per-seed differential bars and mean/std over seeds).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import RunConfig, add_config_arguments, add_output_dir_argument, raw_config


def sweep(cfg: RunConfig, seeds: list[int], out: Path, overrides: list[str] | None = None) -> dict:
    from ..eval.runner import run_eval
    from ..train import train

    out.mkdir(parents=True, exist_ok=True)
    adapters = []
    for seed in seeds:
        seed_dir = out / f"seed-{seed}"
        adapter = seed_dir / "adapter"
        if (adapter / "layerroute.json").is_file():
            print(f"[sweep] seed {seed}: already trained ({adapter})", flush=True)
        else:
            seed_cfg = RunConfig.from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "seed": seed}})
            resume = any(seed_dir.glob("checkpoint-*"))
            print(f"[sweep] seed {seed}: training into {seed_dir}{' (resuming)' if resume else ''}", flush=True)
            train(seed_cfg, seed_dir, resume=resume)
        adapters.append(str(adapter))
    doc = run_eval(adapters, cfg.data, cfg.eval, None, out / "eval", dtype=cfg.model.dtype)
    table = {
        "seeds": seeds,
        "skip_differential_points": doc["aggregate"]["full"]["skip_differential_points"] if doc["aggregate"]
        else doc["skip_differential_points"],
        "report": str(out / "eval" / "report.md"),
    }
    return table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0 .. N-1 added to train.seed)")
    add_output_dir_argument(parser)


def run(args: argparse.Namespace) -> int:
    if args.seeds < 1:
        raise SystemExit("--seeds must be >= 1")
    cfg = RunConfig.from_dict(raw_config(args))
    seeds = [cfg.train.seed + i for i in range(args.seeds)]
    print(json.dumps(sweep(cfg, seeds, Path(args.output_dir)), default=str))
    return 0
