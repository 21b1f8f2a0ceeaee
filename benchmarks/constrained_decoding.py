"""Constrained vs free decoding of BFCL tool-call steps, dense and forced-skip, in one interleaved run.

For each of the eval's tool-call steps (the draw `layerroute eval` makes for free-running accuracy with the same
data, eval seed and count), every configuration generates greedily, one after the other (the order rotates from
step to step, so machine noise falls on all of them alike):

* ``full_depth`` / ``skip_F``: every block, or a forced pattern skipping the fraction F (`skip_pattern`) of the
  model with the adapter's LoRA (a fresh one, i.e. the base model, without --adapter); ``routed`` (--routed): the
  adapter's own routers decide, as `layerroute eval`'s routed configuration;
* each ``free`` and ``constrained`` (`layerroute.infer.constrain`: calls of the step's own tools with schema-valid
  arguments, several only in BFCL's parallel categories, then end of turn: what `eval.constrained` does,
  `evaluate.step_constraint`).

Per configuration: BFCL AST accuracy (`score_generation`, the eval's scorer), unparsable and misnamed calls
(counts), generated tokens per step, decode time per token, wall time per step and per correct call; for the
constrained ones, the processor's own time per decode step and its ratio to the decode step (the constraint's
per-token cost). Grammar compilation is timed apart (the first compile of each step's tool set; the cache then
serves it).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/constrained_decoding.py --steps 32 \\
        --output benchmarks/results/constrained_decoding_smollm2_cpu_t1.json

``--mask-only TOKENIZER_DIR ...`` measures the constraint alone, without a model: a fixed BFCL-style call is fed
token by token through the processor (random logits as wide as the vocabulary), per tokenizer (e.g. SmolLM2's
49k and Qwen2.5's 152k vocabulary); the cost grows with the vocabulary (the mask is one bit per token).

The last line is the JSON result.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from layerroute.atomic import write_text_atomic
from layerroute.config import (
    RunConfig,
    add_adapter_argument,
    add_config_arguments,
    add_model_argument,
    raw_config,
)
from layerroute.config.flags import OFFLINE_MODEL
from layerroute.data.build import load_steps
from layerroute.data.config import DataConfig
from layerroute.data.toolcalls import parse_tool_calls
from layerroute.eval.accuracy import score_generation, step_constraint
from layerroute.eval.bench import emit_json_line
from layerroute.eval.sampling import _accuracy_steps
from layerroute.infer.constrain import model_grammars
from layerroute.infer.generate import (
    inference_weights,
    load_for_inference,
    routed_generate,
    skip_pattern,
    stop_ids,
)


def bfcl_data(raw: dict) -> DataConfig:
    """The raw config's data section with its BFCL sources only (the tool-call steps; no planning files needed)."""
    data = dict(raw["data"])
    data["sources"] = [s for s in data["sources"] if s.get("name") == "bfcl"]
    return DataConfig.from_dict(data)


