"""Is routed generation with prompt-lookup drafting token-identical to routed generation without it?

    OMP_NUM_THREADS=1 python benchmarks/lookup_identity_check.py --adapter runs/qwen/default-s0/adapter \\
        --dtype float32 --steps 16 [--only simple_python_283 --only live_simple_189-114-0]

The adapter's eval tool-call draw (as benchmarks/end_to_end_steps.py), greedy, batch 1, its routers deciding. Drafts
are verified by the model, so any difference is the rounding of a multi-token verification forward (compare the
dtypes) or a bug. Prints one line per step and a JSON summary last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from layerroute.adapters import training_config
from layerroute.config import RunConfig, add_adapter_argument, add_dtype_argument
from layerroute.data.build import load_steps
from layerroute.eval.sampling import _accuracy_steps
from layerroute.infer.generate import inference_weights, load_for_inference, routed_generate, stop_ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_adapter_argument(parser, required=True)
    add_dtype_argument(parser)  # auto here: the adapter's own model.dtype (which may itself be auto)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--only", action="append", default=[], help="a substring of the step ids to keep")
    parser.add_argument("--lookup", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    raw = training_config(args.adapter)
    cfg = RunConfig.from_dict({k: raw.get(k) for k in ("model", "router", "lora", "data", "train", "eval")})
    ecfg = dataclasses.replace(cfg.eval, accuracy_steps_per_type={"tool_call": args.steps, "planning": 0})
    dtype = cfg.model.dtype if args.dtype == "auto" else args.dtype
    rm = load_for_inference(None, args.adapter, dtype=dtype)
    data = load_steps(cfg.data, rm.tokenizer)
    steps = _accuracy_steps([], {"tool_call": [], "planning": []}, list(data.eval), ecfg)["tool_call"]
    steps = [s for s in steps if not args.only or any(o in s.conversation_id for o in args.only)]
    eos = stop_ids(rm)
    rows = []
    with torch.no_grad(), inference_weights(rm):
        for s in steps:
            prompt = list(s.input_ids[: s.context_length])
            plain = routed_generate(rm, [prompt], max_new_tokens=args.max_new_tokens, eos_token_id=eos)
            drafted = routed_generate(rm, [prompt], max_new_tokens=args.max_new_tokens, eos_token_id=eos,
                                      prompt_lookup=args.lookup)
            row = {"step": f"{s.conversation_id}#{s.step_index}", "identical": plain.tokens == drafted.tokens,
                   "same_gates": plain.gates == drafted.gates, "tokens": len(plain.tokens[0]),
                   "tokens_drafted": len(drafted.tokens[0]), "forwards_drafted": drafted.forwards}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps({"adapter": args.adapter, "dtype": dtype, "steps": len(rows),
                      "identical": sum(r["identical"] for r in rows), "same_gates": sum(r["same_gates"] for r in rows)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
