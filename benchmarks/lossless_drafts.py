"""Lossless drafts on real eval steps (issue 36): dense greedy decoding against the same decoding with drafts verified
in one forward (`layerroute.infer.drafts`), each step generated to its OWN end of turn, batch 1, one thread.

    OMP_NUM_THREADS=1 python benchmarks/lossless_drafts.py --config configs/offline-smollm2.yaml \\
        --set model.dtype=float32 --steps 48 --planning 12 --output benchmarks/results/lossless_drafts_smollm2.json

Steps: the config's eval tool-call draw (`eval.accuracy_steps_per_type` with tool_call = --steps) and its GSM8K
planning draw (--planning); tool-call steps decode under their own grammar (`tool_format` "required", parallel calls
only in the BFCL categories that ask for them: `layerroute.eval.accuracy.step_constraint`'s rule), planning steps
freely. Without --adapter the base model runs (LoRA off).

Configurations (each step runs them all, in a rotating order):
  dense                  transformers' generate() (+ the grammar's logits processor): the reference
  loop                   the verify loop here without drafts (its own overhead against generate())
  lookup                 prompt lookup only, verified by the loop here (under the grammar)
  grammar_lookup         the grammar's forced text (whole), then prompt lookup
  grammar_short_lookup   the same, the forced text one token short
  grammar_lookup_suffix  grammar + lookup + a suffix store of earlier steps' outputs with the same tools
Per configuration: CPU seconds per step (prefill and decode apart), tokens, forwards, accepted draft tokens per
forward by drafter, and how many outputs equal dense's token for token.

--budget-rule: every configuration decodes tool calls under the grammar's budget rule with the step's budget
(`layerroute.infer.closer`; what the server and `generate --constrain` run): dense through
`GrammarLogitsProcessor(budgets=...)`, the drafted ones through the verify loop's own rule (``closer``). With a tool
budget below the calls' lengths (``--set eval.max_new_tokens_tool=40``) the rule closes many calls early; the
outputs must still equal dense's. Per configuration the steps where the rule narrowed a choice are counted
(``rule_engaged``), and for dense the steps whose answer holds at least one complete call (``with_complete_call``,
read as a response cut by length is read: the calls it completed).

    OMP_NUM_THREADS=1 python benchmarks/lossless_drafts.py --config configs/offline-smollm2.yaml \
        --set model.dtype=float32 --set eval.max_new_tokens_tool=40 --steps 24 --planning 0 --budget-rule \
        --configs dense,lookup,grammar_lookup --output benchmarks/results/lossless_drafts_smollm2_budget40.json Resumable: the per-step rows are written
(atomically) to --output after every step and a rerun continues after the last one. The last line printed is the
JSON result.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import time

import torch
from transformers import DynamicCache

from layerroute.config import LoraSettings, RunConfig, add_adapter_argument, add_config_arguments, raw_config
from layerroute.data.build import load_steps
from layerroute.data.toolcalls import parse_tool_calls
from layerroute.eval.bench import emit_json_line
from layerroute.eval.sampling import _accuracy_steps
from layerroute.infer.constrain import GrammarLogitsProcessor, model_grammars
from layerroute.infer.drafts import DraftPolicy, SuffixStores, make_drafters
from layerroute.infer.generate import inference_weights, plain_blocks, run_generate, stop_ids
from layerroute.infer.stop import StopRule
from layerroute.infer.verify import draft_generate, tally_drafts
from layerroute.model import machine

CONFIGS = {
    "dense": None,
    "loop": ("", "full"),
    "lookup": ("lookup", "full"),
    "grammar_lookup": ("grammar,lookup", "full"),
    "grammar_short_lookup": ("grammar,lookup", "short"),
    "grammar_lookup_suffix": ("grammar,lookup,suffix", "full"),
}


def load_model(args, cfg):
    from layerroute.adapters import build_routed_model
    from layerroute.infer.generate import load_for_inference

    if args.adapter:
        return load_for_inference(None, args.adapter, dtype=cfg.model.dtype, device=cfg.model.device)
    rm = build_routed_model(cfg.model, lora_cfg=LoraSettings(enabled=False))
    for p in rm.model.parameters():
        p.requires_grad_(False)
    rm.model.eval()
    return rm


def step_key(step) -> str:
    return f"{step.conversation_id}#{step.step_index}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    add_adapter_argument(parser)
    parser.add_argument("--steps", type=int, default=48, help="eval tool-call steps")
    parser.add_argument("--planning", type=int, default=12, help="eval planning (GSM8K) steps")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="which configurations (comma-separated)")
    parser.add_argument("--budget-rule", action="store_true",
                        help="tool calls under the grammar's budget rule (module doc)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", required=True, help="result file (per-step rows kept here; resumable)")
    args = parser.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or "dense" not in configs:
        parser.error(f"--configs: unknown {unknown} (choose from {list(CONFIGS)}; dense is needed)")
    torch.set_num_threads(args.threads)

    cfg = RunConfig.from_dict(raw_config(args))
    ecfg = dataclasses.replace(cfg.eval, accuracy_steps_per_type={"tool_call": args.steps, "planning": args.planning})
    rm = load_model(args, cfg)
    data = load_steps(cfg.data, rm.tokenizer)
    drawn = _accuracy_steps([], {"tool_call": [], "planning": []}, list(data.eval), ecfg)
    steps = drawn["tool_call"] + drawn["planning"]
    eos = stop_ids(rm)
    eos_set = set(eos)
    grammars = model_grammars(rm, eos)
    pad = rm.tokenizer.pad_token_id if rm.tokenizer.pad_token_id is not None else eos[0]

    rows: dict[str, list[dict]] = {c: [] for c in configs}
    if os.path.exists(args.output):  # resume
        with open(args.output, encoding="utf-8") as f:
            old = json.loads(f.read().strip().splitlines()[-1])
        # the same draw and no configuration the old run lacks: its rows for these configurations are kept
        same = (old.get("steps_drawn") == [step_key(s) for s in steps]
                and bool(old.get("budget_rule")) == args.budget_rule
                and old.get("max_new_tokens_tool") == cfg.eval.max_new_tokens_tool)
        if set(configs) <= set(old.get("configs_run", ())) and same:
            n = min(len(old["rows"][c]) for c in configs)
            rows = {c: old["rows"][c][:n] for c in configs}
    done = len(rows["dense"])
    suffix = SuffixStores()

    def save(final: bool = False) -> dict:
        result = summarise(rows, configs, steps, rm, cfg, args, final, eos_set)
        emit_json_line(result, args.output) if final else write_rows(args.output, result)
        return result

    with torch.no_grad(), inference_weights(rm) as model, plain_blocks(model):
        for i, step in enumerate(steps):
            tool = step.step_type == "tool_call" and bool(step.tools)
            parallel = step.category is None or "parallel" in step.category
            grammar = grammars.for_tools(step.tools, "required", parallel=parallel) if tool else None
            closer = grammars.closer if grammar is not None and args.budget_rule else None
            budget = ecfg.max_new_tokens_tool if step.step_type == "tool_call" else ecfg.max_new_tokens_planning
            tools_key = hashlib.sha1(json.dumps(step.tools, sort_keys=True).encode()).hexdigest()
            prompt = list(step.input_ids[: step.context_length])
            if i < done:  # resumed: the suffix store still learns this step's output
                suffix.get(tools_key).add(rows["dense"][i]["output"])
                continue
            order = configs[i % len(configs):] + configs[: i % len(configs)]
            out_rows = {}
            for c in order:
                if c == "dense":
                    ids = torch.tensor([prompt])
                    proc = (GrammarLogitsProcessor([grammar], eos, budgets=budget if closer else None, closer=closer)
                            if grammar is not None else None)
                    start = time.process_time()
                    out, t = run_generate(model, ids, torch.ones_like(ids), cache=DynamicCache(),
                                          max_new_tokens=budget, eos_token_id=eos, pad_token_id=pad,
                                          logits_processor=proc)
                    cpu = time.process_time() - start
                    tokens = StopRule(budget, stop_ids=frozenset(eos)).cut(out[0, len(prompt):].tolist())
                    row = {"cpu_s": cpu, "cpu_prefill_s": t["cpu_ttft_s"], "cpu_decode_s": cpu - t["cpu_ttft_s"],
                           "tokens": len(tokens), "forwards": t["forwards"], "by_source": {}, "output": tokens,
                           "rule_closed": proc.closed if proc is not None else 0}
                    if tool:  # does the answer hold complete calls (the ones a cut response keeps)?
                        text = rm.tokenizer.decode(tokens, skip_special_tokens=True)
                        calls, _, error = parse_tool_calls(text, cut=not tokens or tokens[-1] not in eos_set)
                        row["complete_calls"] = 0 if error else len(calls)
                else:
                    names, mode = CONFIGS[c]
                    store = suffix.get(tools_key)
                    drafters = make_drafters(names, rm.tokenizer, suffix_store=store, grammar_mode=mode)
                    for d in drafters:  # the store learns from dense's output below, once per step
                        if d.name == "suffix":
                            d.learn = False
                    start = time.process_time()
                    r = draft_generate(model, prompt, max_new_tokens=budget, stop_ids=eos, grammar=grammar,
                                       closer=closer, drafters=drafters, policy=DraftPolicy())
                    cpu = time.process_time() - start
                    row = {"cpu_s": cpu, "cpu_prefill_s": r.cpu_prefill_s, "cpu_decode_s": cpu - r.cpu_prefill_s,
                           "tokens": len(r.tokens), "forwards": r.forwards, "by_source": r.by_source(),
                           "output": r.tokens, "rule_closed": r.closed}
                out_rows[c] = row
            suffix.get(tools_key).add(out_rows["dense"]["output"])
            for c in configs:
                r = out_rows[c]
                r.update(step=step_key(step), step_type=step.step_type, category=step.category,
                         prompt_tokens=len(prompt), identical=r["output"] == out_rows["dense"]["output"])
                rows[c].append(r)
            print(f"[{i + 1}/{len(steps)}] {step_key(step)} {step.step_type} "
                  + " ".join(f"{c}={out_rows[c]['cpu_s']:.2f}s/{out_rows[c]['forwards']}f" for c in configs),
                  flush=True)
            save()
    save(final=True)
    return 0


def write_rows(path: str, result: dict) -> None:
    from layerroute.atomic import write_text_atomic

    write_text_atomic(path, json.dumps(result) + "\n")


def summarise(rows, configs, steps, rm, cfg, args, final: bool, eos: set[int]) -> dict:
    def summary(c, kind):
        rs = [r for r in rows[c] if r["step_type"] == kind]
        if not rs:
            return None
        out = {"steps": len(rs), "identical_to_dense": sum(r["identical"] for r in rs),
               "rule_engaged": sum(r.get("rule_closed", 0) > 0 for r in rs),
               "finish_length": sum(r["tokens"] > 0 and r["output"][-1] not in eos for r in rs),
               "with_complete_call": sum(r.get("complete_calls", 0) > 0 for r in rs),
               "tokens": sum(r["tokens"] for r in rs), "forwards": sum(r["forwards"] for r in rs)}
        out["tokens_per_forward"] = out["tokens"] / max(out["forwards"], 1)
        for clock in ("cpu_s", "cpu_prefill_s", "cpu_decode_s"):
            out[f"{clock}_per_step"] = sum(r[clock] for r in rs) / len(rs)
        # accepted drafts per decode forward (the prefill's forward excluded), by drafter: `tally_drafts`
        tally = tally_drafts(rs)
        out["by_source"] = {s: {"drafted": v["drafted"], "accepted": v["accepted"],
                                "accepted_per_forward": v["accepted_per_decode_forward"]}
                            for s, v in tally["by_source"].items()}
        out["tokens_per_decode_forward"] = tally["tokens_per_decode_forward"]
        return out

    configs_out = {kind: {c: summary(c, kind) for c in configs} for kind in ("tool_call", "planning")}
    ratios = {}
    for kind, table in configs_out.items():
        for base in ("dense", "lookup"):
            if table.get(base) is None:
                continue
            for c, s in table.items():
                if c != base and s is not None:
                    for clock in ("cpu_s", "cpu_decode_s"):
                        ratios[f"{kind}:{clock}:{c}_vs_{base}"] = (table[base][f"{clock}_per_step"]
                                                                   / s[f"{clock}_per_step"])
    dense_tool = configs_out["tool_call"].get("dense")
    prefill_share = (dense_tool["cpu_prefill_s_per_step"] / dense_tool["cpu_s_per_step"]) if dense_tool else None
    return {
        "benchmark": "lossless_drafts", "config": args.config, "overrides": args.overrides, "adapter": args.adapter,
        "model": cfg.model.name, "dtype": rm.dtype, "machine": machine(),  # the dtype used (auto resolved)
        "threads": args.threads, "date": time.strftime("%Y-%m-%d"), "complete": final,
        "budget_rule": args.budget_rule,
        "steps_drawn": [step_key(s) for s in steps], "steps_done": len(rows["dense"]),
        "max_new_tokens_tool": cfg.eval.max_new_tokens_tool, "max_new_tokens_planning": cfg.eval.max_new_tokens_planning,
        "configs_run": configs, "summary": configs_out, "speedup": ratios,
        "dense_tool_call_prefill_share": prefill_share, "rows": rows,
    }


if __name__ == "__main__":
    raise SystemExit(main())
