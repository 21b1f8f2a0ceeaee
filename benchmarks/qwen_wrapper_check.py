"""Greedy generation on eval BFCL tool-call steps of configs/offline-qwen2.5-0.5b.yaml, base and an adapter at full
depth: does the call parse with its <tool_call> wrapper, with the bare-JSON form too, and is it right (BFCL AST)?

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/qwen_wrapper_check.py runs/lora30/adapter 12 out.json

The evidence for model.plain_text_tokens (docs/results/qwen2.5-coder-offline.md). Prints one JSON line last.
"""
import json
import random
import sys
import time

import torch

from layerroute.adapters import load_adapter
from layerroute.config import ModelConfig, RunConfig
from layerroute.data.build import load_steps
from layerroute.data.toolcalls import parse_tool_calls
from layerroute.eval.accuracy import score_generation
from layerroute.infer.generate import inference_weights, routed_generate, stop_ids

torch.set_num_threads(1)
adapter, n, out_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = RunConfig.from_yaml("configs/offline-qwen2.5-0.5b.yaml")
cfg.data.sources = [s for s in cfg.data.sources if s.name == "bfcl"]
rm = load_adapter(adapter, ModelConfig(name="qwen2.5-coder-0.5b-instruct", dtype="auto", device="cpu"))
data = load_steps(cfg.data, rm.tokenizer)
tools = [s for s in data.eval if s.step_type == "tool_call"]
print("eval tool-call steps (bfcl only):", len(tools), "of which live_*:", sum((s.category or "").startswith("live") for s in tools), flush=True)
random.Random(0).shuffle(tools)
steps = tools[:n]
eos = stop_ids(rm)
res = {}
for config in ("base", "lora_full_depth"):
    weights = rm.lora_disabled() if config == "base" else inference_weights(rm)
    rows = []
    c0, t0, ntok = time.process_time(), time.time(), 0
    with weights:
        for s in steps:
            out = routed_generate(rm, [s.context_ids], max_new_tokens=80, eos_token_id=eos, kv_policy="exact",
                                  forced="open", merge_lora=config != "base")
            text = rm.tokenizer.decode(out.tokens[0], skip_special_tokens=True)
            ntok += len(out.tokens[0])
            calls, _, err = parse_tool_calls(text)
            bare_calls, _, _ = parse_tool_calls(text, bare_json=True)
            ok, reason = score_generation(s, text)
            rows.append({"id": s.id, "category": s.category, "wrapped_parse": bool(calls) and err is None,
                         "parse_with_bare_json": bool(bare_calls), "correct": bool(ok), "reason": reason,
                         "text": text[:300], "first_ids": out.tokens[0][:6]})
            print(config, rows[-1]["wrapped_parse"], rows[-1]["correct"], repr(text[:120]), flush=True)
    cpu = time.process_time() - c0
    res[config] = {"n": len(rows), "wrapped_parse": sum(r["wrapped_parse"] for r in rows),
                   "parse_with_bare_json": sum(r["parse_with_bare_json"] for r in rows),
                   "correct": sum(r["correct"] for r in rows), "generated_tokens": ntok,
                   "cpu_s": round(cpu, 1), "wall_s": round(time.time() - t0, 1), "rows": rows}
    print(config, {k: v for k, v in res[config].items() if k != "rows"}, flush=True)
with open(out_path, "w") as f:
    json.dump(res, f, indent=1)
print(json.dumps({c: {k: v for k, v in r.items() if k != "rows"} for c, r in res.items()}))
