"""`layerroute <command>`: one entry point, one sub-command per job.

Sub-commands register themselves from their modules' `add_arguments` / `run` pairs so that this file stays
a table of contents.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import warnings

from .errors import LayerRouteError

# name -> (module, one-line help). Modules expose add_arguments(parser) and run(args) -> int.
COMMANDS = {
    "params": ("layerroute.cli", "count backbone / LoRA / router parameters (no weights are allocated)"),
    "config": ("layerroute.config.cli", "validate a run config without loading a model; print it resolved (--describe: "
                                        "every setting with its default and help)"),
    "data": ("layerroute.data.cli", "build the step data and print stats or rendered examples"),
    "train": ("layerroute.train", "train routers + LoRA from a YAML config"),
    "sweep": ("layerroute.sweep", "train and evaluate several seeds, one table"),
    "eval": ("layerroute.eval.cli", "skip rates, perplexity in four configurations, task accuracy, plots"),
    "ablation": ("layerroute.ablation", "compare training recipes over seeds from finished evaluations (one table)"),
    "curve": ("layerroute.skip_curve", "tool-call accuracy against blocks skipped: static removals and trained routers"),
    "bench": ("layerroute.bench", "wall-clock latency of routed vs dense generation (a table; --json / --output: JSON)"),
    "generate": ("layerroute.generate_cli", "routed generation for one prompt"),
    "serve": ("layerroute.serve.cli", "OpenAI-compatible chat endpoint with tools"),
    "agent": ("layerroute.agent", "BFCL multi-turn agent loop against a serve endpoint (success + routing per step)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:  # `layerroute params`
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model name (see README)")
    from .config import choices
    from .config.sections import RouterKind

    parser.add_argument("--router-kind", default="linear", choices=list(choices(RouterKind)))
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--no-lora", action="store_true", help="count routers only")
    parser.add_argument("--bridge-rank", type=int, default=0, help="skip bridges of this rank on every block (0 = none)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:  # `layerroute params`
    from .config import LoraSettings, RouterConfig
    from .params import count_parameters

    counts = count_parameters(
        args.model, RouterConfig(kind=args.router_kind, bridge_rank=args.bridge_rank),
        LoraSettings(r=args.lora_r, enabled=not args.no_lora),
    )
    if args.json:
        print(json.dumps(counts))
    else:
        for key in ("backbone", "lora", "router", "bridge", "trainable"):
            print(f"{key:>20}: {counts[key]:>15,}")
        print(f"{'trainable_fraction':>20}: {100 * counts['trainable_fraction']:>14.3f}%")
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
