"""Train/eval assignment by conversation, and the length-matched evaluation subset.

Split: a conversation goes to eval when ``sha256(f"{seed}:{conversation_id}")`` read as a fraction in [0, 1)
is below ``eval_fraction``. The assignment depends only on the id and the seed, so it is stable across runs,
machines and `limit` changes, and no step of an eval conversation can land in train. Sources with role
'train' or 'eval' skip the hash; BFCL categories in ``bfcl_eval_only_categories`` always go to eval.

Length matching: in prior evaluations step type was nearly collinear with sequence length, so a gate that
only tracked length looked input-conditioned. The matched subset bins eval steps on two axes at once,
context length and step (target) length, with geometric bins ``[r^k, r^(k+1))``, and keeps, in every 2-D bin
that holds both types, the same number of tool-call and planning steps (the smaller of the two counts,
sampled deterministically by a seeded hash of the step id). Within the subset both types therefore have
the same joint histogram of (context length, step length) at that bin resolution.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, defaultdict

from layerroute.data.render import PLANNING, TOOL_CALL, Step


def hash_fraction(key: str, seed: int) -> float:
    """A deterministic number in [0, 1) from a key and a seed."""
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def assign_split(
    conversation_id: str, *, seed: int, eval_fraction: float, role: str = "both", eval_only: bool = False
) -> str:
    """'train' or 'eval' for one conversation (see the module docstring)."""
    if eval_only or role == "eval":
        return "eval"
    if role == "train":
        return "train"
    return "eval" if hash_fraction(conversation_id, seed) < eval_fraction else "train"


def length_bin(n: int, ratio: float) -> int:
    """Geometric bin index k with r^k <= n < r^(k+1) (n >= 1)."""
    # The small epsilon keeps exact powers of r in their own bin despite float rounding.
    return int(math.floor(math.log(max(n, 1)) / math.log(ratio) + 1e-9))


def step_bin(step: Step, ratio: float) -> tuple[int, int]:
    """(context-length bin, step-length bin)."""
    return length_bin(step.context_length, ratio), length_bin(step.length, ratio)


def bin_histogram(steps: list[Step], ratio: float) -> dict[str, Counter]:
    """Per step type, how many steps fall in each 2-D length bin."""
    out: dict[str, Counter] = {TOOL_CALL: Counter(), PLANNING: Counter()}
    for s in steps:
        out[s.step_type][step_bin(s, ratio)] += 1
    return out


def length_matched_subset(
    steps: list[Step], *, ratio: float, seed: int, max_per_type: int | None = None
) -> tuple[list[Step], dict]:
    """Equal numbers of tool-call and planning steps per (context length, step length) bin.

    Returns (subset, info); info reports the size, the bins used, and how much of each type survived.
    """
    by_bin: dict[tuple[int, int], dict[str, list[Step]]] = defaultdict(lambda: {TOOL_CALL: [], PLANNING: []})
    for s in steps:
        by_bin[step_bin(s, ratio)][s.step_type].append(s)
    quota = {b: min(len(g[TOOL_CALL]), len(g[PLANNING])) for b, g in by_bin.items()}
    total = sum(quota.values())
    if max_per_type is not None and total > max_per_type:
        # Scale every bin down proportionally; hand the remainder to the largest fractional parts.
        exact = {b: q * max_per_type / total for b, q in quota.items()}
        quota = {b: int(math.floor(v)) for b, v in exact.items()}
        left = max_per_type - sum(quota.values())
        for b in sorted(exact, key=lambda b: (-(exact[b] - quota[b]), b))[:left]:
            quota[b] += 1
    subset: list[Step] = []
    for b in sorted(by_bin):
        q = quota[b]
        if q == 0:
            continue
        for t in (TOOL_CALL, PLANNING):
            ranked = sorted(by_bin[b][t], key=lambda s: (hash_fraction(s.id, seed), s.id))
            subset.extend(ranked[:q])
    n_tool = sum(1 for s in steps if s.step_type == TOOL_CALL)
    n_plan = len(steps) - n_tool
    per_type = sum(quota.values())
    info = {
        "size": 2 * per_type,
        "per_type": per_type,
        "bin_ratio": ratio,
        "bins_matched": sum(1 for q in quota.values() if q > 0),
        "bins_tool_call_only": sum(1 for g in by_bin.values() if g[TOOL_CALL] and not g[PLANNING]),
        "bins_planning_only": sum(1 for g in by_bin.values() if g[PLANNING] and not g[TOOL_CALL]),
        "tool_call_kept_fraction": round(per_type / n_tool, 4) if n_tool else 0.0,
        "planning_kept_fraction": round(per_type / n_plan, 4) if n_plan else 0.0,
    }
    return subset, info
