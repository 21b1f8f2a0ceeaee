"""`layerroute ablation`: one table comparing training recipes, each evaluated over several seeds.

    layerroute ablation --recipe "soft_mean=runs/q/soft_mean-s*/eval/eval.json" \
                        --recipe "plus=runs/ablation/plus-s*/eval/eval.json" --output-dir runs/ablation

Reads finished evaluations (no model is loaded), aggregates each recipe's seeds exactly as `layerroute eval --adapter A --adapter B` does
(`eval.seeds.seed_metrics`, `eval.seeds.aggregate_metrics`), optionally on top of an earlier table's per-seed rows
(`--include`: the runs themselves need not be kept), and writes `ablation.json`,
`ablation.md` (skip / quality / accuracy tables, full and length-matched splits), `ablation.png`
(the differential of every seed per recipe), `ablation_tradeoff.png` (differential vs tool-call quality) and, when
accuracy was scored, `ablation_accuracy.png` (routed and full-depth tool-call accuracy vs tool-call skip) and, when
it was scored on a length-matched draw too, `ablation_accuracy_splits.png` (accuracy per split, task and
configuration).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
from pathlib import Path

from ..atomic import write_text_atomic
from ..errors import ConfigError
from .accuracy import paired_accuracy
from .configurations import STEP_TYPES
from .io import read_json, read_per_adapter, write_json
from .seeds import aggregate_metrics, seed_metrics

SPLITS = ("full", "length_matched")
# quality columns: the four configurations of the evaluation plus the equal-FLOP baselines
QUALITY = ("base", "lora_full_depth", "routed", "routed_no_lora", "shortgpt", "random")
ACCURACY = ("base", "lora_full_depth", "routed", "shortgpt", "random")


def parse_recipe(spec: str) -> tuple[str, list[str]]:
    """'NAME=PATH[,PATH...]' (each PATH may be a glob) -> (name, sorted eval.json paths)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name.strip() or not rest.strip():
        raise ConfigError(f"--recipe {spec!r}: expected NAME=EVAL_JSON[,EVAL_JSON...] (globs allowed)")
    paths: list[str] = []
    for pattern in rest.split(","):
        hits = sorted(glob.glob(pattern.strip())) if glob.has_magic(pattern) else [pattern.strip()]
        if not hits:
            raise ConfigError(f"--recipe {name}: {pattern!r} matches no file")
        paths += hits
    return name.strip(), paths


def train_seed(res: dict):
    """The training seed of an evaluated adapter (its run config travels in the eval.json), or None."""
    return (((res.get("meta") or {}).get("training") or {}).get("config") or {}).get("train", {}).get("seed")


