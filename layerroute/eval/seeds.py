"""Several adapters (seeds): the headline numbers of one evaluation, flat (`seed_metrics`, also what
`layerroute ablation` aggregates), and their mean and standard deviation over seeds."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from .accuracy import ACCURACY_SUFFIX
from .configurations import PPL_CONFIGS, STEP_TYPES


def seed_metrics(res: dict, split: str) -> dict[str, float]:
    """The headline numbers of one adapter's evaluation on one split, flat ("tool_call.ppl.routed": 1.2, ...).

    The one definition of what is aggregated over seeds, here and in `layerroute ablation`.
    """
    s = res["splits"][split]
    out = {"skip_differential_points": s["skip_differential_points"]}
    lo_hi = s.get("differential_ci95") or [float("nan"), float("nan")]
    out["differential_ci95_low"], out["differential_ci95_high"] = lo_hi
    for t in STEP_TYPES:
        out[f"{t}.n"] = s[t]["n"]
        for key in ("block_flops_skipped", "total_flops_skipped"):
            out[f"{t}.{key}"] = s[t][key]
        for c in PPL_CONFIGS:
            out[f"{t}.ppl.{c}"] = s[t]["ppl"][c]
            if "teacher_forced_exact" in s[t]:  # absent from evaluations before session 5
                out[f"{t}.tf_exact.{c}"] = s[t]["teacher_forced_exact"][c]
        for name, b in (s[t].get("baselines") or {}).items():
            out[f"{t}.ppl.{name}"] = b["ppl"]
            if "teacher_forced_exact" in b:
                out[f"{t}.tf_exact.{name}"] = b["teacher_forced_exact"]
        # free-running accuracy on each split's own draw (length-matched draws from session 9 on)
        for c, v in (res.get("accuracy" + ACCURACY_SUFFIX[split]) or {}).get(t, {}).items():
            out[f"{t}.accuracy.{c}"] = v["accuracy"]
            out[f"{t}.accuracy_n.{c}"] = v["n"]
            if "teacher_forced_exact" in v:  # absent from evaluations before session 5
                out[f"{t}.accuracy_tf_exact.{c}"] = v["teacher_forced_exact"]
            if "accuracy_unseen" in v:  # BFCL live_* steps only (session 9 on)
                out[f"{t}.accuracy_unseen.{c}"] = v["accuracy_unseen"]
                out[f"{t}.accuracy_unseen_n.{c}"] = v["n_unseen"]
        # routed minus LoRA full depth, paired step by step, with its bootstrap interval (one seed's own figure:
        # the interval does not average over seeds, so tables show it per seed)
        paired = (res.get("accuracy_paired_routed_vs_lora" + ACCURACY_SUFFIX[split]) or {}).get(t)
        if paired:
            out[f"{t}.accuracy_paired.diff_points"] = paired["diff_points"]
            out[f"{t}.accuracy_paired.ci95_low"], out[f"{t}.accuracy_paired.ci95_high"] = paired["diff_ci95"]
    return out


def aggregate_seeds(per_adapter: list[dict]) -> dict:
    """Mean and standard deviation over adapters of the headline numbers, per split."""
    return {split: aggregate_metrics([seed_metrics(res, split) for res in per_adapter])
            for split in ("full", "length_matched")}


def aggregate_metrics(rows: list[dict[str, float]]) -> dict[str, dict]:
    """{metric: {mean, std, values}} over per-seed `seed_metrics` rows; a metric absent from a seed (e.g. a baseline
    where the routers skipped nothing) has fewer values than there are seeds."""
    vals = defaultdict(list)
    for row in rows:
        for key, v in row.items():
            vals[key].append(v)
    return {k: {**_mean_std(v), "values": v} for k, v in vals.items()}


def _mean_std(values: list[float]) -> dict:
    """Mean and std over the finite values (NaN when there are none, e.g. an empty length-matched split)."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return {"mean": float("nan"), "std": float("nan")}
    return {"mean": float(np.mean(finite)), "std": float(np.std(finite))}
