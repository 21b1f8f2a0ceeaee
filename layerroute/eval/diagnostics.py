"""Whether the skip figures mean what they seem to: the differential's bootstrap interval, how often each router's
decision depends on its input (vs a bias-only router), and how much the gates follow the context length."""

from __future__ import annotations

import numpy as np
import torch

from ..adapters import RoutedModel
from ..nn.routed import find_routed_layers


def bootstrap_differential(block_skips: dict[str, list[float]], reps: int, seed: int) -> list[float]:
    """95% CI of 100 x (mean tool skip - mean planning skip), resampling steps within each type."""
    tool, plan = np.asarray(block_skips["tool_call"]), np.asarray(block_skips["planning"])
    if len(tool) == 0 or len(plan) == 0 or reps == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    diffs = [
        100 * (rng.choice(tool, len(tool)).mean() - rng.choice(plan, len(plan)).mean()) for _ in range(reps)
    ]
    return [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))]


def input_dependence(rm: RoutedModel, results: list[dict], idx: list[int]) -> list[float]:
    """Per block: fraction of steps where the router's decision differs from a bias-only router's."""
    thr = rm.state.threshold
    out = []
    for layer in find_routed_layers(rm.model):
        bias_only = torch.sigmoid(layer.router.output_bias.detach().float()).item() > thr
        out.append(float(np.mean([results[i]["gates"][layer.index] != bias_only for i in idx])) if idx else 0.0)
    return out


def length_correlation(steps, results, idx) -> float:
    """Pearson correlation of the fraction of blocks run with the context length (0 when either is constant)."""
    if len(idx) < 3:
        return float("nan")
    run = np.array([np.mean(results[i]["gates"]) for i in idx])
    ctx = np.array([steps[i].context_length for i in idx], dtype=float)
    if run.std() == 0 or ctx.std() == 0:
        return 0.0
    return float(np.corrcoef(run, ctx)[0, 1])
