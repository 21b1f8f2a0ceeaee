"""Cache policies across the steps of an agent session: quality difference and time saved by cache reuse.

    PYTHONPATH=. python benchmarks/sessions.py --model smollm2-135m-instruct --conversations 4 \
        --skip-fraction 0.25 --threads 1 --output benchmarks/results/sessions_smollm2.json

Conversations: BFCL multi_turn_base (bfcl-eval's data), rendered with the data module's renderer, one assistant
step per user turn holding that turn's ground-truth calls (see `layerroute.infer.session.bfcl_multi_turn`). Each step
both policies generate greedily from the same context, then score the reference reply teacher-forced and
continue from it. Gate schedules:

- ``constant``: the same forced pattern every step. Decisions never change, so the two policies should agree up
  to float error (a check of the machinery, and the pure time saving of cache reuse).
- ``rotating``: the pattern changes from step to step (skip pattern, all open, the pattern shifted by a block):
  the case where kv_preserving's cache (written under earlier steps' gates) differs from exact's re-prefill.
- ``routers`` (with ``--adapter``): the adapter's routers decide.

The last line is the JSON result.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from layerroute.config import add_adapter_argument, add_model_argument
from layerroute.eval.bench import emit_json_line
from layerroute.infer.generate import load_for_inference, skip_pattern
from layerroute.infer.session import bfcl_multi_turn, compare_policies, rotating_patterns


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_argument(p)
    add_adapter_argument(p)
    p.add_argument("--conversations", type=int, default=4)
    p.add_argument("--skip-fraction", type=float, default=0.25)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--schedules", nargs="+", default=["constant", "rotating"],
                   choices=["constant", "rotating", "routers"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rm = load_for_inference(args.model, args.adapter)
    if rm.tokenizer is None:
        raise SystemExit("this model has no tokenizer")
    convs = bfcl_multi_turn(rm.tokenizer, limit=args.conversations)
    L = rm.num_layers
    schedules = {
        "constant": [skip_pattern(L, args.skip_fraction)],
        "rotating": rotating_patterns(L, args.skip_fraction),
        "routers": None,
    }
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    out = {
        "model": rm.identity.get("name"), "adapter": args.adapter, "dtype": rm.dtype, "threads": torch.get_num_threads(),
        "conversations": len(convs), "steps": sum(len(c) for c in convs), "skip_fraction": args.skip_fraction,
        "max_new_tokens": args.max_new_tokens, "command": " ".join(sys.argv), "schedules": {},
    }
    for name in args.schedules:
        if name == "routers" and not args.adapter:
            raise SystemExit("--schedules routers needs --adapter")
        log(f"schedule {name}")
        res = compare_policies(rm, convs, schedule=schedules[name], max_new_tokens=args.max_new_tokens, log=log)
        out["schedules"][name] = {
            "patterns": ["".join("1" if g else "." for g in pat) for pat in schedules[name]] if schedules[name] else None,
            "summary": res["summary"],
            "steps": [{k: v for k, v in r.items() if not k.endswith(("_generated", "_router_logits"))}
                      for r in res["steps"]],
        }
        log(json.dumps(res["summary"]))
    out["wall_s"] = time.perf_counter() - t0
    emit_json_line(out, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
