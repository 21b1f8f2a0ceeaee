"""The per-step oracle's headroom (issue 35, item 2) from `layerroute oracle`'s JSONL: set sizes per step type,
the block FLOPs they skip, the best fixed set from the same tables, how much the sets differ, what predicts their
size, the free-running check, the beam and attention-only checks. Prints one JSON line; writes OUT.json and OUT.png.

    python benchmarks/headroom.py runs/oracle-smollm2 --output benchmarks/results/headroom_smollm2 \\
        --note "SmolLM2 lora_only s0 (50 steps), fp32, AMD EPYC AVX2, 2026-12-07"

The best fixed set of size k is read from the tables: a step counts as kept by a set S when S lies inside its oracle
set (k = 1: exact, from every step's single-removal checks; k > 1: a lower bound on the steps S keeps, since a step
may keep a set the greedy order did not reach). `--verified FILE` (JSON {"k": {"set": [...], "kept": n, "n": m}})
adds measured counts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import textwrap
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from layerroute.atomic import atomic_path  # noqa: E402
from layerroute.eval.io import write_json  # noqa: E402
from layerroute.eval.oracle import read_records  # noqa: E402


def spearman(x, y) -> float | None:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return None
    rx, ry = x.argsort().argsort().astype(float), y.argsort().argsort().astype(float)
    return float(np.corrcoef(rx, ry)[0, 1])


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def best_fixed_sets(records: list[dict], n_layers: int, k_max: int, beam: int = 64) -> list[dict]:
    """Per k, the set S of k blocks that the most steps' oracle sets contain (k = 1 from the single checks)."""
    sets = [set(r["oracle"]) for r in records]
    out = []
    singles = [sum(r["single_ok"][j] for r in records) for j in range(n_layers)]
    j = int(np.argmax(singles))
    out.append({"k": 1, "set": [j], "kept": singles[j], "kept_by_containment": sum(j in s for s in sets),
                "n": len(records)})
    frontier = [(sum({j}.issubset(s) for s in sets), (j,)) for j in range(n_layers)]
    frontier = sorted(frontier, reverse=True)[:beam]
    for k in range(2, k_max + 1):
        grown = {tuple(sorted(set(f) | {j})) for _, f in frontier for j in range(n_layers) if j not in f}
        scored = sorted(((sum(set(g).issubset(s) for s in sets), g) for g in grown), key=lambda t: (-t[0], t[1]))
        frontier = scored[:beam]
        if not frontier:
            break
        out.append({"k": k, "set": list(frontier[0][1]), "kept_by_containment": frontier[0][0], "n": len(records)})
    return out


