"""Teacher-forced exact match of several adapters on every tool-call step of the eval split, paired step by step.

Free-running accuracy costs a generation per step, so `layerroute eval` scores it on a sample (48 steps in the
offline ablation: a +-10-point interval). `teacher_forced_exact` (the steps greedy decoding reproduces token for
token given the gold prefix) costs one forward per step and is a lower bound on accuracy that tracks it across
configurations (RESULTS.md). Here it is scored on every tool-call step of the eval split (the 242 unseen BFCL live_*
steps and 75 held-out steps of the seen categories offline), for each side ADAPTER:CONFIG, and every side is
paired with the first: the difference in points with a 95% bootstrap interval over steps. CONFIG is
lora_full_depth, routed (the routers decide), or skip=4,10,25 (LoRA on, those blocks removed from every step).
A `+bridge` suffix (skip=4,10,25+bridge, routed+bridge) first gives every block a skip bridge of rank
--bridge-rank fitted in closed form on the first --bridge-steps tool-call training steps (`layerroute.nn.bridge`):
what a linear stand-in recovers without any training. `--reference EARLIER.json[:N]` pairs every side with the N-th
side (default the first) of an earlier result on the same steps instead of scoring a reference again (the step ids
must match).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/exact_match_all.py \\
        --side runs/ablation/lora_only-s0/train/adapter:lora_full_depth \\
        --side runs/ablation/drop_errors_stopgrad_skip10-s0/train/adapter:routed \\
        --output benchmarks/results/exact_match_all.json

Per side: exact match, greedy token error rate, PPL and the mean fraction of blocks skipped (routed: the routers'
decisions at the adapter's threshold), each step's error count, and `paired_vs_first`. The last line is the JSON result.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from layerroute.adapters import load_adapter
from layerroute.calibrate.bridges import fit_bridges
from layerroute.config import RunConfig, add_config_arguments, raw_config
from layerroute.data.build import load_steps
from layerroute.eval.accuracy import paired_accuracy
from layerroute.eval.bench import emit_json_line
from layerroute.eval.teacher_forced import teacher_forced, teacher_forced_exact
from layerroute.nn.bridge import install_bridges
from layerroute.nn.routed import find_routed_layers
from layerroute.special_tokens import pad_token_id

CONFIGS = ("lora_full_depth", "routed", "skip=BLOCKS")
BRIDGE = "+bridge"


def load_reference(spec: str) -> tuple[dict, list[str]]:
    """RESULT.json[:N] -> (the N-th side of an earlier exact_match_all result, the step ids it was scored on)."""
    path, sep, index = spec.rpartition(":")
    if not (sep and index.isdigit()):
        path, index = spec, "0"
    try:
        earlier = json.loads(Path(path).read_text())
        return earlier["sides"][int(index)], earlier["step_ids"]
    except (OSError, ValueError) as e:
        raise SystemExit(f"--reference {spec}: cannot read an exact_match_all result ({e})") from None
    except (KeyError, IndexError):
        raise SystemExit(f"--reference {spec}: not an exact_match_all result with a side {index}") from None


def parse_side(spec: str) -> tuple[str, str, set[int] | None, bool]:
    """ADAPTER:CONFIG -> (adapter, config, the blocks a skip= side removes else None, whether to fit bridges)."""
    adapter, _, config = spec.rpartition(":")
    bridge = config.endswith(BRIDGE)
    base = config[: -len(BRIDGE)] if bridge else config
    if not adapter or not (base in CONFIGS[:2] or base.startswith("skip=")) or (bridge and base == CONFIGS[0]):
        raise SystemExit(f"--side {spec!r}: expected ADAPTER_DIR:CONFIG with CONFIG one of {', '.join(CONFIGS)}, "
                         f"optionally + {BRIDGE!r} after routed or skip=")
    if not base.startswith("skip="):
        return adapter, config, None, bridge
    try:
        return adapter, config, {int(b) for b in base[5:].split(",")}, bridge
    except ValueError:
        raise SystemExit(f"--side {spec!r}: skip= takes comma-separated block indices, e.g. skip=4,10,25") from None


def score_side(rm, steps, config: str, blocks: set[int] | None, cfg) -> dict:
    """One side's teacher-forced summary on `steps`, with per-step verdicts in paired_accuracy's sample format.
    Routed gates are the routers' decisions at the adapter's own threshold, as in `layerroute eval`; `blocks`
    (a skip= side) are removed from every step instead."""
    L = rm.num_layers
    if blocks is not None:
        if any(b < 0 or b >= L for b in blocks):
            raise SystemExit(f"{config}: block indices must lie in 0..{L - 1}")
        pattern = torch.tensor([[j not in blocks for j in range(L)]] * len(steps))
        # "shortgpt" is evaluate's name for LoRA on with forced gates
        res = teacher_forced(rm, steps, "shortgpt", cfg, patterns=pattern, desc=config)
    else:
        res = teacher_forced(rm, steps, config.removesuffix(BRIDGE), cfg, desc=config)
    idx = list(range(len(steps)))
    tokens = sum(r["tokens"] for r in res)
    return {
        "teacher_forced_exact": teacher_forced_exact(res, idx),
        "token_error_rate": sum(r["errors"] for r in res) / max(tokens, 1),
        "ppl": math.exp(sum(r["nll"] for r in res) / max(tokens, 1)),
        "block_skip": sum(L - sum(r["gates"]) for r in res) / (L * len(res)) if res else float("nan"),
        "errors": [r["errors"] for r in res],
        "samples": [{"conversation_id": s.id, "correct": r["errors"] == 0} for s, r in zip(steps, res, strict=True)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", action="append", required=True, metavar="ADAPTER:CONFIG",
                        help="an adapter directory and lora_full_depth or routed; the first is the reference")
    add_config_arguments(parser, required=False, default="configs/offline-smollm2.yaml")
    parser.add_argument("--max-steps", type=int, default=0, help="score only the first N tool-call steps (0 = all)")
    parser.add_argument("--bridge-rank", type=int, default=16, help="rank of the bridges of +bridge sides")
    parser.add_argument("--bridge-steps", type=int, default=32,
                        help="tool-call training steps the +bridge sides fit their bridges on")
    parser.add_argument("--output", default=None, help="also write the JSON line here (atomically)")
    parser.add_argument("--reference", default=None, metavar="RESULT.json[:N]",
                        help="pair every side with the N-th side (default the first, 0) of this earlier result "
                             "(same steps) instead")
    args = parser.parse_args(argv)
    if args.max_steps < 0:
        parser.error("--max-steps must be >= 0")
    if args.bridge_rank < 1 or args.bridge_steps < 1:
        parser.error("--bridge-rank and --bridge-steps must be >= 1")
    sides = [parse_side(s) for s in args.side]
    reference = load_reference(args.reference) if args.reference else None  # a bad one fails before any scoring

    t0 = time.perf_counter()
    cfg = RunConfig.from_dict(raw_config(args))
    steps, calibration, scored, tokenizer_vocab = None, None, [], None
    for adapter, config, blocks, bridge in sides:
        rm = load_adapter(adapter, cfg.model)
        rm.model.eval()
        if steps is None:  # every adapter of one base model shares the tokenizer, so the steps are tokenized once
            split = load_steps(cfg.data, rm.tokenizer)
            steps = [s for s in split.eval if s.step_type == "tool_call"]
            steps = steps[: args.max_steps] if args.max_steps else steps
            calibration = [s for s in split.train if s.step_type == "tool_call"][: args.bridge_steps]
            tokenizer_vocab = len(rm.tokenizer)
            if reference and reference[1] != [s.id for s in steps]:
                raise SystemExit(f"--reference {args.reference}: scored on other steps than these {len(steps)}")
        elif len(rm.tokenizer) != tokenizer_vocab:
            raise SystemExit(f"{adapter}: its tokenizer differs from the first side's; sides must share a base model")
        extra = {}
        if bridge:
            if find_routed_layers(rm.model)[0].bridge is None:
                install_bridges(rm.model, args.bridge_rank)
            explained = fit_bridges(rm, calibration, cfg.eval.batch_size, pad_token_id(rm.tokenizer), cfg.eval.seed)
            extra = {"bridge_rank": args.bridge_rank, "bridge_steps": len(calibration),
                     "bridge_explained": [round(e, 4) for e in explained]}
            print(f"[exact-all] {adapter}: bridges fitted on {len(calibration)} steps, explained "
                  + " ".join(f"{e:.2f}" for e in explained), flush=True)
        side = {"adapter": adapter, "config": config, **extra, **score_side(rm, steps, config, blocks, cfg.eval)}
        scored.append(side)
        print(f"[exact-all] {adapter}:{config}: exact {side['teacher_forced_exact']:.3f} token errors "
              f"{side['token_error_rate']:.4f} ppl {side['ppl']:.3f} block skip {side['block_skip']:.3f}", flush=True)
        del rm
    if reference:
        scored.insert(0, {**reference[0], "from": args.reference})
        scored[0].pop("paired_vs_first", None)
    for side in scored[1:]:
        side["paired_vs_first"] = paired_accuracy(scored[0], side, cfg.eval.bootstrap, cfg.eval.seed)
    emit_json_line({
        "benchmark": "exact_match_all", "config": args.config, "overrides": args.overrides, "steps": len(steps),
        "step_ids": [s.id for s in steps], "sides": scored,
        "threads": torch.get_num_threads(), "wall_s": round(time.perf_counter() - t0, 1),
    }, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
