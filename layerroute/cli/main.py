"""`layerroute <command>`: one entry point, one sub-command per job.

Sub-commands register themselves from their modules' `add_arguments` / `run` pairs so that this file stays
a table of contents.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from ..errors import LayerRouteError

# name -> (module, one-line help). Modules expose add_arguments(parser) and run(args) -> int.
COMMANDS = {
    "params": ("layerroute.cli.params", "count backbone / LoRA / router parameters (no weights are allocated)"),
    "config": ("layerroute.config.cli", "validate a run config without loading a model; print it resolved (--describe: "
                                        "every setting with its default and help)"),
    "data": ("layerroute.data.cli", "build the step data and print stats or rendered examples"),
    "train": ("layerroute.train", "train routers + LoRA from a YAML config"),
    "sweep": ("layerroute.cli.sweep", "train and evaluate several seeds, one table"),
    "eval": ("layerroute.eval.cli", "skip rates, perplexity in four configurations, task accuracy, plots"),
    "ablation": ("layerroute.eval.ablation", "compare training recipes over seeds from finished evaluations (one table)"),
    "oracle": ("layerroute.eval.oracle", "per step, the largest set of blocks whose removal keeps the step's full-depth "
                                         "greedy output (resumable JSONL)"),
    "fit-routers": ("layerroute.cli.fit_routers", "routers trained on the oracle's per-step targets, their threshold "
                                                   "chosen on validation steps (writes an adapter and a frontier)"),
    "curve": ("layerroute.eval.skip_curve", "tool-call accuracy against blocks skipped: static removals and trained routers"),
    "bench": ("layerroute.cli.bench", "wall-clock latency of routed vs dense generation (a table; --json / --output: JSON)"),
    "generate": ("layerroute.cli.generate_cli", "routed generation for one prompt"),
    "serve": ("layerroute.serve.cli", "OpenAI-compatible chat endpoint with tools"),
    "agent": ("layerroute.serve.agent", "BFCL multi-turn agent loop against a serve endpoint (success + routing per step)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layerroute", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if not err.name or not err.name.startswith("layerroute"):
                raise
            continue  # a command whose module is not written yet is simply not offered
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    # peft 0.21 calls a transformers property deprecated in 5.x on every adapter operation: noise, not news
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except LayerRouteError as err:
        print(f"layerroute {args.command}: error: {err}", file=sys.stderr)
        return 2