def summarize(rows: list[dict]) -> dict:
    n = len(rows)
    correct = sum(r["correct"] for r in rows)
    wall = sum(r["wall_s"] for r in rows)
    out = {
        "n": n, "accuracy": correct / n, "correct": correct,
        "unparsable": sum(r["unparsable"] for r in rows), "misnamed": sum(r["misnamed"] for r in rows),
        "unfinished": sum(not r["finished"] for r in rows),
        "tokens_per_step": sum(r["tokens"] for r in rows) / n,
        "decode_ms_per_token_median": 1e3 * statistics.median(r["decode_s_per_token"] for r in rows
                                                              if r["decode_s_per_token"] == r["decode_s_per_token"]),
        "wall_s_per_step": wall / n, "wall_s_per_correct_call": wall / correct if correct else None,
    }
    procs = [r for r in rows if r.get("processor_steps")]
    if procs:
        per_token = [r["processor_s"] / r["processor_steps"] for r in procs]
        decode = [r["decode_s_per_token"] for r in procs]
        out["constraint_ms_per_token_median"] = 1e3 * statistics.median(per_token)
        out["constraint_ms_per_token_mean"] = 1e3 * sum(r["processor_s"] for r in procs) / sum(
            r["processor_steps"] for r in procs)
        # per step: the processor's time per call over that step's decode time per token (same run)
        ratios = [p / d for p, d in zip(per_token, decode, strict=True) if d == d and d > 0]
        out["constraint_over_decode_median"] = statistics.median(ratios) if ratios else None
        out["constraint_over_decode_max"] = max(ratios) if ratios else None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_argument(parser)
    add_adapter_argument(parser)
    add_config_arguments(parser, required=False, default="configs/offline-smollm2.yaml")
    parser.add_argument("--steps", type=int, default=32, help="eval tool-call steps")
    parser.add_argument("--skip-fraction", type=float, nargs="*", default=[0.25],
                        help="forced-skip configurations (fractions of the blocks)")
    parser.add_argument("--routed", action="store_true",
                        help="also the adapter's own routers deciding (real skipping), free and constrained")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: eval.max_new_tokens_tool")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None, help="also write the JSON line here (atomically)")
    parser.add_argument("--mask-only", nargs="+", default=None, metavar="TOKENIZER_DIR",
                        help="only the constraint's cost per token, replayed on these tokenizers (no model)")
    parser.add_argument("--reps", type=int, default=20, help="--mask-only: replays per tokenizer")
    args = parser.parse_args(argv)
    args.model = args.model or OFFLINE_MODEL  # the packaged offline default
    torch.set_num_threads(args.threads)
    if args.mask_only:
        emit_json_line({"benchmark": "constrained_decoding_mask_only", "threads": torch.get_num_threads(),
                        "tokenizers": {d: mask_cost(d, args.reps) for d in args.mask_only}}, args.output)
        return 0

    t0 = time.perf_counter()
    raw = raw_config(args)
    cfg = RunConfig.from_dict(raw)
    ecfg = dataclasses.replace(cfg.eval, accuracy_steps_per_type={"tool_call": args.steps, "planning": 0})
    budget = args.max_new_tokens or ecfg.max_new_tokens_tool
    rm = load_for_inference(args.model, args.adapter)
    tok = rm.tokenizer
    data = load_steps(bfcl_data(raw), tok)
    steps = _accuracy_steps([], {"tool_call": [], "planning": []}, list(data.eval), ecfg)["tool_call"]
    eos = stop_ids(rm)
    L = rm.num_layers
    depths = [("full_depth", "open")] + [(f"skip_{f:g}", skip_pattern(L, f)) for f in args.skip_fraction]
    if args.routed:
        depths.append(("routed", None))  # forced=None: the trained routers decide per step
    configs = [(f"{d}_{mode}", gates, mode == "constrained") for d, gates in depths for mode in ("free", "constrained")]
    print(f"[constrained] {len(steps)} tool-call steps, {len(configs)} configurations, budget {budget}", flush=True)

    grammars = model_grammars(rm, eos)
    compile_s = []
    rows = {name: [] for name, _, _ in configs}
    with inference_weights(rm):  # LoRA merged once for the whole run (as the eval does)
        for j, step in enumerate(steps):
            c0 = time.perf_counter()
            # the first compile of this tool set, timed apart (the processor below finds it cached)
            grammars.for_tools(step.tools, "required", parallel=step.category is None or "parallel" in step.category)
            compile_s.append(time.perf_counter() - c0)
            offered = {t["function"]["name"] for t in step.tools}
            prompt = [step.input_ids[: step.context_length]]
            for k in range(len(configs)):
                name, gates, constrained = configs[(j + k) % len(configs)]  # rotate the order step by step
                proc = step_constraint(rm, step, eos) if constrained else None  # what eval.constrained does
                w0 = time.perf_counter()
                out = routed_generate(rm, prompt, max_new_tokens=budget, eos_token_id=eos, forced=gates,
                                      kv_policy=ecfg.kv_policy, logits_processor=proc)
                wall = time.perf_counter() - w0
                tokens = out.tokens[0]
                text = tok.decode(tokens, skip_special_tokens=True)
                ok, reason = score_generation(step, text)
                calls, _, error = parse_tool_calls(text)
                rows[name].append({
                    "conversation_id": step.conversation_id, "category": step.category, "correct": bool(ok),
                    "reason": reason, "unparsable": bool(error or not calls),
                    "misnamed": bool(calls and not error and any(c["name"] not in offered for c in calls)),
                    "finished": bool(tokens) and tokens[-1] in eos, "tokens": len(tokens), "wall_s": wall,
                    "decode_s_per_token": out.decode_s_per_token,
                    "processor_s": proc.seconds if proc else None, "processor_steps": proc.steps if proc else None,
                    "text": text[:400],
                })
            print(f"[constrained] step {j + 1}/{len(steps)}: " + ", ".join(
                f"{n} {'ok' if r[-1]['correct'] else 'x'}{r[-1]['tokens']}" for n, r in rows.items()), flush=True)
            if args.output and j + 1 < len(steps):  # the steps so far, in case the run is stopped
                write_text_atomic(args.output, json.dumps(result(args, budget, j + 1, compile_s, rows, t0)) + "\n")
    emit_json_line(result(args, budget, len(steps), compile_s, rows, t0), args.output)
    return 0


