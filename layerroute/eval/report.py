"""eval.json -> report.md (what each skip costs first, then the paper's terms and the honest columns) and PNG plots."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402

from ..atomic import atomic_path, write_text_atomic  # noqa: E402

# The paper's reported figures (LayerRoute, Qwen2.5-0.5B-Instruct), shown beside ours.
PAPER = {
    "tool_skip": 15.25, "planning_skip": 2.34, "differential": 12.91,
    "ppl_delta_tool": -1.29, "ppl_delta_planning": -1.30, "trainable": 1_100_000, "train_minutes": 6.4,
}


def _f(x, digits=2, pct=False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    v = 100 * x if pct else x
    return f"{v if round(v, digits) else 0.0:.{digits}f}"  # no "-0.0" (a router's tiny cost, rounded away)


# The configurations of the first table, in this order, and how the report names them.
COST_ROWS = {
    "lora_full_depth": "LoRA, full depth", "routed": "routed (the routers decide)",
    "shortgpt": "ShortGPT: the same number of blocks, fixed per step type", "random": "random blocks, same number",
    "routed_no_lora": "routed without LoRA", "base": "base model, full depth",
}


def _cost_row(doc: dict, t: str, config: str) -> list[str] | None:
    """One row of the first table, or None when the evaluation measured nothing of `config` on step type `t`."""
    e = doc["splits"]["full"][t]
    acc = (doc.get("accuracy") or {}).get(t, {}).get(config)
    baseline = (e.get("baselines") or {}).get(config)
    if config in ("base", "lora_full_depth"):
        block = total = 0.0
        ppl = e["ppl"].get(config)
    elif config in ("routed", "routed_no_lora"):
        block, total, ppl = e["block_flops_skipped"], e["total_flops_skipped"], e["ppl"].get(config)
    elif baseline:
        block, total, ppl = baseline["block_flops_skipped"], baseline["total_flops_skipped"], baseline["ppl"]
    else:
        return None
    if ppl is None and acc is None:
        return None
    lora = (doc.get("accuracy") or {}).get(t, {}).get("lora_full_depth")
    cost = "n/a"
    if acc and lora and config != "lora_full_depth":
        cost = _f(100 * (acc["accuracy"] - lora["accuracy"]), 1)
        paired = (doc.get("accuracy_paired_routed_vs_lora") or {}).get(t)
        if config == "routed" and paired:  # the same steps, resampled together
            lo, hi = paired["diff_ci95"]
            cost = f"{_f(paired['diff_points'], 1)} [{_f(lo, 1)}, {_f(hi, 1)}]"
    elif config == "lora_full_depth" and acc:
        cost = "(reference)"
    accuracy = f"{_f(acc['accuracy'], 1, pct=True)}% (n={acc['n']})" if acc else "not generated"
    return [t, COST_ROWS[config], _f(block, 1, pct=True), _f(total, 1, pct=True), accuracy, cost, _f(ppl)]


def cost_table(doc: dict) -> list[str]:
    """The report's first table: each configuration's skip (block and total FLOPs) on the same row as the task
    accuracy it gets and what it costs against LoRA at full depth (the routed row: paired on the same steps, 95%
    bootstrap interval), per step type, full split. A skip differential alone reads as a win whatever it costs."""
    lines = [
        "## What each skip costs (full split)", "",
        "Accuracy is free-running greedy generation with real skipping; the cost column is accuracy minus LoRA at "
        "full depth, in points (routed: paired on the same steps, with its 95% interval).", "",
        "| step type | configuration | block FLOPs skipped % | total FLOPs skipped % | accuracy | "
        "cost vs LoRA full depth (points) | PPL |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for t in ("tool_call", "planning"):
        for config in COST_ROWS:
            row = _cost_row(doc, t, config)
            if row:
                lines.append("| " + " | ".join(row) + " |")
    full = doc["splits"]["full"]
    lines += ["", f"The routers skip {_f(full['tool_call']['block_flops_skipped'], 1, pct=True)}% of block FLOPs on "
              f"tool calls and {_f(full['planning']['block_flops_skipped'], 1, pct=True)}% on planning steps "
              f"(differential {_f(full['skip_differential_points'], 1)} points): where they skip, not what it costs; "
              "read it with the accuracy above."]
    if len(doc.get("seeds") or []) > 1:
        lines.append(f"First adapter of {len(doc['seeds'])}; the seeds' spread is in the last table.")
    return lines


def sweep_coincides(sweep: list[dict]) -> bool:
    """True when every threshold gave the same skips and perplexities (routers whose probabilities sit far from
    every threshold tried, e.g. binary after training against hard targets): there is no trade-off to plot."""
    if len(sweep) < 2:
        return False
    first = sweep[0]
    for point in sweep[1:]:
        for t in ("tool_call", "planning"):
            for key in ("total_flops_skipped", "ppl"):
                a, b = first[t].get(key), point[t].get(key)
                if a is None or b is None:
                    if a is not b:
                        return False
                elif not (a == b or math.isclose(a, b, rel_tol=1e-9) or (math.isnan(a) and math.isnan(b))):
                    return False
    return True


def sweep_lines(doc: dict) -> list[str]:
    """The threshold sweep's section: a small table and the plot, or one sentence when every point coincides."""
    sweep = doc.get("threshold_sweep")
    if not sweep:
        return []
    thresholds = ", ".join(f"{p['threshold']:g}" for p in sweep)
    lines = ["", "### Threshold sweep", ""]
    if sweep_coincides(sweep):
        p = sweep[0]
        return lines + [
            f"Every threshold tried ({thresholds}) gives the same gates: tool calls skip "
            f"{_f(p['tool_call']['total_flops_skipped'], 1, pct=True)}% of total FLOPs (PPL {_f(p['tool_call']['ppl'])}), "
            f"planning {_f(p['planning']['total_flops_skipped'], 1, pct=True)}% (PPL {_f(p['planning']['ppl'])}). "
            "The routers' probabilities sit far from all of these thresholds (binary routers), so the threshold "
            "trades nothing here and there is no curve to plot."]
    lines += ["| threshold | tool-call total skip % | tool-call PPL | planning total skip % | planning PPL |",
              "|---:|---:|---:|---:|---:|"]
    for p in sweep:
        lines.append(f"| {p['threshold']:g} | {_f(p['tool_call']['total_flops_skipped'], 1, pct=True)} | "
                     f"{_f(p['tool_call']['ppl'])} | {_f(p['planning']['total_flops_skipped'], 1, pct=True)} | "
                     f"{_f(p['planning']['ppl'])} |")
    return lines + ["", "![threshold sweep](pareto.png)"]


