"""The markdown tables of a `benchmarks/lossless_drafts.py` result (docs/results/lossless_drafts.md prints them).

    python benchmarks/lossless_drafts_table.py benchmarks/results/lossless_drafts_qwen2.5-0.5b.json

One table per step type: per configuration the steps, how many outputs equal dense's, tokens and forwards, tokens per
forward, accepted tokens per decode forward by drafter, CPU seconds per step (prefill, decode) and the ratios against
dense and dense + prompt lookup. A header line says the model, dtype, machine and how many steps were done.
"""

from __future__ import annotations

import argparse
import json

COLUMNS = ("configuration", "steps", "identical to dense", "tokens", "forwards", "tokens / forward",
           "accepted / decode forward by drafter", "CPU s / step", "prefill", "decode", "vs dense", "vs lookup",
           "decode vs dense")


def _ratio(table: dict, base: str, row: dict, clock: str = "cpu_s") -> str:
    ref = table.get(base)
    return f"{ref[f'{clock}_per_step'] / row[f'{clock}_per_step']:.2f}" if ref else "-"


def tables(result: dict) -> str:
    m = result.get("machine")
    machine = m if isinstance(m, str) else f"{m['cpu']}, {m['cores']} cores, bf16 native: {m['bf16_native_cpu']}"
    out = [f"{result['model']} ({result['dtype']}), adapter {result.get('adapter')}, {machine}, {result['date']}; "
           f"{result['steps_done']} steps done of {len(result['steps_drawn'])} drawn"
           f"{'' if result.get('complete') else ' (partial)'}"]
    for kind, table in result["summary"].items():
        rows = {c: r for c, r in (table or {}).items() if r}
        if not rows:
            continue
        out += ["", f"{kind}:", "| " + " | ".join(COLUMNS) + " |", "|---" + "|---:" * 5 + "|---" + "|---:" * 6 + "|"]
        for c, r in rows.items():
            by = ", ".join(f"{k} {v['accepted_per_forward']:.2f}" for k, v in r.get("by_source", {}).items()) or "-"
            out.append("| " + " | ".join([
                c, str(r["steps"]), str(r["identical_to_dense"]), str(r["tokens"]), str(r["forwards"]),
                f"{r['tokens_per_forward']:.2f}", by, f"{r['cpu_s_per_step']:.2f}", f"{r['cpu_prefill_s_per_step']:.2f}",
                f"{r['cpu_decode_s_per_step']:.2f}", _ratio(rows, "dense", r), _ratio(rows, "lookup", r),
                _ratio(rows, "dense", r, "cpu_decode_s")]) + " |")
    share = result.get("dense_tool_call_prefill_share")
    if share is not None:
        out += ["", f"prefill share of a dense tool-call step: {100 * share:.1f}%"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", help="a lossless_drafts.py output file (its last line is read)")
    args = parser.parse_args(argv)
    with open(args.result, encoding="utf-8") as f:
        print(tables(json.loads(f.read().strip().splitlines()[-1])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
