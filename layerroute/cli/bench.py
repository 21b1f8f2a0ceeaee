"""`layerroute bench`: its flags and the run (the measuring and the tables: `layerroute.eval.bench`).

    layerroute bench --model smollm2-135m-instruct --skip-fraction 0.25 0.5 --batch 1 8 --output bench.json
    layerroute bench --adapter runs/demo/train/adapter --steps-from configs/offline-smollm2.yaml --n-steps 16
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from ..atomic import write_text_atomic
from ..errors import ConfigError
from ..eval.bench import (
    DEFAULT_SCENARIOS,
    bench_real_steps,
    bench_table,
    emit_json_line,
    headline,
    real_steps_table,
    run_bench,
)
from ..infer.generate import load_for_inference
from ..model import machine


def _parse_scenario(text: str) -> tuple[int, int]:
    try:
        prompt, new = text.split(":")
        return int(prompt), int(new)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected PROMPT_TOKENS:NEW_TOKENS, got {text!r}") from err


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..config import (
        add_adapter_argument,
        add_chat_template_argument,
        add_device_argument,
        add_dtype_argument,
        add_json_argument,
        add_model_argument,
        add_output_argument,
        add_threads_argument,
    )

    add_model_argument(parser)
    group = parser.add_mutually_exclusive_group()
    add_adapter_argument(group)  # its routers decide
    add_chat_template_argument(parser)
    group.add_argument("--skip-fraction", type=float, nargs="+", default=None,
                       help="forced patterns skipping these fractions of the blocks (default 0.25 0.5)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=None, help="override the new tokens of every scenario")
    parser.add_argument("--tool", type=_parse_scenario, default=DEFAULT_SCENARIOS["tool"],
                        help="tool-call-like scenario PROMPT:NEW (default 64:16)")
    parser.add_argument("--planning", type=_parse_scenario, default=DEFAULT_SCENARIOS["planning"],
                        help="planning-like scenario PROMPT:NEW (default 256:64)")
    parser.add_argument("--scenarios", nargs="+", default=["tool", "planning"], choices=["tool", "planning"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-mixed", action="store_true", help="skip the mixed-batch configurations")
    add_threads_argument(parser)
    add_dtype_argument(parser)
    add_device_argument(parser)
    add_output_argument(parser)  # one JSON line
    add_json_argument(parser)  # one JSON line
    parser.add_argument("--steps-from", default=None, metavar="CONFIG",
                        help="with --adapter: time real eval steps of this YAML's data (batch 1, each step's own "
                             "context and gold length) instead of the synthetic scenarios")
    parser.add_argument("--step-type", default="tool_call", choices=["tool_call", "planning"],
                        help="which steps --steps-from times")
    parser.add_argument("--n-steps", type=int, default=16, help="how many eval steps --steps-from times")


def _run_real_steps(args: argparse.Namespace, rm, t0: float, log) -> int:
    from ..config import load_yaml
    from ..data.build import load_steps
    from ..data.config import DataConfig

    data_cfg = DataConfig.from_dict({**load_yaml(args.steps_from).get("data", {}), "progress": False})
    data = load_steps(data_cfg, rm.tokenizer)
    steps = [s for s in data.eval if s.step_type == args.step_type][: args.n_steps]
    if not steps:
        raise ConfigError(f"--steps-from {args.steps_from}: no {args.step_type} steps in its eval split")
    result = bench_real_steps(rm, steps, reps=args.reps, warmup=args.warmup, new_tokens=args.new_tokens, log=log)
    out = {"model": rm.identity.get("name"), "adapter": args.adapter, "step_type": args.step_type,
           "device": str(rm.device), "threads": torch.get_num_threads(), "reps": args.reps, "warmup": args.warmup,
           "torch": torch.__version__, "command": " ".join(sys.argv), **result,
           "wall_s": time.perf_counter() - t0}
    _emit(out, real_steps_table(result), args)
    return 0


def _emit(result: dict, table: str, args: argparse.Namespace) -> None:
    """The whole result to --output; on the terminal, the table (or, with --json, the JSON line)."""
    if args.json:
        emit_json_line(result, args.output)
        return
    if args.output:
        write_text_atomic(args.output, json.dumps(result) + "\n")  # never half a result on disk
    print(table)


def run(args: argparse.Namespace) -> int:
    if args.steps_from and not args.adapter:
        raise ConfigError("--steps-from needs --adapter (the routers that decide on the real steps)")
    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731 (progress to stderr; JSON last on stdout)
    t0 = time.perf_counter()
    rm = load_for_inference(args.model, args.adapter, args.dtype, args.device, chat_template=args.chat_template)
    if args.steps_from:
        return _run_real_steps(args, rm, t0, log)
    fractions = args.skip_fraction if args.skip_fraction is not None else (None if args.adapter else [0.25, 0.5])
    scenarios = {}
    for name in args.scenarios:
        prompt, new = getattr(args, name)
        scenarios[name] = (prompt, args.new_tokens or new)
    report = run_bench(
        rm, skip_fractions=fractions, batches=args.batch, scenarios=scenarios, reps=args.reps, warmup=args.warmup,
        mixed=not args.no_mixed, log=log,
    )
    device = rm.device
    meta = {
        "model": rm.identity.get("name"), "adapter": args.adapter, "num_layers": rm.num_layers,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else machine()["cpu"],
        "dtype": rm.dtype, "threads": torch.get_num_threads(), "reps": args.reps, "warmup": args.warmup,
        "torch": torch.__version__, "command": " ".join(sys.argv),
        "wall_s": None,
    }
    import transformers

    meta["transformers"] = transformers.__version__
    meta["wall_s"] = time.perf_counter() - t0
    out = {**meta, **report, "headline": headline(report)}
    _emit(out, bench_table(report), args)
    return 0
