"""Constrained answers under a small budget, through the server: tool_choice="required" and json_schema on BFCL prompts.

A real model (SmolLM2, float32 on CPU: no bf16 here) behind `layerroute serve` (in process, `BackgroundServer`,
dense, one request at a time), greedy. For each BFCL prompt (round robin over the config's BFCL categories) and each
budget (``--budgets``, e.g. 48 64 96):

* ``tool_choice="required"`` with its tools, parallel calls allowed (OpenAI's default): does the response carry at
  least one call of an offered function whose arguments are valid under its schema (`jsonschema`)?
* ``response_format`` json_schema (the first tool's parameter schema, strict: "answer with the arguments"): does
  the content parse and validate?

Each under the budget rule (`layerroute.infer.constrain.GrammarLogitsProcessor`, what the server runs) and without it
(``rule_off``: the same server with the rule's budget taken away, the grammar alone). Without the rule a
response cut by the budget still keeps the calls it completed (the server's other fix); ``would_drop`` counts the
cut responses with calls, which the server before this change answered with no call at all. Per prompt the
shortest valid answer in tokens (the rule's `Closer`), so a budget below it is visible. The rule's own time per
decode step is reported apart from the decode time.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/budget_constraints.py --prompts 8 --budgets 48 64 96 \\
        --output benchmarks/results/budget_constraints_smollm2.json

The last line is the JSON result.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import time

import jsonschema
import torch

from layerroute.config import add_config_arguments, add_model_argument, raw_config
from layerroute.config.flags import OFFLINE_MODEL
from layerroute.data.config import DataConfig
from layerroute.data.records import BadRow
from layerroute.data.sources import iter_source
from layerroute.eval.bench import emit_json_line
from layerroute.infer.constrain import json_schema
from layerroute.infer.generate import load_for_inference


def bfcl_prompts(raw: dict, n: int) -> list[dict]:
    """The first `n` BFCL conversations, round robin over the raw config's categories: messages before the gold
    turn."""
    data = dict(raw["data"])
    data["sources"] = [s for s in data["sources"] if s.get("name") == "bfcl"]
    data = DataConfig.from_dict(data)
    src = data.sources[0]
    by_cat: dict[str, list] = {}
    for rec in iter_source(src, data):
        if isinstance(rec, BadRow):
            continue
        by_cat.setdefault(rec.category, []).append(rec)
    out = []
    while len(out) < n and any(by_cat.values()):
        for cat in list(by_cat):
            if by_cat[cat] and len(out) < n:
                rec = by_cat[cat].pop(0)
                out.append({"id": rec.id, "category": cat, "messages": rec.messages[:-1], "tools": rec.tools})
    return out


def check_calls(message: dict, tools: list[dict]) -> tuple[int, int]:
    """(calls, valid calls: an offered function with schema-valid arguments)."""
    specs = {t["function"]["name"]: json_schema(t["function"].get("parameters") or {}) for t in tools}
    calls = message.get("tool_calls") or []
    valid = 0
    for tc in calls:
        name = tc["function"]["name"]
        try:
            jsonschema.validate(json.loads(tc["function"]["arguments"]), specs[name])
            valid += 1
        except (KeyError, json.JSONDecodeError, jsonschema.ValidationError):
            pass
    return len(calls), valid


def post(srv, body: dict) -> dict:
    """One chat completion (plain HTTP: the answer as the server wrote it)."""
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = json.loads(resp.read().decode())
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_argument(parser)
    add_config_arguments(parser, required=False, default="configs/offline-smollm2.yaml")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--budgets", type=int, nargs="+", default=[48, 64, 96])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    args.model = args.model or OFFLINE_MODEL  # the packaged offline default
    torch.set_num_threads(args.threads)
    import xgrammar as xgr

    from layerroute.serve import BackgroundServer, create_app

    t0 = time.perf_counter()
    rm = load_for_inference(args.model, None, dtype="float32")
    prompts = bfcl_prompts(raw_config(args), args.prompts)
    app = create_app(rm, model_name="m", dense=True, max_batch=1, max_tokens_limit=max(args.budgets),
                     prefill_thread=False)
    engine = app.state.engine
    made = []  # every grammar processor the engine builds (the rule's cost per step)
    rule = {"on": True}
    plain_processor = engine.grammar_processor

    def processor(params):
        p = plain_processor(params)
        if not rule["on"]:
            p.budgets = None
        made.append(p)
        return p

    engine.grammar_processor = processor
    rows = []
    with BackgroundServer(app) as srv:
        for i, pr in enumerate(prompts):
            fmt = {"type": "json_schema", "json_schema": {"name": "arguments", "strict": True, "schema": json_schema(
                pr["tools"][0]["function"].get("parameters") or {"type": "object", "properties": {}})}}
            grammars = engine.grammars
            shortest = {}
            for kind, compiled in (("required", grammars.for_tools(pr["tools"], "required")),
                                   ("json_schema", grammars.for_tools(None, "auto", response_format=fmt))):
                path = grammars.closer.closing_tokens(xgr.GrammarMatcher(compiled, override_stop_tokens=engine.eos_ids))
                shortest[kind] = None if path is None else len(path)
            for budget in args.budgets:
                for on in (True, False):
                    rule["on"] = on
                    for kind in ("required", "json_schema"):
                        body = {"model": "m", "messages": pr["messages"], "max_tokens": budget, "temperature": 0}
                        if kind == "required":
                            body.update(tools=pr["tools"], tool_choice="required")
                        else:
                            body.update(response_format=fmt)
                        before = len(made)
                        r = post(srv, body)
                        choice = r["choices"][0]
                        row = {"prompt": pr["id"], "category": pr["category"], "kind": kind, "budget": budget,
                               "rule": on, "shortest": shortest[kind], "finish": choice["finish_reason"],
                               "completion_tokens": r["usage"]["completion_tokens"],
                               "decode_s_per_token": r["layerroute"]["timings"].get("decode_s_per_token")}
                        procs = made[before:]
                        row["rule_s"] = sum(p.budget_seconds for p in procs)
                        row["processor_s"] = sum(p.seconds for p in procs)
                        row["processor_steps"] = sum(p.steps for p in procs)
                        if kind == "required":
                            row["calls"], row["valid_calls"] = check_calls(choice["message"], pr["tools"])
                            row["ok"] = row["valid_calls"] >= 1 and row["valid_calls"] == row["calls"]
                            row["would_drop"] = choice["finish_reason"] == "length" and row["calls"] > 0
                        else:
                            try:
                                jsonschema.validate(json.loads(choice["message"]["content"]), fmt["json_schema"]["schema"])
                                row["ok"] = True
                            except (json.JSONDecodeError, jsonschema.ValidationError, TypeError):
                                row["ok"] = False
                        rows.append(row)
                        print(f"[budget] {i + 1}/{len(prompts)} {pr['category']:<18} {kind:<11} budget {budget:>3} "
                              f"rule {'on ' if on else 'off'} shortest {shortest[kind]}: {row['finish']:<10} "
                              f"ok {row['ok']} {row.get('valid_calls', '')}", flush=True)
    emit_json_line(result(args, prompts, rows, time.perf_counter() - t0), args.output)
    return 0


def result(args, prompts, rows, wall_s: float) -> dict:
    table = {}
    for kind in ("required", "json_schema"):
        for on in (True, False):
            for budget in args.budgets:
                sel = [r for r in rows if r["kind"] == kind and r["rule"] == on and r["budget"] == budget]
                if not sel:
                    continue
                entry = {"n": len(sel), "ok": sum(r["ok"] for r in sel),
                         "budget_holds_shortest": sum(r["shortest"] is not None and r["shortest"] <= budget
                                                      for r in sel),
                         "finish": {f: sum(r["finish"] == f for r in sel) for f in sorted({r["finish"] for r in sel})}}
                if kind == "required":
                    entry["valid_calls"] = sum(r["valid_calls"] for r in sel)
                    entry["would_drop"] = sum(r["would_drop"] for r in sel)
                    if not on:  # the server before this change: no rule, and a cut response dropped every call
                        entry["ok_before_change"] = sum(r["ok"] and r["finish"] != "length" for r in sel)
                table[f"{kind}_rule_{'on' if on else 'off'}_{budget}"] = entry
    ruled = [r for r in rows if r["rule"] and r["processor_steps"]]
    decode = [r["decode_s_per_token"] for r in ruled if r["decode_s_per_token"]]
    return {
        "benchmark": "budget_constraints", "model": args.model, "dtype": "float32", "config": args.config,
        "threads": torch.get_num_threads(), "greedy": True, "parallel_tool_calls": True,
        "machine": "AMD EPYC (AVX2), 2 cores shared with other jobs, no GPU",
        "prompts": [{"id": p["id"], "category": p["category"], "tools": len(p["tools"])} for p in prompts],
        "shortest_tokens": {r["prompt"] + ":" + r["kind"]: r["shortest"] for r in rows},
        "table": table,
        "rule_ms_per_step_mean": 1e3 * sum(r["rule_s"] for r in ruled) / max(1, sum(r["processor_steps"] for r in ruled)),
        "processor_ms_per_step_mean": 1e3 * sum(r["processor_s"] for r in ruled) / max(1, sum(
            r["processor_steps"] for r in ruled)),
        "decode_ms_per_token_median": 1e3 * statistics.median(decode) if decode else None,
        "rows": rows, "wall_s": wall_s,
    }


if __name__ == "__main__":
    raise SystemExit(main())