def summarize(records: list[dict], n_layers: int) -> dict:
    recs = [r for r in records if "size" in r]
    sizes = np.array([r["size"] for r in recs])
    correct = [r for r in recs if r["full_depth"]["correct"]]
    out = {
        "n": len(recs), "not_measured": len(records) - len(recs),
        "full_depth_correct": len(correct),
        "criterion": sorted({r["criterion"] for r in recs}),
        "size_mean": float(sizes.mean()) if len(sizes) else None,
        "size_median": float(np.median(sizes)) if len(sizes) else None,
        "size_quartiles": [float(np.percentile(sizes, q)) for q in (25, 75)] if len(sizes) else None,
        "size_min_max": [int(sizes.min()), int(sizes.max())] if len(sizes) else None,
        "size_histogram": {int(k): int((sizes == k).sum()) for k in range(int(sizes.max()) + 1)} if len(sizes) else {},
        "share_with_at_least_2": float((sizes >= 2).mean()) if len(sizes) else None,
        "size_mean_where_full_depth_correct": float(np.mean([r["size"] for r in correct])) if correct else None,
        "block_flops_skipped_mean": {
            k: float(np.mean([r["flops"][k] for r in recs])) for k in
            ("block_fraction_prompt_full_depth", "decode_fraction", "block_fraction_if_context_skipped_too")},
        "single_removal_ok_share_per_block": [float(np.mean([r["single_ok"][j] for r in recs]))
                                              for j in range(n_layers)],
        "admissible_mean": float(np.mean([sum(r["single_ok"]) for r in recs])),
        "checks_mean": float(np.mean([r["checks"] for r in recs])),
        "seconds_per_step_mean": float(np.mean([r["seconds"] for r in recs])),
        "target_tokens_mean": float(np.mean([r["full_depth"]["tokens"] for r in recs])),
    }
    sets = [set(r["oracle"]) for r in recs]
    freq = [sum(j in s for s in sets) for j in range(n_layers)]
    out["block_frequency_in_oracle_sets"] = freq
    nonempty = [s for s in sets if s]
    pairs = list(itertools.combinations(nonempty, 2))
    out["jaccard_mean_nonempty_pairs"] = float(np.mean([jaccard(a, b) for a, b in pairs])) if pairs else None
    out["distinct_sets"] = len({tuple(sorted(s)) for s in sets})
    out["best_fixed_sets"] = best_fixed_sets(recs, n_layers, max(1, int(sizes.max()) if len(sizes) else 1))
    feats = ("context_length", "schema_chars", "n_args", "n_tools", "n_calls", "gold_length")
    out["spearman_size_vs"] = {f: spearman([r[f] for r in recs], sizes) for f in feats}
    out["spearman_size_vs"]["target_tokens"] = spearman([r["full_depth"]["tokens"] for r in recs], sizes)
    by_cat: dict[str, list[int]] = {}
    for r in recs:
        by_cat.setdefault(r["category"] or r["source"], []).append(r["size"])
    out["size_mean_by_category"] = {c: {"n": len(v), "mean": float(np.mean(v))} for c, v in sorted(by_cat.items())}
    by_fn: dict[str, list[int]] = {}
    for r in recs:
        for fn in set(r["functions"]):
            by_fn.setdefault(fn, []).append(r["size"])
    repeated = {f: v for f, v in by_fn.items() if len(v) >= 2}
    out["size_by_function_seen_twice_or_more"] = {f: v for f, v in sorted(repeated.items())}
    fr = [r for r in recs if "free_running" in r]
    if fr:
        out["free_running"] = {
            "n": len(fr), "identical": sum(r["free_running"]["identical"] for r in fr),
            "score_kept": sum(r["free_running"]["correct"] == r["full_depth"]["correct"] for r in fr),
            "full_depth_correct": sum(r["full_depth"]["correct"] for r in fr),
            "oracle_correct": sum(r["free_running"]["correct"] for r in fr),
            "differing_steps": [r["step"] for r in fr if not r["free_running"]["identical"]],
        }
    cs = [r for r in recs if "context_skipped_too" in r]
    if cs:
        out["context_skipped_too"] = {"n": len(cs), "still_exact": sum(r["context_skipped_too"]["errors"] == 0
                                                                          for r in cs)}
    bm = [r for r in recs if "beam" in r]
    if bm:
        out["beam"] = {"n": len(bm), "width": bm[0]["beam"]["width"],
                       "greedy_size_mean": float(np.mean([r["size"] for r in bm])),
                       "beam_size_mean": float(np.mean([r["beam"]["size"] for r in bm])),
                       "beam_larger": sum(r["beam"]["size"] > r["size"] for r in bm),
                       "beam_smaller": sum(r["beam"]["size"] < r["size"] for r in bm)}
    at = [r for r in recs if "attention_only" in r]
    if at:
        out["attention_only"] = {"n": len(at), "block_size_mean": float(np.mean([r["size"] for r in at])),
                                 "attention_size_mean": float(np.mean([r["attention_only"]["size"] for r in at])),
                                 "attention_decode_fraction_mean": float(np.mean(
                                     [r["attention_only"]["decode_fraction"] for r in at])),
                                 "block_decode_fraction_mean": float(np.mean(
                                     [r["flops"]["decode_fraction"] for r in at]))}
    return out


def plot(doc: dict, path: Path, n_layers: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = [t for t in doc["types"] if doc["types"][t]["n"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for t in types:
        hist = doc["types"][t]["size_histogram"]
        ks = sorted(int(k) for k in hist)
        n = doc["types"][t]["n"]
        axes[0].bar([k + (0.2 if t == "planning" else -0.2) for k in ks], [hist[k] / n for k in ks], width=0.4,
                    label=f"{t} (n {n}, mean {doc['types'][t]['size_mean']:.2f})")
        freq = doc["types"][t]["block_frequency_in_oracle_sets"]
        axes[1].bar([j + (0.2 if t == "planning" else -0.2) for j in range(n_layers)], [f / n for f in freq],
                    width=0.4, label=t)
    axes[0].set_xlabel("oracle set size (blocks removable together, per step)")
    axes[0].set_ylabel("share of steps")
    axes[0].legend(fontsize=8)
    axes[1].set_xlabel("block")
    axes[1].set_ylabel("share of steps whose oracle set holds it")
    axes[1].legend(fontsize=8)
    fig.suptitle(textwrap.fill(doc.get("note", ""), 160), fontsize=8)  # a long note wraps instead of running off
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("oracle_dir")
    p.add_argument("--output", required=True, help="path without suffix: .json and .png are written")
    p.add_argument("--note", default="")
    p.add_argument("--command", action="append", default=[], help="the command(s) that produced the JSONL")
    p.add_argument("--layers", type=int, default=30)
    args = p.parse_args(argv)
    doc = {"note": args.note, "commands": args.command, "types": {}}
    for t in ("tool_call", "planning"):
        recs = read_records(Path(args.oracle_dir) / f"oracle-{t}.jsonl")
        recs = sorted({r["step"]: r for r in recs}.values(), key=lambda r: r.get("index", 0))
        if recs:
            doc["types"][t] = summarize(recs, args.layers)
    tool = doc["types"].get("tool_call", {})
    doc["gate"] = {"rule": "tool calls average >= 2 removable blocks", "tool_call_size_mean": tool.get("size_mean"),
                   "passes": None if tool.get("size_mean") is None else tool["size_mean"] >= 2}
    out = str(args.output)  # "headroom_qwen2.5-0.5b" has no suffix to replace: the suffixes are appended
    write_json(Path(out + ".json"), doc)
    plot(doc, Path(out + ".png"), args.layers)
    print(json.dumps({t: {"n": v["n"], "size_mean": v["size_mean"]} for t, v in doc["types"].items()}
                     | {"gate": doc["gate"]["passes"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
