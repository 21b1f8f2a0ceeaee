"""Train routers + LoRA on agent steps: one loop on `accelerate` (CPU, one GPU, or DDP under `accelerate launch`).

`layerroute train` (registered in layerroute/cli/main.py) and `python -m layerroute.train` (what `accelerate launch -m
layerroute.train` runs): parse the flags, load the config, train, print one JSON line of the final metrics.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..config import RunConfig, add_config_arguments, add_output_dir_argument, raw_config
from .metrics import _finite_or_none
from .trainer import train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--seed", type=int, default=None, help="train.seed (LoRA init, data order, dropout)")
    add_output_dir_argument(parser, required=False)  # default: the config's train.output_dir
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the run folder")


def run(args: argparse.Namespace) -> int:
    if args.seed is not None:
        args.overrides = [*args.overrides, f"train.seed={args.seed}"]
    cfg = RunConfig.from_dict(raw_config(args))  # every config error surfaces here, before any model load
    result = train(cfg, args.output_dir, resume=args.resume)
    if result.is_main_process:
        metrics = {k: (_finite_or_none(v) if isinstance(v, float) else v) for k, v in result.metrics.items()}
        print(json.dumps({"adapter": str(result.adapter_dir), "wall_s": round(result.wall_s, 2),
                          **{k: v for k, v in metrics.items() if "layer_" not in k}}, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m layerroute.train ...` (what `accelerate launch -m layerroute.train` runs), same as `layerroute train`."""
    from ..errors import LayerRouteError

    parser = argparse.ArgumentParser(prog="layerroute train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except LayerRouteError as err:
        print(f"layerroute train: error: {err}", file=sys.stderr)
        return 2

