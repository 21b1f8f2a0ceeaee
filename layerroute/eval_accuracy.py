"""The old home of free-running accuracy: now `layerroute.eval.accuracy`. Re-exports its names so that
`from layerroute.eval_accuracy import ...` keeps working."""

from __future__ import annotations

from .eval.accuracy import (
    ACCURACY_SUFFIX,
    PAIRS,
    REASON_CONTEXT,
    REASON_LENGTH,
    REASON_SPEC,
    REFERENCE,
    generate_and_score,
    paired_accuracy,
    paired_by_config,
    reuse_counts,
    score,
    score_generation,
    step_id,
)
from .eval.accuracy import _reused as _reused

__all__ = [
    "ACCURACY_SUFFIX", "PAIRS", "REASON_CONTEXT", "REASON_LENGTH", "REASON_SPEC", "REFERENCE", "generate_and_score",
    "paired_accuracy", "paired_by_config", "reuse_counts", "score", "score_generation", "step_id",
]
