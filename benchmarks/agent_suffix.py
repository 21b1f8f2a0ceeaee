"""BFCL multi-turn agent sessions through the server: tokens per forward with and without the suffix drafter.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/agent_suffix.py --model smollm2-135m-instruct \
        --adapter benchmarks/results/adapters/smollm2_lora_only_s0 --dtype float32 --limit 20 \
        --configs grammar,lookup grammar,lookup,suffix grammar,suffix,lookup --work-dir runs/agent_suffix \
        --output benchmarks/results/agent_suffix_smollm2.json

(docs/results/lossless_drafts.md, "Agent sessions through the server", has the figures and the second run, with
``--tool-choice required --no-parallel-calls --max-steps 1 --max-tokens 96``.)

Runs `layerroute agent --spawn` (`layerroute.serve.agent.run`, the CLI's own code) once per drafter set of
``--configs`` (default ``grammar,lookup`` then ``grammar,lookup,suffix``) on the same tasks, greedy, one in-process
server per configuration (so each suffix store starts empty and sees only that run's earlier requests). Per
configuration: the agent's summary (tokens per forward and accepted draft tokens per decode forward by drafter, per
step type: `layerroute.serve.agent.draft_summary`) and its wall time; across configurations: whether every step's
output (text, calls and their arguments, finish reason, completion tokens) is the same, as lossless drafts must give
in float32. Each configuration's full results (every task and step) go to ``--work-dir``. The last line is the JSON
result.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

from layerroute.config import (
    add_adapter_argument,
    add_dtype_argument,
    add_model_argument,
    add_output_argument,
)
from layerroute.eval.bench import emit_json_line
from layerroute.model import machine
from layerroute.serve import agent

DEFAULT_CONFIGS = ("grammar,lookup", "grammar,lookup,suffix")
OUTPUT_KEYS = ("content", "calls", "arguments", "finish_reason", "completion_tokens")


def outputs(results: list[dict]) -> list[tuple]:
    """What each step produced, in order: the part lossless drafts must leave unchanged."""
    return [tuple((s["task"], s["turn"], s["step"])) + tuple(json.dumps(s.get(k)) for k in OUTPUT_KEYS)
            for r in results for s in r["steps"]]


def compare(runs: dict[str, list[dict]]) -> dict:
    """Whether every configuration's steps equal the first's; the first step that differs otherwise."""
    names = list(runs)
    ref = outputs(runs[names[0]])
    out = {"identical": True, "reference": names[0], "steps_compared": len(ref), "differences": {}}
    for name in names[1:]:
        other = outputs(runs[name])
        diff = next((i for i, (a, b) in enumerate(zip(ref, other, strict=False)) if a != b), None)
        if diff is None and len(ref) != len(other):
            diff = min(len(ref), len(other))
        if diff is not None:
            out["identical"] = False
            out["differences"][name] = {"first_step": diff, "steps": [len(ref), len(other)],
                                        "reference": ref[diff] if diff < len(ref) else None,
                                        "this": other[diff] if diff < len(other) else None}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_argument(p)
    add_adapter_argument(p)
    add_dtype_argument(p)
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), metavar="SOURCES",
                   help="drafter sets to compare, one agent run each (each as `--draft SOURCES`)")
    p.add_argument("--limit", type=int, default=5, help="BFCL multi-turn tasks, from the start of the file")
    p.add_argument("--max-steps", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=192)
    p.add_argument("--tool-choice", default="auto", choices=["auto", "required"],
                   help="the agent's tool_choice (required: every step is a call)")
    p.add_argument("--no-parallel-calls", action="store_true", help="the agent's parallel_tool_calls=false")
    p.add_argument("--work-dir", default="runs/agent_suffix", help="each configuration's full agent results")
    add_output_argument(p)
    args = p.parse_args(argv)
    if len(args.configs) < 2:
        raise SystemExit("--configs: give at least two drafter sets to compare")

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    parser = argparse.ArgumentParser(prog="layerroute agent")
    agent.add_arguments(parser)
    runs, summaries, commands = {}, {}, {}
    for draft in args.configs:
        full = work / f"{draft.replace(',', '_')}.json"
        cli = ["--task", "bfcl-multi-turn", "--spawn", "--model", args.model or "smollm2-135m-instruct",
               *(["--adapter", args.adapter] if args.adapter else []), "--dtype", args.dtype,
               "--draft", draft, "--limit", str(args.limit), "--max-steps", str(args.max_steps),
               "--max-tokens", str(args.max_tokens), "--tool-choice", args.tool_choice,
               *(["--no-parallel-calls"] if args.no_parallel_calls else []), "--temperature", "0", "--output", str(full)]
        commands[draft] = "OMP_NUM_THREADS=1 layerroute agent " + shlex.join(cli)
        print(f"agent_suffix: {commands[draft]}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        agent.run(parser.parse_args(cli))
        wall = time.perf_counter() - t0
        data = json.loads(full.read_text())
        runs[draft] = data["tasks"]
        summaries[draft] = {**data["summary"], "wall_s": wall}
    dtypes = {s.get("dtype") for s in summaries.values()}
    result = {
        "benchmark": "agent_suffix", "task": "bfcl-multi-turn", "model": args.model or "smollm2-135m-instruct",
        "adapter": args.adapter, "dtype": dtypes.pop() if len(dtypes) == 1 else sorted(map(str, dtypes)),
        "greedy": True, "tasks": args.limit, "task_ids": [r["id"] for r in next(iter(runs.values()))],
        "max_steps": args.max_steps, "max_tokens": args.max_tokens, "tool_choice": args.tool_choice,
        "parallel_tool_calls": not args.no_parallel_calls,
        "machine": machine(), "date": datetime.date.today().isoformat(),
        "commands": commands, "benchmark_command": "OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/agent_suffix.py "
        + shlex.join(sys.argv[1:] if argv is None else list(argv)),
        "outputs": compare(runs), "summaries": summaries,
    }
    emit_json_line(result, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