def vs_reference(ref: dict, res: dict, resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Each free-running configuration of `res` minus the reference adapter's LoRA at full depth, paired step by
    step on the steps both scored (full split's draw): flat keys "tool_call.vs_reference.routed.diff_points", ...
    The issue's comparison: a routed figure against a LoRA trained at full depth with the same seed and data."""
    out: dict[str, float] = {}
    for t in STEP_TYPES:
        base = ((ref.get("accuracy") or {}).get(t) or {}).get("lora_full_depth")
        if not base:
            continue
        by_key = {(s["conversation_id"], s["step_index"]): s for s in base["samples"]}
        for c, v in ((res.get("accuracy") or {}).get(t) or {}).items():
            mine = {(s["conversation_id"], s["step_index"]): s for s in v["samples"]}
            keys = [k for k in by_key if k in mine]
            if not keys:
                continue
            p = paired_accuracy({"samples": [by_key[k] for k in keys]}, {"samples": [mine[k] for k in keys]},
                                resamples, seed)
            prefix = f"{t}.vs_reference.{c}"
            out[f"{prefix}.n"] = p["n"]
            out[f"{prefix}.diff_points"] = p["diff_points"]
            out[f"{prefix}.ci95_low"], out[f"{prefix}.ci95_high"] = p["diff_ci95"]
    return out


def _pair_rows(fresh: dict[str, list[tuple[dict, dict]]], reference: str) -> None:
    """Adds `vs_reference` figures to every fresh row of every recipe but the reference, matched by training seed
    (by position when a seed is unknown)."""
    if reference not in fresh:
        raise ConfigError(f"--reference {reference}: not among the --recipe names ({', '.join(fresh)})")
    refs = fresh[reference]
    by_seed = {train_seed(res): res for _, res in refs}
    for name, rows in fresh.items():
        if name == reference:
            continue
        for i, (row, res) in enumerate(rows):
            ref = by_seed.get(train_seed(res)) if train_seed(res) is not None else None
            if ref is None and train_seed(res) is None and i < len(refs):
                ref = refs[i][1]
            if ref is not None:
                row["full"].update(vs_reference(ref, res))
                row["reference_adapter"] = ref.get("adapter")


def aggregate_recipes(recipes: dict[str, list[str]], include: dict | None = None,
                      reference: str | None = None) -> dict:
    """{recipe: {"seeds": n, "adapters": [...], "eval_json": [...], split: {metric: {mean, std, values}},
    "per_seed": [{"adapter", "eval_json", split: {metric: value}}]}}

    `include` is an earlier `ablation.json` (see `read_included`): its recipes come first and keep their seeds, and
    a seed evaluated again (same adapter path) is replaced by the new evaluation. So a table survives the runs it
    was built from (they are not kept between machines) and grows seed by seed.
    """
    out = dict(include or {})
    fresh = {name: [({"adapter": res.get("adapter"), "eval_json": path,
                      **{split: seed_metrics(res, split) for split in SPLITS}}, res)
                    for path in paths for res in read_per_adapter([path])]
             for name, paths in recipes.items()}
    if reference:
        _pair_rows(fresh, reference)
    for name, rows in fresh.items():
        again = {row["adapter"] for row, _ in rows}
        kept = [row for row in out.get(name, {}).get("per_seed", []) if row["adapter"] not in again]
        out[name] = _entry(kept + [row for row, _ in rows])
    return out


def _entry(per_seed: list[dict]) -> dict:
    return {"seeds": len(per_seed), "adapters": [r["adapter"] for r in per_seed],
            "eval_json": [r["eval_json"] for r in per_seed],
            **{split: aggregate_metrics([r[split] for r in per_seed]) for split in SPLITS}, "per_seed": per_seed}


def read_included(path: str) -> dict:
    """An `ablation.json` written by this command, checked: each recipe must carry its per-seed rows."""
    doc = read_json(path, missing=f"--include {path}: no such file", invalid=f"--include {path}: not an ablation.json")
    if not isinstance(doc, dict) or not doc:
        raise ConfigError(f"--include {path}: not an ablation.json (expected recipes by name)")
    for name, e in doc.items():
        rows = e.get("per_seed") if isinstance(e, dict) else None
        if not rows or any(not isinstance(r, dict) or not {"adapter", "eval_json", *SPLITS} <= r.keys()
                           for r in rows):
            raise ConfigError(f"--include {path}: recipe {name!r} has no per-seed rows (an ablation.json from "
                              "before session 10: rebuild it from its eval.json files)")
    return doc


def _num(x, digits=2, pct=False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * x:.{digits}f}" if pct else f"{x:.{digits}f}"


def _cell(m: dict | None, digits=2, pct=False, spread=True, seeds: int | None = None) -> str:
    if not m:
        return "n/a"
    text = _num(m["mean"], digits, pct)
    if spread and len(m["values"]) > 1 and text != "n/a":
        text += f" ± {_num(m['std'], digits, pct)}"
    if seeds is not None and len(m["values"]) < seeds and text != "n/a":
        text += f" ({len(m['values'])} of {seeds} seeds)"  # e.g. a baseline only where the routers skipped a block
    return text


def markdown(agg: dict) -> str:
    lines = ["# Ablation", "",
             "Mean ± standard deviation over seeds (population std). Skip figures are percentages of the routable "
             "blocks' FLOPs (block) or of the whole forward (total); the differential is tool minus planning block "
             "skip in points; 'CI low' is the lowest per-seed bootstrap 95% lower bound; PPL is the arithmetic mean "
             "over seeds of each seed's perplexity on the same steps.", ""]
    lines += ["## Skipping", "",
              "| recipe | split | seeds | tool block % | planning block % | tool total % | planning total % "
              "| differential | per seed | > 0 in every seed | CI low |",
              "|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    for name, e in agg.items():
        for split in SPLITS:
            m = e[split]
            d = m["skip_differential_points"]
            finite = [v for v in d["values"] if v is not None and not math.isnan(v)]
            every = "yes" if finite and len(finite) == len(d["values"]) and min(finite) > 0 else "no"
            ci_low = min((v for v in m["differential_ci95_low"]["values"] if v is not None), default=float("nan"))
            lines.append(
                f"| {name} | {split} | {e['seeds']} | {_cell(m['tool_call.block_flops_skipped'], 1, True)} | "
                f"{_cell(m['planning.block_flops_skipped'], 1, True)} | {_cell(m['tool_call.total_flops_skipped'], 1, True)} | "
                f"{_cell(m['planning.total_flops_skipped'], 1, True)} | {_cell(d, 1)} | "
                f"{', '.join(_num(v, 1) for v in d['values'])} | {every} | {_num(ci_low, 1)} |"
            )
    lines += ["", "## Quality (perplexity of the step's target tokens)", "",
              "ShortGPT (static, least influential blocks) and random remove, per step type, as many blocks as the "
              "routers took from that type on average (rounded; none when that rounds to 0); they show what *not* "
              "routing costs at equal FLOPs.", "",
              "| recipe | split | step type | " + " | ".join(QUALITY) + " |",
              "|---|---|---|" + "---:|" * len(QUALITY)]
    for name, e in agg.items():
        for split in SPLITS:
            for t in STEP_TYPES:
                cells = [_cell(e[split].get(f"{t}.ppl.{c}"), seeds=e["seeds"]) for c in QUALITY]
                lines.append(f"| {name} | {split} | {t} | " + " | ".join(cells) + " |")
    lines += ["", "## Task accuracy (free-running greedy generation with real skipping)", "",
              "Exact-match rate (BFCL AST checker for tool calls, final number for GSM8K-style planning), mean over "
              "seeds; n is the number of steps scored per seed, each split from its own draw (length-matched draws "
              "from session 9 on). 'TF exact' is the fraction of the same steps whose every target token is the "
              "argmax given the gold prefix (greedy decoding reproduces them token for token: a lower bound on the "
              "accuracy; n/a before session 5).", "",
              "| recipe | split | step type | n/seed | " + " | ".join(ACCURACY) + " | routed - LoRA (points) "
              "| TF exact LoRA | TF exact routed |",
              "|---|---|---|---:|" + "---:|" * (len(ACCURACY) + 3)]
    unseen_rows = []
    for name, e in agg.items():
        for split in SPLITS:
            m = e[split]
            for t in STEP_TYPES:
                n = m.get(f"{t}.accuracy_n.routed") or m.get(f"{t}.accuracy_n.lora_full_depth")
                if not n:
                    continue
                cells = [_cell(m.get(f"{t}.accuracy.{c}"), 1, True, spread=False, seeds=e["seeds"])
                         for c in ACCURACY]
                tf = [_cell(m.get(f"{t}.accuracy_tf_exact.{c}"), 1, True, spread=False)
                      for c in ("lora_full_depth", "routed")]
                lines.append(f"| {name} | {split} | {t} | {_num(n['mean'], 0)} | " + " | ".join(cells)
                             + f" | {_diff(m, t + '.accuracy')} | " + " | ".join(tf) + " |")
                un = m.get(f"{t}.accuracy_unseen_n.routed") or m.get(f"{t}.accuracy_unseen_n.lora_full_depth")
                if un:
                    cells = [_cell(m.get(f"{t}.accuracy_unseen.{c}"), 1, True, spread=False, seeds=e["seeds"])
                             for c in ACCURACY]
                    unseen_rows.append(f"| {name} | {split} | {_num(un['mean'], 0)} | " + " | ".join(cells)
                                       + f" | {_diff(m, t + '.accuracy_unseen')} |")
    if unseen_rows:
        lines += ["", "## BFCL AST accuracy on unseen functions (live_* steps of the tool-call draws above)", "",
                  "The live_* categories are never trained on (eval-only), so these calls name functions the "
                  "adapter has not seen; n is the number of live_* steps per seed in the split's draw (the draw "
                  "depends on the evaluation seed, not on the adapter).", "",
                  "| recipe | split | n/seed | " + " | ".join(ACCURACY) + " | routed - LoRA (points) |",
                  "|---|---|---:|" + "---:|" * (len(ACCURACY) + 1)] + unseen_rows
    paired_rows = [f"| {name} | {r['adapter']} | "
                   + " | ".join(_paired_cell(r[split], "tool_call") for split in SPLITS) + " |"
                   for name, e in agg.items() for r in e.get("per_seed", [])
                   if any("tool_call.accuracy_paired.diff_points" in r[split] for split in SPLITS)]
    if paired_rows:
        lines += ["", "## Routed minus LoRA full depth on tool calls, paired per seed", "",
                  "Points, each seed on its own draw of each split, with the 95% bootstrap interval over steps "
                  "(paired: a step's two verdicts are resampled together); seeds evaluated before session 10 are "
                  "not listed (their rows kept no interval).", "",
                  "| recipe | adapter (seed) | full split | length-matched |", "|---|---|---|---|"] + paired_rows
    ref_rows = [f"| {name} | {r['adapter']} | {r.get('reference_adapter', 'n/a')} | {t} | "
                + " | ".join(_ref_cell(r["full"], t, c) for c in ACCURACY) + " |"
                for name, e in agg.items() for r in e.get("per_seed", []) for t in STEP_TYPES
                if any(f"{t}.vs_reference.{c}.diff_points" in r["full"] for c in ACCURACY)]
    if ref_rows:
        lines += ["", "## Minus the reference recipe's LoRA at full depth, paired per seed", "",
                  "Points against the --reference recipe's full-depth accuracy of the same training seed, on the "
                  "steps both scored (full split's draw), with the 95% bootstrap interval over steps; n steps. "
                  "lora_full_depth = the recipe's own adapter at full depth.", "",
                  "| recipe | adapter | reference | step type | " + " | ".join(ACCURACY) + " |",
                  "|---|---|---|---|" + "---|" * len(ACCURACY)] + ref_rows
    return "\n".join(lines) + "\n"


def _ref_cell(row: dict, t: str, c: str) -> str:
    return _interval_cell(row, f"{t}.vs_reference.{c}", signed=True, with_n=True)


def _diff(m: dict, prefix: str) -> str:
    """Routed minus LoRA full depth in points (both scored on the same steps in each seed, so the difference of the
    means is the mean paired difference)."""
    routed, lora = m.get(f"{prefix}.routed"), m.get(f"{prefix}.lora_full_depth")
    return _num(100 * (routed["mean"] - lora["mean"]), 1) if routed and lora else "n/a"


def _paired_cell(row: dict, t: str) -> str:
    return _interval_cell(row, f"{t}.accuracy_paired")


def _interval_cell(row: dict, prefix: str, signed: bool = False, with_n: bool = False) -> str:
    """'d (low to high)' of a paired difference stored flat under `prefix` (diff_points, ci95_low/high, n)."""
    d = row.get(f"{prefix}.diff_points")
    if d is None or math.isnan(d):
        return "n/a"
    n = f"; n {row[f'{prefix}.n']}" if with_n else ""
    return (f"{d:+.1f}" if signed else f"{d:.1f}") + \
        f" ({_num(row[f'{prefix}.ci95_low'], 1)} to {_num(row[f'{prefix}.ci95_high'], 1)}{n})"


def _style(i: int, plt) -> tuple:
    """A distinct (colour, marker) for the i-th recipe of a scatter plot."""
    colors, markers = plt.get_cmap("tab20").colors, "os^Dv<>P"
    return colors[i % len(colors)], markers[i % len(markers)]


def plot(agg: dict, path: Path) -> None:
    from .report import _save, plt

    fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.3 * len(agg) + 3), 3.6), sharey=True)
    names = list(agg)
    for ax, split in zip(axes, SPLITS, strict=True):
        for i, name in enumerate(names):
            vals = [v for v in agg[name][split]["skip_differential_points"]["values"] if v is not None]
            ax.bar(i, sum(vals) / len(vals) if vals else 0, color="#9ecae1", width=0.6)
            ax.scatter([i] * len(vals), vals, color="#08519c", s=14, zorder=3)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8, ha="right")
        ax.set_title(split.replace("_", "-"))
    axes[0].set_ylabel("differential (points)\nbar = mean, dots = seeds")
    _save(fig, path)


