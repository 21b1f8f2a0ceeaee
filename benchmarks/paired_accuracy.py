"""Paired free-running accuracy of two configurations from two evaluations (prints JSON).

Each evaluation scores its own adapter; when both drew the same accuracy steps (same data, eval seed and counts),
their verdicts can be compared step by step: e.g. the routed path of one adapter against a separately trained
full-depth LoRA, the stricter reference of issue 8's accuracy target.

    python benchmarks/paired_accuracy.py \\
        runs/ablation/lora_only-s0/eval_accuracy/eval.json:lora_full_depth \\
        runs/ablation/drop_nll_stopgrad-s0/eval_accuracy/eval.json:routed [--step-type tool_call] \\
        [--split length_matched]

The output is `layerroute.eval.accuracy.paired_accuracy` (B minus A) plus the teacher-forced exact match of each side
on the same steps, and an error if the two evaluations did not score the same steps. A side can also be a result of
`benchmarks/exact_match_all.py`, as RESULT.json:N for its N-th side (0 = the first): then the verdicts compared are
teacher-forced exact match on every eval tool-call step, e.g. two adapters scored in different runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from layerroute.eval.accuracy import ACCURACY_SUFFIX, paired_accuracy


def load_side(spec: str, step_type: str, split: str = "full") -> tuple[str, str, dict]:
    path, _, config = spec.rpartition(":")
    if not path:
        raise SystemExit(f"{spec!r}: expected EVAL_JSON:CONFIG, e.g. runs/x/eval_accuracy/eval.json:routed")
    doc = json.loads(Path(path).read_text())
    if doc.get("benchmark") == "exact_match_all":  # teacher-forced exact match of every tool-call step
        if split != "full":
            raise SystemExit(f"{path}: an exact_match_all result scores every eval step; it has no {split} draw")
        try:
            side = doc["sides"][int(config)]
        except (ValueError, IndexError):
            raise SystemExit(f"{path}: an exact_match_all result takes :N, a side index 0..{len(doc['sides']) - 1}, "
                             f"not {config!r}") from None
        exact = side["teacher_forced_exact"]
        return path, f"{side['adapter']}:{side['config']}", {"accuracy": exact, "teacher_forced_exact": exact,
                                                            "samples": side["samples"],
                                                            "block_skip": side.get("block_skip")}
    scored = (doc.get("accuracy" + ACCURACY_SUFFIX[split]) or {}).get(step_type) or {}
    if config not in scored:
        raise SystemExit(f"{path}: no {step_type} accuracy on the {split} split for {config!r} "
                         f"(has: {sorted(scored) or 'none'})")
    return path, config, scored[config]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="EVAL_JSON:CONFIG of the reference")
    parser.add_argument("b", help="EVAL_JSON:CONFIG compared with it (the difference is b - a)")
    parser.add_argument("--step-type", default="tool_call", choices=("tool_call", "planning"))
    parser.add_argument("--split", default="full", choices=tuple(ACCURACY_SUFFIX),
                        help="which draw's verdicts (length_matched: eval.accuracy_length_matched_per_type's draw; "
                             "not for exact_match_all sides)")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sides = [load_side(s, args.step_type, args.split) for s in (args.a, args.b)]
    try:
        paired = paired_accuracy(sides[0][2], sides[1][2], args.resamples, args.seed)
    except ValueError as e:
        raise SystemExit(f"{e}: were both evaluated with the same data, eval seed and accuracy counts?") from None
    out = {
        "step_type": args.step_type,
        "split": args.split,
        "a": {"eval": sides[0][0], "config": sides[0][1], "accuracy": sides[0][2]["accuracy"],
              "teacher_forced_exact": sides[0][2].get("teacher_forced_exact")},
        "b": {"eval": sides[1][0], "config": sides[1][1], "accuracy": sides[1][2]["accuracy"],
              "teacher_forced_exact": sides[1][2].get("teacher_forced_exact")},
        "b_minus_a": paired,
    }
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
