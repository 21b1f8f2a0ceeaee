"""Greedy tool-call accuracy of one adapter with chosen blocks removed (forced gates), on the accuracy steps.

Separates *which blocks are skipped* from *how the adapter was trained*: e.g. an adapter trained to skip blocks
[4, 10, 25] scored with [10, 21, 25] removed instead, or a LoRA trained at full depth scored with each recipe's
skip set. The steps are the ones `layerroute eval` draws for free-running accuracy with the same data, eval seed and
count (`eval.accuracy_steps_per_type={"tool_call": N}` drawn from the whole eval split), so the verdicts pair
step by step with that evaluation's (`benchmarks/paired_accuracy.py` reads both kinds of file).

    OMP_NUM_THREADS=1 python benchmarks/forced_skip_accuracy.py --adapter runs/ablation/X-s0/train/adapter \\
        --skip none --skip 4,10,25 --skip 10,21,25 --steps 48 --output benchmarks/results/forced_skip_X.json

Each --skip is one configuration (comma-separated block indices, or `none` for full depth). The output has, per
configuration, the accuracy, the teacher-forced exact match, each step's verdict, and the paired difference from
the first configuration. The last line is the JSON result.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from layerroute.adapters import load_adapter
from layerroute.config import RunConfig, add_adapter_argument, add_config_arguments, raw_config
from layerroute.data.build import load_steps
from layerroute.eval.accuracy import accuracy, paired_accuracy
from layerroute.eval.bench import emit_json_line
from layerroute.eval.sampling import _accuracy_steps


def parse_skip(text: str, n_layers: int) -> list[int]:
    if text == "none":
        return []
    try:
        blocks = sorted({int(b) for b in text.split(",") if b.strip()})
    except ValueError:
        raise SystemExit(f"--skip {text!r}: expected comma-separated block indices or 'none'") from None
    if any(b < 0 or b >= n_layers for b in blocks):
        raise SystemExit(f"--skip {text!r}: block indices must lie in 0..{n_layers - 1}")
    return blocks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_adapter_argument(parser, required=True)
    add_config_arguments(parser, required=False, default="configs/offline-smollm2.yaml")
    parser.add_argument("--skip", action="append", required=True, help="blocks removed, e.g. 4,10,25 (or none)")
    parser.add_argument("--steps", type=int, default=48, help="tool-call steps (the eval's accuracy draw)")
    parser.add_argument("--output", default=None, help="also write the JSON line here (atomically)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")

    t0 = time.perf_counter()
    cfg = RunConfig.from_dict(raw_config(args))
    ecfg = dataclasses.replace(cfg.eval, accuracy_steps_per_type={"tool_call": args.steps, "planning": 0})
    rm = load_adapter(args.adapter, cfg.model)
    rm.model.eval()
    L = rm.num_layers
    skips = [parse_skip(s, L) for s in args.skip]
    data = load_steps(cfg.data, rm.tokenizer)
    all_steps = list(data.eval)
    # the eval's draw: tool calls come first in its one generator, so the perplexity sample does not matter when
    # the count exceeds it (then the draw is from the whole split)
    steps = _accuracy_steps([], {"tool_call": [], "planning": []}, all_steps, ecfg)["tool_call"]
    idx = list(range(len(steps)))
    configs = []
    for blocks in skips:
        pattern = [i not in blocks for i in range(L)]
        res = accuracy(rm, steps, idx, "lora_full_depth" if not blocks else "routed", ecfg,
                       forced=None if not blocks else pattern)
        configs.append({"skip": blocks, **res})
        print(f"[forced-skip] skip {blocks or 'none'}: accuracy {res['accuracy']:.3f} "
              f"teacher-forced exact {res['teacher_forced_exact']:.3f}", flush=True)
    for c in configs[1:]:
        c["paired_vs_first"] = paired_accuracy(configs[0], c, ecfg.bootstrap, ecfg.seed)
    emit_json_line({
        "benchmark": "forced_skip_accuracy", "adapter": args.adapter, "config": args.config,
        "overrides": args.overrides, "steps": len(steps), "eval_seed": ecfg.seed,
        "accuracy": {"tool_call": {f"skip {','.join(map(str, c['skip'])) or 'none'}": c for c in configs}},
        "threads": torch.get_num_threads(), "wall_s": round(time.perf_counter() - t0, 1),
    }, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