MASK_TOOLS = [{"type": "function", "function": {"name": "calc_binomial_probability", "parameters": {
    "type": "object", "required": ["n", "k", "p"], "properties": {
        "n": {"type": "integer"}, "k": {"type": "integer"}, "p": {"type": "number"},
        "method": {"type": "string", "enum": ["exact", "normal"]}, "note": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "math.gcd", "parameters": {
        "type": "object", "required": ["num1", "num2"], "properties": {
            "num1": {"type": "integer"}, "num2": {"type": "integer"}}}}}]
MASK_CALL = [{"name": "calc_binomial_probability",
              "arguments": {"n": 20, "k": 5, "p": 0.6, "method": "exact", "note": "five successes in twenty trials"}}]


def mask_cost(tokenizer_dir: str, reps: int) -> dict:
    """The processor's time per token replaying MASK_CALL (the grammar compiled once, timed apart)."""
    from transformers import AutoTokenizer

    from layerroute.data.toolcalls import render_tool_calls
    from layerroute.infer.constrain import GrammarLogitsProcessor, grammars_for

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos = [tok.convert_tokens_to_ids("<|im_end|>")]
    vocab = max(len(tok), max(tok.get_vocab().values()) + 1)
    vocab = (vocab + 63) // 64 * 64  # model vocabularies are padded (Qwen2.5: 151,936 for 151,665 tokens)
    t0 = time.perf_counter()
    grammars = grammars_for(tok, vocab, eos)
    info_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = grammars.for_tools(MASK_TOOLS, "required", parallel=False)
    compile_s = time.perf_counter() - t0
    ids = tok(render_tool_calls(MASK_CALL), add_special_tokens=False)["input_ids"] + eos
    scores = torch.randn(1, vocab)
    per_token = []
    for _ in range(reps):
        proc = GrammarLogitsProcessor([compiled], eos)
        seq = torch.zeros(1, 1, dtype=torch.long)
        for t in ids:
            proc(seq, scores.clone())
            seq = torch.cat([seq, torch.tensor([[t]])], dim=1)
        assert not proc.released, "the replayed call must follow the grammar"
        per_token.append(proc.seconds / proc.steps)
    return {"vocab": vocab, "tokens": len(ids), "tokenizer_info_s": info_s, "compile_ms": 1e3 * compile_s,
            "ms_per_token_min": 1e3 * min(per_token), "ms_per_token_median": 1e3 * statistics.median(per_token)}


def result(args, budget: int, done: int, compile_s: list[float], rows: dict, t0: float) -> dict:
    return {
        "benchmark": "constrained_decoding", "model": args.model, "adapter": args.adapter, "config": args.config,
        "steps": done, "steps_asked": args.steps, "max_new_tokens": budget, "threads": torch.get_num_threads(),
        "compile_ms": {"median": 1e3 * statistics.median(compile_s), "max": 1e3 * max(compile_s),
                       "total": 1e3 * sum(compile_s)} if compile_s else None,
        "configs": {name: summarize(r) for name, r in rows.items()},
        "samples": rows, "wall_s": round(time.perf_counter() - t0, 1),
    }


if __name__ == "__main__":
    raise SystemExit(main())