def _paper_table(doc: dict) -> list[str]:
    full = doc["splits"]["full"]
    meta = doc.get("meta", {})
    tool, plan = full["tool_call"], full["planning"]
    trainable = doc.get("parameters", {}).get("trainable")
    minutes = meta.get("training", {}).get("wall_s")
    rows = [
        ("Tool-call block FLOPs skipped (%)", _f(tool["block_flops_skipped"], pct=True), f"{PAPER['tool_skip']:.2f}"),
        ("Planning block FLOPs skipped (%)", _f(plan["block_flops_skipped"], pct=True), f"{PAPER['planning_skip']:.2f}"),
        ("Differential (points)", _f(full["skip_differential_points"]), f"{PAPER['differential']:.2f}"),
        ("PPL delta vs base, tool calls", _f(tool["ppl"]["routed"] - tool["ppl"]["base"]), f"{PAPER['ppl_delta_tool']:.2f}"),
        ("PPL delta vs base, planning", _f(plan["ppl"]["routed"] - plan["ppl"]["base"]), f"{PAPER['ppl_delta_planning']:.2f}"),
        ("Trainable parameters", f"{trainable:,}" if trainable else "n/a", f"{PAPER['trainable']:,} (1.10M)"),
        ("Training time (min)", _f(minutes / 60, 1) if minutes else "n/a", f"{PAPER['train_minutes']} (A100)"),
    ]
    lines = ["## In the paper's terms", "",
             "The paper's measures beside its figures. Its differential counts skipped FLOPs only: the accuracy "
             "they cost is in the first table.", "", "| measure | this run | paper |", "|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return lines


def _honest_table(doc: dict) -> list[str]:
    lines = [
        "## Honest columns", "",
        "Total FLOPs include the LM head (never skipped) and the routers. Accuracy is free-running greedy "
        "generation with real skipping.", "",
        "| split | step type | n | block skip % | total skip % | PPL base | PPL LoRA full | PPL routed | PPL routed no-LoRA |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for split, entry in doc["splits"].items():
        for t in ("tool_call", "planning"):
            e = entry[t]
            p = e["ppl"]
            lines.append(
                f"| {split} | {t} | {e['n']} | {_f(e['block_flops_skipped'], pct=True)} | "
                f"{_f(e['total_flops_skipped'], pct=True)} | {_f(p['base'])} | {_f(p['lora_full_depth'])} | "
                f"{_f(p['routed'])} | {_f(p['routed_no_lora'])} |"
            )
    lines.append("")
    lines.append("| split | differential (points) | 95% CI | gate-vs-context-length corr. |")
    lines.append("|---|---:|---|---:|")
    for split, entry in doc["splits"].items():
        lo, hi = entry["differential_ci95"]
        lines.append(
            f"| {split} | {_f(entry['skip_differential_points'])} | [{_f(lo)}, {_f(hi)}] | "
            f"{_f(entry['gate_context_length_correlation'])} |"
        )
    base = doc["splits"]["full"]["tool_call"].get("baselines")
    if base:
        k = doc.get("baseline_blocks_skipped")
        k_text = ", ".join(f"{t}: {n}" for t, n in k.items()) if isinstance(k, dict) else str(k)
        lines += ["", f"### Baselines at equal FLOPs (blocks removed per step type: {k_text})", "",
                  "| split | step type | method | PPL | total skip % |", "|---|---|---|---:|---:|"]
        for split, entry in doc["splits"].items():
            for t in ("tool_call", "planning"):
                lines.append(f"| {split} | {t} | routed | {_f(entry[t]['ppl']['routed'])} | "
                             f"{_f(entry[t]['total_flops_skipped'], pct=True)} |")
                for name, b in entry[t].get("baselines", {}).items():
                    lines.append(f"| {split} | {t} | {name} | {_f(b['ppl'])} | {_f(b['total_flops_skipped'], pct=True)} |")
    from .accuracy import ACCURACY_SUFFIX  # here: eval.accuracy imports torch, report.py does not

    for split, key in ACCURACY_SUFFIX.items():
        split = split.replace("_", "-")
        acc = doc.get("accuracy" + key)
        if not acc:
            continue
        configs = sorted({c for t in acc for c in acc[t]})
        lines += ["", f"### Task accuracy (free-running, greedy; {split} split)", "",
                  "| step type | " + " | ".join(configs) + " |", "|---|" + "---:|" * len(configs)]
        for t, row in acc.items():
            cells = [f"{_f(row[c]['accuracy'], 1, pct=True)}% (n={row[c]['n']})" if c in row else "" for c in configs]
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
            if any("accuracy_unseen" in row[c] for c in row):  # BFCL live_*: functions never trained on
                cells = [f"{_f(row[c]['accuracy_unseen'], 1, pct=True)}% (n={row[c]['n_unseen']})"
                         if "accuracy_unseen" in row.get(c, {}) else "" for c in configs]
                lines.append(f"| {t}, unseen live_* only | " + " | ".join(cells) + " |")
        for t, p in (doc.get("accuracy_paired_routed_vs_lora" + key) or {}).items():
            lo, hi = p["diff_ci95"]
            lines.append(f"\n{t} ({split}): routed minus LoRA full depth on the same {p['n']} steps: "
                         f"{_f(p['diff_points'], 1)} points (95% CI {_f(lo, 1)} to {_f(hi, 1)}); both right "
                         f"{p['both_correct']}, only LoRA {p['only_a']}, only routed {p['only_b']}")
        for t, pairs in (doc.get("accuracy_paired" + key) or {}).items():
            for name, p in pairs.items():
                if name != "routed_vs_lora_full_depth":  # that one is above
                    c, ref = name.split("_vs_")
                    lo, hi = p["diff_ci95"]
                    lines.append(f"\n{t} ({split}): {c} minus {ref}, paired on {p['n']} steps: "
                                 f"{_f(p['diff_points'], 1)} points (95% CI {_f(lo, 1)} to {_f(hi, 1)}); "
                                 f"only {ref} {p['only_a']}, only {c} {p['only_b']}")
        for t, row in acc.items():
            for c, v in row.items():
                for ref, n in (v.get("reused_from") or {}).items():  # said, not hidden
                    lines.append(f"\n{t} ({split}): {c} reused {ref}'s generation on {n} of {v['n']} steps "
                                 f"(its gates opened every block there: the same computation)")
    agg = doc.get("aggregate")
    if agg:
        lines += ["", f"### Seeds ({len(doc['seeds'])})", "", "| split | measure | mean | std | per seed |",
                  "|---|---|---:|---:|---|"]
        for split, vals in agg.items():
            for key in ("skip_differential_points", "tool_call.block_flops_skipped", "planning.block_flops_skipped",
                        "tool_call.ppl.routed", "planning.ppl.routed"):
                v = vals[key]
                lines.append(f"| {split} | {key} | {_f(v['mean'])} | {_f(v['std'])} | "
                             f"{', '.join(_f(x) for x in v['values'])} |")
    return lines


def _save(fig, path: Path) -> None:
    """Write the figure whole, then rename it into place (a crash never leaves half a picture), and close it."""
    path = Path(path)
    try:
        fig.tight_layout()
        with atomic_path(path) as tmp:
            # bbox_inches="tight" keeps a legend or title outside the axes in the picture
            fig.savefig(tmp, dpi=120, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)  # a failed save must not leak the figure into the next one


def plot_heatmap(doc: dict, path: Path) -> None:
    rates = doc["splits"]["full"]["per_layer_run_rate"]
    rows = [[x if x is not None else float("nan") for x in rates[t]] for t in ("tool_call", "planning")]
    fig, ax = plt.subplots(figsize=(max(6, len(rows[0]) * 0.3), 2.2))
    im = ax.imshow(rows, aspect="auto", vmin=0, vmax=1, cmap="viridis")
    ax.set_yticks([0, 1], ["tool call", "planning"])
    ax.set_xlabel("block")
    ax.set_title("run rate per block (1 = always runs)")
    fig.colorbar(im, ax=ax)
    _save(fig, path)


def plot_pareto(doc: dict, path: Path) -> None:
    sweep = doc.get("threshold_sweep")
    if not sweep or sweep_coincides(sweep):  # one point drawn len(sweep) times: the report says so instead
        Path(path).unlink(missing_ok=True)  # not an earlier run's plot beside a report that no longer shows it
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for t, marker in (("tool_call", "o"), ("planning", "s")):
        xs = [100 * p[t]["total_flops_skipped"] for p in sweep]
        ys = [p[t]["ppl"] for p in sweep]
        ax.plot(xs, ys, marker=marker, label=t)
        for p, x, y in zip(sweep, xs, ys, strict=True):
            ax.annotate(f"{p['threshold']:.1f}", (x, y), fontsize=7)
    ax.set_xlabel("total forward FLOPs skipped (%)")
    ax.set_ylabel("perplexity (routed)")
    ax.set_title("threshold sweep")
    ax.legend()
    _save(fig, path)


def plot_seeds(doc: dict, path: Path) -> None:
    seeds = doc.get("seeds") or []
    if len(seeds) < 2:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.38
    for j, split in enumerate(("full", "length_matched")):
        vals = [s["splits"][split]["skip_differential_points"] for s in seeds]
        ax.bar([i + j * width for i in range(len(vals))], vals, width, label=split)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks([i + width / 2 for i in range(len(seeds))], [Path(s["adapter"]).parent.name for s in seeds],
                  rotation=30, fontsize=7)
    ax.set_ylabel("differential (points)")
    ax.legend()
    _save(fig, path)


def write_report(doc: dict, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    plot_heatmap(doc, out_dir / "run_rate_heatmap.png")
    plot_pareto(doc, out_dir / "pareto.png")
    plot_seeds(doc, out_dir / "seeds.png")
    lines = ["# layerroute evaluation", "", f"Adapters: {', '.join(doc['adapters'])}", ""]
    lines += cost_table(doc) + [""] + _paper_table(doc) + [""] + _honest_table(doc)
    lines += ["", "![run rate per block](run_rate_heatmap.png)"]
    if len(doc.get("seeds") or []) > 1:
        lines.append("![differential per seed](seeds.png)")
    lines += sweep_lines(doc)
    return write_text_atomic(out_dir / "report.md", "\n".join(lines) + "\n")
