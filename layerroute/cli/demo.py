"""`make demo`: the main job on the offline default, end to end.

    python -m layerroute.cli.demo --config configs/offline-smollm2.yaml --output-dir runs/demo [--set train.steps=10 ...]

Runs, in order, every stage that exists: parameter counts -> data stats -> training -> evaluation ->
benchmark of real eval tool-call steps with the trained routers, each writing under --output-dir, and ends with the
report's skip-vs-accuracy table and a table of how long each stage took. A stage whose module is not part of this
checkout is reported and skipped, never faked.

`--set KEY=VALUE` overrides reach every stage through one resolved config written to OUTPUT_DIR/config.yaml (the
stages read the same file, so the benchmark times steps of the same data the evaluation scored).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

from .main import main as cli_main

# The benchmark's size: 6 eval tool calls, 1 warm-up + 3 timed repetitions of dense and routed each (~2.5 min
# with one thread on the offline default: benchmarks/results/bench_real_tool_steps_*_cpu_t1.json took 140 s).
BENCH_STEPS, BENCH_REPS = 6, 3
# what the demo changes in the config it is given: the data loaders' bars on (each stage loads the data, ~30 s)
DEMO_OVERRIDES = ["data.progress=true"]


def _available(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("layerroute"):
            return False
        raise


def resolve_config(config: str, overrides: list[str], out: Path, overlays: list[str] | None = None) -> str:
    """The config every stage reads: `config` itself when there is nothing to change, else `config` with the
    overlays and overrides applied, written to out/config.yaml (errors name the key before anything runs)."""
    if not overrides and not overlays:
        return config
    import yaml

    from ..atomic import write_text_atomic
    from ..config import RunConfig, resolve_raw

    raw = resolve_raw(config, overrides, overlays)
    RunConfig.from_dict({k: raw.get(k) for k in ("model", "router", "lora", "data", "train", "eval")})  # validate
    header = (f"# {config}" + "".join(f" + {o}" for o in overlays or []) + f" with --set {' '.join(overrides)} "
              "(written by layerroute.cli.demo)\n")
    path = out / "config.yaml"
    write_text_atomic(path, header + yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def stages(config: str, out: Path, bench_steps: int = BENCH_STEPS, bench_reps: int = BENCH_REPS
           ) -> list[tuple[str, str, list[str]]]:
    from ..config import RunConfig

    adapter = out / "train" / "adapter"
    cfg = RunConfig.from_yaml(config, [])  # the counts of what this config trains (router kind, bridges, LoRA rank)
    return [
        ("parameter counts", "layerroute.cli.params",
         ["params", "--model", cfg.model.name, "--router-kind", cfg.router.kind, "--lora-r", str(cfg.lora.r),
          "--bridge-rank", str(cfg.router.bridge_rank)]),
        ("data stats", "layerroute.data.cli", ["data", "--config", config, "--stats"]),
        ("training", "layerroute.train", ["train", "--config", config, "--output-dir", str(out / "train")]),
        ("evaluation", "layerroute.eval.cli",
         ["eval", "--config", config, "--adapter", str(adapter), "--output-dir", str(out / "eval")]),
        # real eval tool calls (their own contexts and gold lengths), the trained routers deciding, against the
        # dense LoRA-merged model: what a tool call gains on this machine (synthetic prompts do not route like them)
        ("benchmark", "layerroute.cli.bench",
         ["bench", "--adapter", str(adapter), "--steps-from", config, "--step-type", "tool_call",
          "--n-steps", str(bench_steps), "--reps", str(bench_reps), "--warmup", "1",
          "--output", str(out / "bench.json")]),
    ]


def _report_summary(out: Path) -> str | None:
    """The report's first table (each skip figure beside the accuracy it costs), from the evaluation's eval.json."""
    path = out / "eval" / "eval.json"
    if not path.is_file():
        return None
    from ..eval.report import cost_table

    return "\n".join(cost_table(json.loads(path.read_text())))


def main(argv: list[str] | None = None) -> int:
    from ..config import add_config_arguments, add_output_dir_argument

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser, required=False, default="configs/offline-smollm2.yaml")  # for every stage
    add_output_dir_argument(parser, required=False, default="runs/demo")
    parser.add_argument("--bench-steps", type=int, default=BENCH_STEPS, help="eval tool calls the benchmark times")
    parser.add_argument("--bench-reps", type=int, default=BENCH_REPS, help="timed repetitions (after 1 warm-up)")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = resolve_config(args.config, DEMO_OVERRIDES + args.overrides, out, args.overlay)
    print(f"== config: {config}" + (f" ({args.config}" + "".join(f" + {o}" for o in args.overlay)
                                    + f" with --set {' '.join(DEMO_OVERRIDES + args.overrides)})"
                                    if config != args.config else ""), flush=True)
    timings = []
    for title, module, cmd in stages(config, out, args.bench_steps, args.bench_reps):
        if not _available(module):
            print(f"== {title}: skipped ({module} is not in this version)", flush=True)
            timings.append((title, None))
            continue
        print(f"\n== {title}: layerroute {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        code = cli_main(cmd)
        seconds = time.perf_counter() - start
        timings.append((title, seconds))
        print(f"== {title}: exit {code} after {seconds:.0f} s", flush=True)
        if code != 0:
            return code
        if title == "evaluation":
            summary = _report_summary(out)
            if summary:
                print("\n" + summary, flush=True)
    from tabulate import tabulate

    print("\n" + tabulate([(t, "skipped" if s is None else f"{s:,.0f}") for t, s in timings], ["stage", "seconds"],
                          colalign=("left", "right"), disable_numparse=True))
    report = out / "eval" / "report.md"
    if report.is_file():
        print(f"Report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