def plot_tradeoff(agg: dict, path: Path) -> None:
    """Skip differential (length-matched) against what it costs: routed / LoRA-full-depth tool-call perplexity."""
    from .report import _save, plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (name, e) in enumerate(agg.items()):
        m = e["length_matched"]
        xs = m["skip_differential_points"]["values"]
        ys = [r / f if r and f else float("nan") for r, f in
              zip(m["tool_call.ppl.routed"]["values"], m["tool_call.ppl.lora_full_depth"]["values"], strict=True)]
        color, marker = _style(i, plt)
        ax.scatter(xs, ys, s=22, label=name, color=color, marker=marker)
    ax.set_yscale("log")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xlabel("differential, length-matched (points)")
    ax.set_ylabel("tool-call PPL: routed / LoRA full depth")
    ax.set_title("what the differential costs (one dot per seed)")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, path)


def plot_accuracy(agg: dict, path: Path) -> bool:
    """Tool-call accuracy of the routed model (filled) and of the same adapter at full depth (hollow) against the
    tool-call block skip, one pair per seed joined by a line: the gap is what routing costs, the hollow marker's
    height what training for the skipped path cost the full-depth model. False (nothing drawn) when no recipe was
    scored for both."""
    from .report import _save, plt

    points = {}
    for name, e in agg.items():
        m = e["full"]
        routed, lora = m.get("tool_call.accuracy.routed"), m.get("tool_call.accuracy.lora_full_depth")
        if routed and lora:
            points[name] = ([100 * x for x in m["tool_call.block_flops_skipped"]["values"]],
                            [100 * x for x in routed["values"]], [100 * x for x in lora["values"]],
                            m["tool_call.accuracy_n.routed"]["values"])
    if not points:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, (name, (xs, routed, lora, n)) in enumerate(points.items()):
        color, marker = _style(i, plt)
        for x, r, f in zip(xs, routed, lora, strict=True):
            ax.plot([x, x], [f, r], color=color, lw=0.8)
        ax.scatter(xs, lora, s=30, facecolors="none", edgecolors=[color], marker=marker)
        label = f"{name} (n = {min(n)}{'' if min(n) == max(n) else f'-{max(n)}'} per seed)"
        ax.scatter(xs, routed, s=30, color=color, marker=marker, label=label)
    ax.set_xlabel("tool-call block FLOPs skipped (%)")
    ax.set_ylabel("tool-call accuracy (%)")
    ax.set_title("free-running tool calls\nrouted (filled) vs the same adapter at full depth (hollow)", fontsize=10)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, path)
    return True


