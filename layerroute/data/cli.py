"""`layerroute data --config <yaml> [--overlay YAML ...] [--set data.key=value ...] (--stats | --show N)`.

The YAML file has a top-level `data:` section (see DataConfig); other sections (`model:`, `train:`, ...) are
ignored except `model.tokenizer` (else `model.name`), which names the tokenizer that renders the data as training
does, and `model.chat_template`. `--stats` prints the statistics as a few tables on stdout (`--stats --json`: the
whole statistics JSON instead; `--output FILE` also writes it there; the rejected-row summary goes to stderr); `--show N` prints N rendered steps,
alternating tool-call and planning, with the label span wrapped in ⟦ ⟧.

Runs standalone as `python -m layerroute.data.cli ...`.
"""

from __future__ import annotations

import argparse
import json
import sys

from layerroute.atomic import write_text_atomic
from layerroute.config import add_config_arguments, add_json_argument, add_output_argument, raw_config
from layerroute.errors import ConfigError

SHOW_OPEN, SHOW_CLOSE = "⟦", "⟧"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)  # its data: section (and model.tokenizer / model.name)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--stats", action="store_true", help="print statistics as tables (with --json: as JSON)")
    what.add_argument(
        "--show", type=int, metavar="N", help="print N rendered steps with the label span marked"
    )
    parser.add_argument(
        "--split", default="train", choices=("train", "eval", "eval_length_matched"), help="split for --show"
    )
    parser.add_argument(
        "--tokenizer", default=None, help="render with this tokenizer instead of model.tokenizer's / model.name's"
    )
    add_json_argument(parser)  # with --stats
    add_output_argument(parser)  # with --stats: the whole statistics JSON


def _pick_show(steps: list, n: int) -> list:
    """Up to n steps alternating tool_call / planning, in a fixed pseudo-random order."""
    from layerroute.data.splits import hash_fraction

    by_type: dict[str, list] = {}
    for s in sorted(steps, key=lambda s: hash_fraction(s.id, 0)):
        by_type.setdefault(s.step_type, []).append(s)
    queues = [by_type.get("tool_call", []), by_type.get("planning", [])]
    out = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def _spread(p: dict) -> str:
    """'median (p5-p95)' of a `percentiles` dict, or '-' for an empty one."""
    return f"{p['p50']} ({p['p5']}-{p['p95']})" if p else "-"


def stats_table(stats: dict) -> str:
    """`data.stats()` as a few terminal tables (~30 lines; the JSON has ~400): steps per source and split, per
    category, length spread per split and step type, the length-matched subset and any rejections."""
    from tabulate import tabulate

    lines = [f"tokenizer {stats['tokenizer']}, max_length {stats['max_length']}, eval_fraction "
             f"{stats['eval_fraction']}, seed {stats['seed']}" + (
                 f"; eval only: {', '.join(stats['eval_only_categories'])}" if stats.get("eval_only_categories")
                 else ""), ""]
    rows = []
    for source, by_type in stats["counts"].items():
        read = stats["rows"].get(source, {})
        too_long = stats["dropped_too_long"].get(source, {})
        rejected = sum(stats["rejected_rows"].get(source, {}).values())
        for t, by_split in by_type.items():
            if not any(by_split.values()) and not too_long.get(t):
                continue  # a source gives one step type
            rows.append([source, t, read.get("rows"), too_long.get(t, 0), rejected, read.get("duplicates", 0),
                         by_split["train"], by_split["eval"], by_split["eval_length_matched"]])
    for t, _ in stats["totals"]["train"].items():
        rows.append(["total", t, None, None, None, None] + [stats["totals"][s][t] for s in
                                                      ("train", "eval", "eval_length_matched")])
    lines.append(tabulate(rows, ["source", "step type", "rows read", "too long", "rejected", "duplicates",
                                 "train", "eval", "eval matched"], intfmt=",", missingval=""))
    lines.append("")
    too_long = stats.get("dropped_too_long_by_category", {})
    cats = [[c, v["train"], v["eval"], v["eval_length_matched"], too_long.get(c, 0)]
            for c, v in stats["categories"].items()]
    lines.append(tabulate(cats, ["category", "train", "eval", "eval matched", "too long"], intfmt=","))
    lines.append("")
    lengths = [[split, t, _spread(v["context_length"]), _spread(v["step_length"]), _spread(v["total_length"])]
               for split, by_type in stats["length_percentiles"].items() for t, v in by_type.items()]
    lines.append(tabulate(lengths, ["split", "step type", "context tokens", "step tokens", "total tokens"]))
    lines.append("(median (5th-95th percentile))")
    lm = stats.get("length_matched") or {}
    if lm:
        lines.append(f"length-matched subset: {lm.get('per_type')} steps per type from {lm.get('bins_matched')} "
                     f"bins (ratio {lm.get('bin_ratio')}); kept {100 * lm.get('tool_call_kept_fraction', 0):.1f}% "
                     f"of eval tool calls, {100 * lm.get('planning_kept_fraction', 0):.1f}% of planning steps")
    for source, reasons in stats["rejected_rows"].items():
        lines.append(f"rejected {source}: " + ", ".join(f"{r} {n}" for r, n in reasons.items()))
    for source, reasons in stats.get("repaired_rows", {}).items():
        lines.append(f"repaired {source}: " + ", ".join(f"{r} {n}" for r, n in reasons.items()))
    return "\n".join(lines)


def format_step(step, tokenizer) -> str:
    """The step's text with its label span wrapped in ⟦ ⟧."""
    ctx = tokenizer.decode(step.input_ids[: step.context_length], skip_special_tokens=False)
    tgt = tokenizer.decode(step.input_ids[step.context_length :], skip_special_tokens=False)
    return ctx + SHOW_OPEN + tgt + SHOW_CLOSE


def run(args: argparse.Namespace) -> int:
    from layerroute.data.build import load_steps
    from layerroute.data.config import DataConfig
    from layerroute.tokenizer import load_tokenizer

    raw = raw_config(args)  # the --overlay / --set rules of every command
    cfg = DataConfig.from_dict(raw.get("data"))
    model = raw.get("model") or {}
    name = args.tokenizer or model.get("tokenizer") or model.get("name")  # the tokenizer training renders with
    if not name:
        raise ConfigError(
            "model.name: missing; it names the model whose tokenizer renders the data (or pass --tokenizer)"
        )
    tokenizer = load_tokenizer(name)
    if model.get("chat_template"):
        from layerroute import chat_template

        chat_template.validate(model["chat_template"])
        chat_template.apply(tokenizer, model["chat_template"])
    data = load_steps(cfg, tokenizer)
    print(data.report.summary(), file=sys.stderr)
    if args.stats:
        stats = data.stats()
        text = json.dumps(stats, indent=2, ensure_ascii=False)
        print(text if args.json else stats_table(stats))
        if args.output:
            write_text_atomic(args.output, text + "\n")
        return 0
    steps = _pick_show(data.split(args.split), args.show)
    for k, s in enumerate(steps, 1):
        print(
            f"===== {k}/{len(steps)} {s.id}  {s.step_type}  source={s.source} category={s.category}  "
            f"context={s.context_length} target={s.length} tokens"
        )
        print(format_step(s, tokenizer))
        print()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="layerroute data", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
