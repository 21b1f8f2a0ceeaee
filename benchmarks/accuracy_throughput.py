"""Free-running accuracy throughput: the same N eval tool-call steps generated one at a time (`routed_generate`, the
path evaluation used before) and in batches of B (`layerroute.infer.batched.generate_batched`, the path it uses now).

    OMP_NUM_THREADS=1 python benchmarks/accuracy_throughput.py --model smollm2-135m-instruct --steps 32 --batch 8 \\
        [--adapter DIR] [--reps 2] [--output benchmarks/results/accuracy_throughput_smollm2_cpu_t1.json]

The steps are the offline config's free-running accuracy draw (`eval.accuracy_steps_per_type={tool_call: N}`),
with its tool-call budget and stop tokens, greedy. With --adapter the adapter's routers decide per step (LoRA
merged). Without one nothing is trained: the base model (fresh LoRA, zero B: no change) runs with its blocks
forced to one fixed skip set (`generate.skip_pattern(L, --skip-fraction)`, spread over the middle blocks), so the
real-skip path is exercised; say so when quoting the figure ("forced_skip" in the JSON).

The two ways alternate per repetition in one process (the machine is noisy); each way's wall time is its minimum
over repetitions, in process CPU time (one thread, so a core's seconds: robust to other jobs on a shared machine;
wall-clock figures are reported beside it). `identical_fraction` is the share of steps whose generated tokens are the same both ways (float
order can flip a near-tie: counted, never hidden); accuracy is scored both ways. The last line is the JSON result.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from layerroute.config import (
    RunConfig,
    add_adapter_argument,
    add_config_arguments,
    add_model_argument,
    raw_config,
)
from layerroute.data.build import load_steps
from layerroute.eval.accuracy import score_generation
from layerroute.eval.bench import emit_json_line
from layerroute.eval.sampling import _accuracy_steps
from layerroute.infer.batched import Request, generate_batched
from layerroute.infer.generate import load_for_inference, routed_generate, skip_pattern, stop_ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_argument(parser)
    add_adapter_argument(parser)
    add_config_arguments(parser, required=False, default="configs/offline-smollm2.yaml")
    parser.add_argument("--steps", type=int, default=32, help="eval tool-call steps")
    parser.add_argument("--step-type", default="tool_call", choices=["tool_call", "planning"],
                        help="planning: the eval's planning draw instead (with --set "
                             "eval.accuracy_planning_sources=[gsm8k_test]: GSM8K test problems)")
    parser.add_argument("--batched-only", action="store_true",
                        help="time the batched way only (a slice for a wall-time estimate; no speedup)")
    parser.add_argument("--batch", type=int, default=8, help="rows per batch")
    parser.add_argument("--skip-fraction", type=float, default=0.2, help="without --adapter: blocks forced closed")
    parser.add_argument("--reps", type=int, default=2, help="repetitions of each way (alternating)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None, help="also write the JSON line here (atomically)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.reps < 1:
        parser.error("--steps, --batch and --reps must be >= 1")
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    cfg = RunConfig.from_dict(raw_config(args))
    counts = {"tool_call": 0, "planning": 0, args.step_type: args.steps}
    ecfg = dataclasses.replace(cfg.eval, accuracy_steps_per_type=counts)
    rm = load_for_inference(args.model or (None if args.adapter else cfg.model.name), args.adapter,
                            dtype=cfg.model.dtype, device=cfg.model.device)
    rm.model.eval()
    data = load_steps(cfg.data, rm.tokenizer)
    steps = _accuracy_steps([], {"tool_call": [], "planning": []}, list(data.eval), ecfg)[args.step_type]
    forced = None if args.adapter else skip_pattern(rm.num_layers, args.skip_fraction)
    eos = stop_ids(rm)
    budget = ecfg.max_new_tokens_tool if args.step_type == "tool_call" else ecfg.max_new_tokens_planning
    prompts = [s.input_ids[: s.context_length] for s in steps]
    print(f"[accuracy-throughput] {len(steps)} steps, contexts {min(map(len, prompts))}-{max(map(len, prompts))} "
          f"tokens, budget {budget}, batch {args.batch}, "
          f"{'routers of ' + args.adapter if args.adapter else f'forced skip {forced}'} "
          f"(setup {time.perf_counter() - t0:.0f} s)", flush=True)

    def single():
        return [routed_generate(rm, [p], max_new_tokens=budget, eos_token_id=eos, forced=forced,
                                kv_policy=ecfg.kv_policy).tokens[0] for p in prompts]

    def batched():
        reqs = [Request(p, budget, stop=frozenset(eos), forced=forced) for p in prompts]
        return [r.tokens for r in generate_batched(rm, reqs, batch_size=args.batch, kv_policy=ecfg.kv_policy,
                                                   progress=False)]

    times = {"single": [], "batched": []}
    cpu = {"single": [], "batched": []}  # process CPU seconds: robust to other jobs on a shared machine
    outputs = {}
    ways = [("batched", batched)] if args.batched_only else [("single", single), ("batched", batched)]
    for rep in range(args.reps):
        for name, fn in ways if rep % 2 == 0 else ways[::-1]:
            start, cpu_start = time.perf_counter(), time.process_time()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - cpu_start)
            print(f"[accuracy-throughput] rep {rep} {name}: {times[name][-1]:.1f} s wall, {cpu[name][-1]:.1f} s CPU",
                  flush=True)
    if args.batched_only:
        emit_json_line({
            "benchmark": "accuracy_throughput", "batched_only": True, "model": args.model or cfg.model.name, "dtype": rm.dtype,
            "adapter": args.adapter, "step_type": args.step_type,
            "forced_skip": None if forced is None else [i for i, g in enumerate(forced) if not g],
            "steps": len(steps), "batch": args.batch, "reps": args.reps, "threads": args.threads,
            "max_new_tokens": budget, "context_tokens_mean": statistics.mean(map(len, prompts)),
            "generated_tokens_mean": statistics.mean(len(t) for t in outputs["batched"]),
            "seconds": times, "cpu_seconds": cpu,
            "cpu_seconds_per_step_batched": min(cpu["batched"]) / len(steps),
            "steps_per_min_batched": 60 * len(steps) / min(cpu["batched"]),
        }, args.output)
        return 0
    same = [a == b for a, b in zip(outputs["single"], outputs["batched"], strict=True)]
    scored = {name: [score_generation(s, rm.tokenizer.decode(t, skip_special_tokens=True))[0]
                     for s, t in zip(steps, outs, strict=True)] for name, outs in outputs.items()}
    # steps per minute of process CPU time (one thread: a core's time), the headline on a shared machine; the wall
    # clock figures are kept beside it
    per_min = {k: 60 * len(steps) / min(v) for k, v in cpu.items()}
    per_min_wall = {k: 60 * len(steps) / min(v) for k, v in times.items()}
    emit_json_line({
        "benchmark": "accuracy_throughput", "model": args.model or cfg.model.name, "dtype": rm.dtype, "adapter": args.adapter,
        "forced_skip": None if forced is None else [i for i, g in enumerate(forced) if not g],
        "steps": len(steps), "batch": args.batch, "reps": args.reps, "threads": args.threads,
        "step_type": args.step_type, "max_new_tokens": budget, "kv_policy": ecfg.kv_policy,
        "context_tokens_mean": statistics.mean(map(len, prompts)),
        "generated_tokens_mean": statistics.mean(len(t) for t in outputs["batched"]),
        "seconds": times, "cpu_seconds": cpu, "clock": "process CPU time (one thread)",
        "steps_per_min_single": per_min["single"], "steps_per_min_batched": per_min["batched"],
        "speedup": per_min["batched"] / per_min["single"],
        "steps_per_min_single_wall": per_min_wall["single"], "steps_per_min_batched_wall": per_min_wall["batched"],
        "speedup_wall": per_min_wall["batched"] / per_min_wall["single"],
        "identical_fraction": sum(same) / len(same), "differing_steps": [
            f"{s.conversation_id}#{s.step_index}" for s, ok in zip(steps, same, strict=True) if not ok],
        "accuracy_single": sum(scored["single"]) / len(steps), "accuracy_batched": sum(scored["batched"]) / len(steps),
    }, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
