"""How many BFCL gold calls the issue-36 rendering changes, per shipped config and split, and how many of them the
step's own grammar accepts before and after.

`layerroute.tasks.bfcl.bfcl_gold_calls` renders a step's gold call. Before issue 36 it wrote every argument's first
acceptable value, optional arguments included, in the possible answer's key order; BFCL writes values its own
schema forbids there (``"unit": "N/A"`` outside the enum, ``null`` for a string), and xgrammar writes an object's
keys in the schema's order, so some gold calls were outside their own grammar (``tool_format`` with ``"required"``):
training taught calls a constraint then forbids. Now (``within_schema``) an optional argument whose value its
schema forbids is left out and keys follow the schema's order.

For every config under configs/ with a BFCL source: its conversations (the categories it names, the eval-only
ones included), the split `layerroute.data.build` gives each (`assign_split`: the config's seed and eval
fraction, eval-only categories in eval), and how many gold calls change (an argument left out, or only the key
order). BFCL single-turn conversations are one step each (a step too long for the config's max_length is dropped
later, by the tokenizer; not subtracted here). Then every distinct conversation's gold text
(`render_tool_calls`, what the chat template writes) is walked through its grammar (the SmolLM2 tokenizer; the
grammar is over characters), old and new rendering; the rows still outside are listed with the reason.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/gold_within_schema.py \\
        --output benchmarks/results/gold_within_schema.json

The last line is the JSON result.
"""

from __future__ import annotations

import argparse
import glob
import os
import time
from collections import Counter

import yaml

from layerroute.data.config import DataConfig
from layerroute.data.records import BadRow
from layerroute.data.sources import iter_source
from layerroute.data.splits import assign_split
from layerroute.data.toolcalls import render_tool_calls
from layerroute.eval.bench import emit_json_line
from layerroute.tasks.bfcl import bfcl_categories, bfcl_gold_calls

TOKENIZER = "tests/fixtures/tokenizers/smollm2"


def bfcl_config(path: str) -> tuple[DataConfig, dict] | None:
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    data = dict(raw.get("data") or {})
    sources = [s for s in data.get("sources") or [] if s.get("name") == "bfcl"]
    if not sources:
        return None
    data["sources"] = sources
    return DataConfig.from_dict(data), sources[0]


def gold(rec, within_schema: bool) -> list[dict]:
    return bfcl_gold_calls(rec.meta["possible_answer"], [t["function"] for t in rec.tools],
                           within_schema=within_schema)


def walk(grammars, rec, calls) -> bool:
    import xgrammar as xgr

    m = xgr.GrammarMatcher(grammars.for_tools(rec.tools, "required"))
    return m.accept_string(render_tool_calls(calls)) and m.is_completed()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="*", default=None, help="default: every configs/*.yaml with a BFCL source")
    parser.add_argument("--no-walk", action="store_true", help="only the counts (the grammar walk takes minutes)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    paths = args.configs or sorted(glob.glob("configs/*.yaml"))
    records: dict[str, object] = {}
    per_config = {}
    for path in paths:
        found = bfcl_config(path)
        if found is None:
            continue
        cfg, src_raw = found
        src = cfg.sources[0]
        eval_only = set(cfg.bfcl_eval_only_categories or [])
        counts = {split: Counter() for split in ("train", "eval")}
        for rec in iter_source(src, cfg):
            if isinstance(rec, BadRow):
                continue
            records.setdefault(rec.id, rec)
            split = assign_split(rec.id, seed=cfg.seed, eval_fraction=cfg.eval_fraction, role=src.role,
                                 eval_only=rec.category in eval_only)
            old, new = gold(rec, False), gold(rec, True)
            assert [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                    for c in rec.messages[-1]["tool_calls"]] == new  # what the data pipeline renders now
            c = counts[split]
            c["steps"] += 1
            if render_tool_calls(old) != render_tool_calls(new):
                c["changed"] += 1
                dropped = sum(len(o["arguments"]) - len(n["arguments"]) for o, n in zip(old, new, strict=True))
                c["changed_argument_left_out" if dropped else "changed_key_order_only"] += 1
                c["arguments_left_out"] += dropped
        per_config[os.path.basename(path)] = {
            "categories": bfcl_categories(src), "seed": cfg.seed, "eval_fraction": cfg.eval_fraction,
            **{split: dict(c) for split, c in counts.items()}}
        print(f"[gold] {path}: {per_config[os.path.basename(path)]}", flush=True)
    result = {"benchmark": "gold_within_schema", "configs": per_config, "conversations": len(records)}
    if not args.no_walk:
        from transformers import AutoTokenizer

        from layerroute.infer.constrain import grammars_for

        grammars = grammars_for(AutoTokenizer.from_pretrained(TOKENIZER), None, None)
        outside = {"old": [], "new": []}
        for i, rec in enumerate(sorted(records.values(), key=lambda r: r.id)):
            for kind, within in (("old", False), ("new", True)):
                if not walk(grammars, rec, gold(rec, within)):
                    outside[kind].append(rec.id)
            if (i + 1) % 250 == 0:
                print(f"[gold] walked {i + 1}/{len(records)}: outside old {len(outside['old'])}, "
                      f"new {len(outside['new'])}", flush=True)
        result["walk"] = {"tokenizer": TOKENIZER, "grammar": "tool_format(tools, 'required')",
                          "outside_old": len(outside["old"]), "outside_new": len(outside["new"]),
                          "outside_new_ids": outside["new"],
                          "outside_by_category_old": dict(Counter(records[i].category for i in outside["old"])),
                          "outside_by_category_new": dict(Counter(records[i].category for i in outside["new"]))}
    result["wall_s"] = time.perf_counter() - t0
    emit_json_line(result, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