# the panels of `plot_accuracy_splits`: (split, step type, metric prefix, title)
SPLIT_PANELS = (
    ("full", "tool_call", "accuracy_unseen", "BFCL AST, unseen live_* (full split)"),
    ("length_matched", "tool_call", "accuracy", "BFCL AST, length-matched"),
    ("full", "planning", "accuracy", "GSM8K-style exact match (full split)"),
    ("length_matched", "planning", "accuracy", "GSM8K-style exact match, length-matched"),
)


def plot_accuracy_splits(agg: dict, path: Path) -> bool:
    """Free-running accuracy per split for the recipes scored on a length-matched draw: one panel per split x task,
    a bar per configuration (mean over seeds) with each seed as a dot. False (nothing drawn) when no recipe was."""
    from .report import _save, plt

    names = [n for n, e in agg.items() if any(k.startswith("tool_call.accuracy.") for k in e["length_matched"])]
    if not names:
        return False
    configs = [c for c in ACCURACY if any(f"tool_call.accuracy.{c}" in agg[n]["length_matched"] for n in names)]
    fig, axes = plt.subplots(1, len(SPLIT_PANELS), figsize=(3.2 * len(SPLIT_PANELS) + 1.5, 3.8), sharey=True)
    width = 0.8 / len(configs)
    for ax, (split, t, metric, title) in zip(axes, SPLIT_PANELS, strict=True):
        for j, c in enumerate(configs):
            color, _ = _style(j, plt)
            for i, name in enumerate(names):
                m = agg[name][split].get(f"{t}.{metric}.{c}")
                if not m:
                    continue
                vals = [100 * v for v in m["values"] if v is not None]
                x = i - 0.4 + width * (j + 0.5)
                ax.bar(x, sum(vals) / len(vals), width=width * 0.9, color=color, alpha=0.55,
                       label=c if i == 0 else None)
                ax.scatter([x] * len(vals), vals, color=color, s=10, zorder=3, edgecolors="black", linewidths=0.3)
        ax.set_xticks(range(len(names)), names, rotation=25, fontsize=7, ha="right")
        ax.set_title(title, fontsize=8)
    axes[0].set_ylabel("accuracy (%)\nbar = mean, dots = seeds")
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, path)
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..config import add_output_dir_argument

    parser.add_argument("--recipe", action="append", default=[], metavar="NAME=EVAL_JSON[,...]",
                        help="a recipe and its seeds' eval.json files (globs allowed; quote them); repeatable")
    parser.add_argument("--include", metavar="ABLATION_JSON",
                        help="an earlier ablation.json whose recipes and seeds the table keeps (a seed of a --recipe "
                             "evaluated again replaces its row): the figures outlive the runs they came from")
    parser.add_argument("--reference", metavar="NAME",
                        help="a --recipe (e.g. a LoRA trained at full depth) whose full-depth accuracy every other "
                             "recipe's configurations are paired against, seed by seed, step by step")
    add_output_dir_argument(parser)


def run(args: argparse.Namespace) -> int:
    recipes: dict[str, list[str]] = {}
    for spec in args.recipe:
        name, paths = parse_recipe(spec)
        if name in recipes:
            raise ConfigError(f"--recipe {name} given twice")
        recipes[name] = paths
    if not recipes and not args.include:
        raise ConfigError("give at least one --recipe NAME=EVAL_JSON or --include ABLATION_JSON")
    agg = aggregate_recipes(recipes, read_included(args.include) if args.include else None,
                            reference=getattr(args, "reference", None))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "ablation.json", agg)
    write_text_atomic(out / "ablation.md", markdown(agg))
    plot(agg, out / "ablation.png")
    plot_tradeoff(agg, out / "ablation_tradeoff.png")
    plot_accuracy(agg, out / "ablation_accuracy.png")
    plot_accuracy_splits(agg, out / "ablation_accuracy_splits.png")
    print(json.dumps({name: {split: e[split]["skip_differential_points"]["mean"] for split in SPLITS}
                      for name, e in agg.items()}))
    return 0
