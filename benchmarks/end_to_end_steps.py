"""What a user feels on real tool-call steps: dense, dense + prompt lookup, routed, routed + prompt lookup, each
generating until its OWN end of turn (issue 23, item 7 and the README headline).

    OMP_NUM_THREADS=1 python benchmarks/end_to_end_steps.py --adapter runs/qwen/default-s0/adapter --steps 16 \\
        [--lookup 10] [--output benchmarks/results/end_to_end_qwen2.5-coder_cpu_t1.json]

The steps are the adapter's eval tool-call draw (the config it was trained with: `eval.accuracy_steps_per_type`
with `tool_call` = --steps), greedy, batch 1, with the eval's tool-call budget and end-of-turn tokens. Unlike
`layerroute bench --steps-from` (equal lengths, `eos_token_id=None`), a configuration that breaks a call may run on
to its budget, and that time counts. Per configuration: wall and process-CPU time per step, generated tokens,
model forwards (tokens per forward > 1 when lookup drafts were accepted), correct calls (BFCL AST) and
**time per correct call**. Lookup drafts are verified by the model, so `dense_lookup` must equal `dense` and
`routed_lookup` must equal `routed` token for token (up to the rounding of a multi-token forward: counted).

An adapter evaluated with `eval.prompt_full_depth` (the per-step routers of `layerroute fit-routers`) is routed the
same way here: the prompt's prefill runs every block, the decision applies to the generated tokens; `routed_lookup`
is then left out (prompt lookup needs the prompt routed too: `routing` refuses the pair).

The configurations run each step in a rotating order (the machine is shared: compare within a run). One
thread: CPU seconds are a core's seconds, the headline here; wall seconds are reported beside them. The last line
printed is the JSON result.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from layerroute.adapters import training_config
from layerroute.config import RunConfig, add_adapter_argument
from layerroute.data.build import load_steps
from layerroute.eval.accuracy import score_generation
from layerroute.eval.bench import emit_json_line
from layerroute.eval.sampling import _accuracy_steps
from layerroute.infer.generate import (
    inference_weights,
    load_for_inference,
    plain_blocks,
    routed_generate,
    run_generate,
    stop_ids,
)
from layerroute.infer.stop import StopRule
from layerroute.model import machine

CONFIGS = ("dense", "dense_lookup", "routed", "routed_lookup")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_adapter_argument(parser, required=True)
    parser.add_argument("--steps", type=int, default=16, help="eval tool-call steps")
    parser.add_argument("--lookup", type=int, default=10, help="prompt_lookup_num_tokens (transformers' default 10)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="tool-call budget (default: the adapter's eval.max_new_tokens_tool)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None, help="also write the JSON line here (atomically)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.lookup < 1:
        parser.error("--steps and --lookup must be >= 1")
    torch.set_num_threads(args.threads)

    raw = training_config(args.adapter)
    cfg = RunConfig.from_dict({k: raw.get(k) for k in ("model", "router", "lora", "data", "train", "eval")})
    ecfg = dataclasses.replace(cfg.eval, accuracy_steps_per_type={"tool_call": args.steps, "planning": 0})
    rm = load_for_inference(None, args.adapter, dtype=cfg.model.dtype, device=cfg.model.device)
    rm.model.eval()
    data = load_steps(cfg.data, rm.tokenizer)
    steps = _accuracy_steps([], {"tool_call": [], "planning": []}, list(data.eval), ecfg)["tool_call"]
    eos = stop_ids(rm)
    eos_set = set(eos)
    budget = args.max_new_tokens or ecfg.max_new_tokens_tool
    pad = rm.tokenizer.pad_token_id if rm.tokenizer.pad_token_id is not None else eos[0]

    full_prompt = ecfg.prompt_full_depth
    configs = tuple(c for c in CONFIGS if not (full_prompt and c == "routed_lookup"))
    rows = {c: [] for c in configs}
    with torch.no_grad(), inference_weights(rm) as model:
        for i, step in enumerate(tqdm(steps, desc="real tool-call steps", unit="step")):
            prompt = list(step.input_ids[: step.context_length])
            ids = torch.tensor([prompt])
            mask = torch.ones_like(ids)
            k = i % len(configs)
            order = configs[k:] + configs[:k]  # rotate who goes first
            for c in order:
                lookup = args.lookup if c.endswith("lookup") else 0
                start, cpu_start = time.perf_counter(), time.process_time()
                if c.startswith("dense"):
                    with plain_blocks(model):
                        out, t = run_generate(model, ids, mask, cache=DynamicCache(), max_new_tokens=budget,
                                              eos_token_id=eos, pad_token_id=pad, prompt_lookup=lookup)
                    tokens = StopRule(budget, stop_ids=frozenset(eos_set)).cut(out[0, len(prompt):].tolist())
                    forwards, gates = t["forwards"], None
                else:
                    r = routed_generate(rm, [prompt], max_new_tokens=budget, eos_token_id=eos, prompt_lookup=lookup,
                                        kv_policy=ecfg.kv_policy, prompt_full_depth=full_prompt)
                    tokens, forwards, gates = r.tokens[0], r.forwards, r.gates[0]
                wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
                text = rm.tokenizer.decode(tokens, skip_special_tokens=True)
                ok, reason = score_generation(step, text)
                rows[c].append({"step": f"{step.conversation_id}#{step.step_index}", "wall_s": wall, "cpu_s": cpu,
                                "tokens": len(tokens), "forwards": forwards, "correct": bool(ok), "reason": reason,
                                "ended": bool(tokens) and tokens[-1] in eos_set, "output": tokens,
                                "skipped_blocks": None if gates is None else gates.count(False)})

    def summary(c):
        rs = rows[c]
        correct = sum(r["correct"] for r in rs)
        out = {"correct": correct, "accuracy": correct / len(rs), "tokens": sum(r["tokens"] for r in rs),
               "forwards": sum(r["forwards"] for r in rs), "ended_own_turn": sum(r["ended"] for r in rs)}
        out["tokens_per_forward"] = out["tokens"] / max(out["forwards"], 1)
        for clock in ("wall_s", "cpu_s"):
            total = sum(r[clock] for r in rs)
            out[f"{clock}_total"] = total
            out[f"{clock}_per_step"] = total / len(rs)
            out[f"{clock}_per_token"] = total / max(out["tokens"], 1)
            out[f"{clock}_per_correct_call"] = total / correct if correct else None
        return out

    summaries = {c: summary(c) for c in configs}
    identical = {f"{c}_vs_{base}": sum(a["output"] == b["output"] for a, b in zip(rows[base], rows[c], strict=True))
                 for base, c in (("dense", "dense_lookup"), ("routed", "routed_lookup"), ("dense", "routed"))
                 if c in rows}
    speedup = {}
    for clock in ("wall_s", "cpu_s"):
        for base in ("dense", "dense_lookup"):
            for c in configs:
                if c != base:
                    speedup[f"{clock}:{c}_vs_{base}:per_step"] = (summaries[base][f"{clock}_total"]
                                                                  / summaries[c][f"{clock}_total"])
                    per_correct = summaries[c][f"{clock}_per_correct_call"]
                    speedup[f"{clock}:{c}_vs_{base}:per_correct_call"] = (
                        summaries[base][f"{clock}_per_correct_call"] / per_correct
                        if per_correct and summaries[base][f"{clock}_per_correct_call"] else None)
    skipped = [r["skipped_blocks"] for r in rows["routed"]]
    emit_json_line({
        "benchmark": "end_to_end_steps", "adapter": args.adapter, "model": cfg.model.name, "dtype": rm.dtype,
        "machine": machine(), "threads": args.threads,
        "date": time.strftime("%Y-%m-%d"), "steps": len(steps), "max_new_tokens": budget, "lookup": args.lookup,
        "kv_policy": ecfg.kv_policy, "prompt_full_depth": full_prompt, "context_tokens_mean": statistics.mean(s.context_length for s in steps),
        "blocks": rm.num_layers, "routed_skipped_blocks_mean": statistics.mean(skipped),
        "configs": summaries, "identical_outputs": identical, "speedup": speedup,
        "per_step": {c: [{k: v for k, v in r.items() if k != "output"} for r in rows[c]] for c in configs},
    }, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
