"""`layerroute eval`: flags and entry point.

    layerroute eval --adapter DIR [--adapter DIR2 ...] [--config YAML] --output-dir OUT
    layerroute eval --combine OUT1/eval.json OUT2/eval.json --output-dir OUT
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..adapters import training_config
from ..errors import ConfigError
from .io import _json_default
from .runner import combine, run_eval


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", action="append", help="adapter directory (repeat for seeds)")
    parser.add_argument("--combine", nargs="+", metavar="EVAL_JSON",
                        help="aggregate finished evaluations (eval.json files) as seeds instead of evaluating")
    parser.add_argument("--config", help="YAML whose data: and eval: sections to use (default: the adapter's)")
    parser.add_argument("--model", help="base model to load the adapter on (default: the adapter's own)")
    parser.add_argument("--overlay", action="append", default=[], metavar="YAML",
                        help="YAML whose eval: section overrides the config's, key by key (e.g. "
                             "configs/eval-of-record.overlay.yaml); applied before --set")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. eval.bootstrap=0")
    parser.add_argument("--output-dir", required=True)


def run(args: argparse.Namespace) -> int:
    from ..config import RunConfig, apply_eval_overlay, apply_overrides, load_yaml

    if args.combine:
        doc = combine(args.combine, Path(args.output_dir))
        print(json.dumps({"skip_differential_points": doc["skip_differential_points"],
                          "report": str(Path(args.output_dir) / "report.md")}, default=_json_default))
        return 0
    if not args.adapter:
        raise ConfigError("layerroute eval needs --adapter DIR (or --combine EVAL_JSON ...)")
    if args.config:
        raw = load_yaml(args.config)
    else:  # the run config the first adapter was trained with
        raw = training_config(args.adapter[0])
    for path in args.overlay:
        raw = apply_eval_overlay(raw, load_yaml(path), path)
    raw = apply_overrides(raw, args.set)
    run_cfg = RunConfig.from_dict({k: raw.get(k) for k in ("model", "router", "lora", "data", "train", "eval")})
    explicit = {item.split("=", 1)[0].strip() for item in args.set}  # model.* given on this command line
    model_keys = {k: getattr(run_cfg.model, k) for k in ("tokenizer", "chat_template") if f"model.{k}" in explicit}
    doc = run_eval(args.adapter, run_cfg.data, run_cfg.eval, args.model, Path(args.output_dir),
                   dtype=run_cfg.model.dtype, **model_keys)
    print(json.dumps({"skip_differential_points": doc["skip_differential_points"],
                      "report": str(Path(args.output_dir) / "report.md")}, default=_json_default))
    return 0
