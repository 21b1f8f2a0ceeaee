"""`layerroute eval`: flags and entry point.

    layerroute eval --adapter DIR [--adapter DIR2 ...] [--config YAML] --output-dir OUT
    layerroute eval --combine OUT1/eval.json OUT2/eval.json --output-dir OUT
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..adapters import training_config
from ..config import (
    add_adapter_argument,
    add_config_arguments,
    add_model_argument,
    add_output_dir_argument,
    raw_config,
)
from ..errors import ConfigError
from .io import _json_default
from .runner import combine, run_eval


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_adapter_argument(parser, repeat=True)  # one per seed
    parser.add_argument("--combine", nargs="+", metavar="EVAL_JSON",
                        help="aggregate finished evaluations (eval.json files) as seeds instead of evaluating")
    add_config_arguments(parser, required=False)  # its data: and eval: sections; default: the first adapter's
    add_model_argument(parser)  # the base the adapters load on
    add_output_dir_argument(parser)


def run(args: argparse.Namespace) -> int:
    from ..config import RunConfig

    if args.combine:
        doc = combine(args.combine, Path(args.output_dir))
        print(json.dumps({"skip_differential_points": doc["skip_differential_points"],
                          "report": str(Path(args.output_dir) / "report.md")}, default=_json_default))
        return 0
    if not args.adapter:
        raise ConfigError("layerroute eval needs --adapter DIR (or --combine EVAL_JSON ...)")
    # --config, else the run config the first adapter was trained with; overlays: their eval: section only
    raw = raw_config(args, None if args.config else training_config(args.adapter[0]), eval_only=True)
    run_cfg = RunConfig.from_dict({k: raw.get(k) for k in ("model", "router", "lora", "data", "train", "eval")})
    explicit = {item.split("=", 1)[0].strip() for item in args.overrides}  # model.* given on this command line
    model_keys = {k: getattr(run_cfg.model, k) for k in ("tokenizer", "chat_template") if f"model.{k}" in explicit}
    doc = run_eval(args.adapter, run_cfg.data, run_cfg.eval, args.model, Path(args.output_dir),
                   dtype=run_cfg.model.dtype, **model_keys)
    print(json.dumps({"skip_differential_points": doc["skip_differential_points"],
                      "report": str(Path(args.output_dir) / "report.md")}, default=_json_default))
    return 0
