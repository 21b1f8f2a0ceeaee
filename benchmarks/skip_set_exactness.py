"""Which blocks can a tool call lose before greedy decoding changes? No training: the frozen model, static skip sets.

Each block's single removal is measured on the calibration tool-call steps the trainer's
drop_* oracles use (the first N tool-call training steps): the NLL it adds and the greedy token errors it adds.
Then the k cheapest blocks by each ranking are removed from held-out tool-call steps (the eval split: BFCL
live_* with unseen functions, and held-out steps of the seen categories) and the steps are scored teacher-forced:
the fraction reproduced token for token by greedy decoding (`teacher_forced_exact`, a lower bound on free-running
accuracy), the greedy token error rate and the perplexity.
The greedy_* rankings grow the set one block at a time on the same calibration steps (the trainer's greedy_* oracles):
one set per ranking up to the largest k, whose first k blocks are the set for k.
It separates the question "which blocks" from "what does training make of them". With --adapter the model is a
trained adapter's LoRA (its routers ignored: the gates are forced), e.g. one trained at full depth only.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/skip_set_exactness.py --config configs/offline-smollm2.yaml \\
        --calibration-steps 8 --eval-steps 64 --k 0 1 2 3 6 9 \\
        --output benchmarks/results/skip_set_exactness_offline.json
    # the greedy sets only (one pass over the calibration steps per candidate and round)
    ... --rankings greedy_errors greedy_nll --greedy-candidates 12

The last line is the JSON result.
"""

from __future__ import annotations

import argparse
import math
import random
import time

import torch

from layerroute.adapters import build_routed_model, load_adapter
from layerroute.calibrate.influence import drop_costs, greedy_drop_targets, oracle_skip_targets
from layerroute.config import EvalConfig, RunConfig, add_adapter_argument, add_config_arguments, raw_config
from layerroute.data.build import load_steps
from layerroute.eval.bench import emit_json_line
from layerroute.eval.teacher_forced import teacher_forced, teacher_forced_exact
from layerroute.special_tokens import pad_token_id

# ranking name in the output -> the trainer's train.oracle_source
RANKINGS = {"nll": "drop_nll", "token_errors": "drop_errors", "greedy_errors": "greedy_errors",
            "greedy_nll": "greedy_nll"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser, required=False, default="configs/offline-smollm2.yaml")
    add_adapter_argument(parser)
    parser.add_argument("--calibration-steps", type=int, default=8, help="tool-call training steps that rank blocks")
    parser.add_argument("--eval-steps", type=int, default=64, help="held-out tool-call steps scored per skip set")
    parser.add_argument("--k", type=int, nargs="+", default=[0, 1, 2, 3, 6, 9], help="blocks removed")
    parser.add_argument("--rankings", nargs="+", default=list(RANKINGS), choices=list(RANKINGS),
                        help="which oracles choose the skip sets")
    parser.add_argument("--greedy-candidates", type=int, default=12,
                        help="greedy_*: blocks tried after round one (train.experimental.oracle_greedy_candidates; 0 = all)")
    parser.add_argument("--seed", type=int, default=0, help="draw of the held-out steps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--output", default=None, help="also write the JSON line here (atomically)")
    args = parser.parse_args(argv)
    if args.calibration_steps < 1 or args.eval_steps < 1:
        parser.error("--calibration-steps and --eval-steps must be >= 1")

    t0 = time.perf_counter()
    cfg = RunConfig.from_dict(raw_config(args))
    if args.adapter:
        rm = load_adapter(args.adapter, cfg.model)
    else:
        rm = build_routed_model(cfg.model, cfg.router, cfg.lora)  # LoRA starts at zero: the frozen model
    rm.model.eval()
    L = rm.num_layers
    if any(k < 0 or k > L for k in args.k):
        parser.error(f"--k values must lie in 0..{L}")
    data = load_steps(cfg.data, rm.tokenizer)
    pad = pad_token_id(rm.tokenizer)
    calibration = [s for s in data.train if s.step_type == "tool_call"][: args.calibration_steps]
    pool = [s for s in data.eval if s.step_type == "tool_call"]
    held_out = sorted(random.Random(args.seed).sample(range(len(pool)), min(args.eval_steps, len(pool))))
    steps = [pool[i] for i in held_out]
    ecfg = EvalConfig(batch_size=args.batch_size, seed=args.seed)

    costs = drop_costs(rm, calibration, ecfg, pad)
    # the trainer's own selection (layerroute.calibrate.setup.static_oracle_targets)
    idx = list(range(len(steps)))
    points, scored, greedy_paths = [], {}, {}
    for name in args.rankings:
        source = RANKINGS[name]
        if source.startswith("greedy_"):
            _, greedy_paths[name] = greedy_drop_targets(rm, calibration, ecfg, max(args.k), source, costs,
                                                        args.greedy_candidates, pad)
        for k in args.k:
            if source.startswith("greedy_"):
                dropped = sorted(p["block"] for p in greedy_paths[name][:k])
            else:
                dropped = [j for j, run in enumerate(oracle_skip_targets(costs, k, source).tolist()) if not run]
            if tuple(dropped) not in scored:  # k = 0 (and any set both rankings pick) is scored once
                pattern = torch.tensor([[j not in dropped for j in range(L)]] * len(steps))
                scored[tuple(dropped)] = teacher_forced(rm, steps, "shortgpt", ecfg, patterns=pattern, pad_id=pad,
                                                        desc=f"{name} k={k}")
            res = scored[tuple(dropped)]
            tokens = sum(r["tokens"] for r in res)
            points.append({
                "ranking": name, "k": k, "dropped": dropped,
                "teacher_forced_exact": teacher_forced_exact(res, idx),
                "token_error_rate": sum(r["errors"] for r in res) / tokens,
                "ppl": math.exp(sum(r["nll"] for r in res) / tokens),
            })
            print(f"[skip-set] {name:13s} k={k:2d} exact {points[-1]['teacher_forced_exact']:.3f} "
                  f"token errors {points[-1]['token_error_rate']:.4f} ppl {points[-1]['ppl']:.3f} "
                  f"dropped {dropped}", flush=True)
    emit_json_line({
        "benchmark": "skip_set_exactness", "model": cfg.model.name, "adapter": args.adapter, "config": args.config,
        "overrides": args.overrides, "calibration_steps": len(calibration), "eval_steps": len(steps),
        "eval_step_ids": [s.id for s in steps], "single_drop_costs": costs, "points": points,
        "greedy_paths": greedy_paths, "greedy_candidates": args.greedy_candidates,
        "threads": torch.get_num_threads(), "wall_s": round(time.perf_counter() - t0, 1),
    }, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
