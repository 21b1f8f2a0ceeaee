"""Issue 8's accuracy target as a picture: what each skip level costs in tool-call exact match (PNG + JSON line).

Every point is one side of a `benchmarks/exact_match_all.py` result (RESULT.json:N, optionally =LABEL): x is the
fraction of block FLOPs it skips on the eval tool-call steps, y its teacher-forced exact match minus the
reference's on the same steps (paired), with the 95% bootstrap interval over steps as an error bar. The band
[-1, +1] is the target ("within 1 point of the LoRA full-depth model"); the dotted vertical line is the tool-call
skip that a differential of 25 points needs when planning skips nothing.

    PYTHONPATH=. python benchmarks/plot_exact_match.py \\
        --reference benchmarks/results/exact_match_all_offline_a.json:0=lora_only_s0_full_depth \\
        benchmarks/results/exact_match_all_offline_h.json:1=bridge_drop_nll_stopgrad_s0 \\
        benchmarks/results/exact_match_all_offline_f.json:1=warm_fixed_200steps_s0 \\
        --output docs/exact_match_frontier.png

The last line printed is the JSON of the plotted points (label, skip, exact match, paired difference and interval).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from paired_accuracy import load_side  # the sibling script (this script's folder is on sys.path)

from layerroute.eval.accuracy import paired_accuracy
from layerroute.eval.bench import emit_json_line

TARGET_POINTS = 1.0  # issue 8: routed tool-call accuracy within 1 point of LoRA full depth
DIFFERENTIAL_TARGET = 25.0  # issue 8: differential >= 25 points (planning skips 0% in every recipe plotted here)


def parse_point(spec: str) -> tuple[str, str | None]:
    """RESULT.json:N[=LABEL] -> (RESULT.json:N, LABEL or None)."""
    side, sep, label = spec.partition("=")
    if sep and not label:
        raise SystemExit(f"{spec!r}: expected RESULT.json:N=LABEL with a non-empty label")
    return side, label or None


def points(reference: str, specs: list[str], resamples: int, seed: int) -> list[dict]:
    reference, ref_label = parse_point(reference)
    _, ref_name, ref = load_side(reference, "tool_call")
    out = []
    for spec in specs:
        side, label = parse_point(spec)
        _, name, scored = load_side(side, "tool_call")
        if scored.get("block_skip") is None:  # the skip it was scored at: recorded by exact_match_all only
            raise SystemExit(f"{side}: not an exact_match_all side (expected RESULT.json:N)")
        try:
            paired = paired_accuracy(ref, scored, resamples, seed)
        except ValueError as e:
            raise SystemExit(f"{side} vs {reference}: {e} (were both scored on the same eval steps?)") from None
        out.append({"label": label or name, "side": side, "block_skip": scored["block_skip"],
                    "teacher_forced_exact": scored["teacher_forced_exact"], "diff_points": paired["diff_points"],
                    "diff_ci95": paired["diff_ci95"], "n": paired["n"]})
    return [{"reference": reference, "reference_config": ref_label or ref_name,
             "reference_exact": ref["teacher_forced_exact"]}] + out


def plot(result: list[dict], path: Path) -> None:
    from layerroute.eval.report import _save, plt

    ref, pts = result[0], result[1:]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax.axhspan(-TARGET_POINTS, TARGET_POINTS, color="#a1d99b", alpha=0.5, lw=0,
               label=f"target: within {TARGET_POINTS:g} point")
    ax.axhline(0, color="black", lw=0.8)
    ax.axvline(DIFFERENTIAL_TARGET, color="grey", ls=":", lw=1, label="skip a 25-point differential needs")
    colors, markers = plt.get_cmap("tab20").colors, "os^Dv<>P"
    at: dict[int, list[int]] = {}  # points at the same skip level are spread sideways so that none hides another
    for i, p in enumerate(pts):
        at.setdefault(round(100 * p["block_skip"]), []).append(i)
    dodge = {i: 0.5 * (j - (len(group) - 1) / 2) for group in at.values() for j, i in enumerate(group)}
    for i, p in enumerate(pts):
        x, y, (lo, hi) = 100 * p["block_skip"] + dodge[i], p["diff_points"], p["diff_ci95"]
        ax.errorbar(x, y, yerr=[[y - lo], [hi - y]], fmt=markers[i % len(markers)], color=colors[i % len(colors)],
                    capsize=3, ms=6, label=f"{p['label']} ({100 * p['teacher_forced_exact']:.1f}%)")
    ax.set_xlabel("tool-call block FLOPs skipped (%)")
    ax.set_ylabel("exact match minus reference (points)\n95% paired bootstrap interval")
    ax.set_title(f"teacher-forced tool-call exact match on {pts[0]['n'] if pts else 0} eval steps\n"
                 f"reference: {ref['reference_config']} ({100 * ref['reference_exact']:.1f}%)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("points", nargs="+", metavar="RESULT.json:N[=LABEL]", help="exact_match_all sides to plot")
    parser.add_argument("--reference", required=True, metavar="RESULT.json:N[=LABEL]",
                        help="the side every point is paired with (the LoRA full-depth model)")
    parser.add_argument("--output", required=True, help="the PNG to write")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = points(args.reference, args.points, args.resamples, args.seed)
    plot(result, Path(args.output))
    emit_json_line({"benchmark": "plot_exact_match", "output": args.output, "reference": result[0],
                    "points": result[1:]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
