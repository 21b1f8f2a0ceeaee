"""The old home of `layerroute eval`: its code now lives in the `layerroute.eval` package (see its docstring for
which module owns what). This module re-exports the names that were importable from here, so
`from layerroute.evaluate import ...` keeps working. Patch a name where it is looked up (its new module), not here."""

from __future__ import annotations

from .config import EvalConfig as EvalConfig  # imported from here by tests
from .eval.accuracy import (
    ACCURACY_SUFFIX,
    REFERENCE,
    accuracy,
    accuracy_subset,
    paired_accuracy,
    paired_by_config,
    reuse_counts,
    step_constraint,
)
from .eval.accuracy import _accuracy_summary as _accuracy_summary
from .eval.adapter import _staged as _staged
from .eval.adapter import evaluate_adapter
from .eval.baselines import flop_summary, random_patterns, shortgpt_pattern
from .eval.cli import add_arguments, run
from .eval.configurations import ACC_CONFIGS, PPL_CONFIGS, STEP_TYPES
from .eval.diagnostics import bootstrap_differential, input_dependence, length_correlation
from .eval.io import _json_default as _json_default
from .eval.io import read_json, read_per_adapter, write_json
from .eval.runner import assemble, combine, run_eval
from .eval.sampling import _accuracy_steps as _accuracy_steps
from .eval.sampling import _by_type as _by_type
from .eval.sampling import _cap as _cap
from .eval.sampling import _length_matched_accuracy_steps as _length_matched_accuracy_steps
from .eval.sampling import _step_key as _step_key
from .eval.sampling import _steps_key as _steps_key
from .eval.seeds import _mean_std as _mean_std
from .eval.seeds import aggregate_metrics, aggregate_seeds, seed_metrics
from .eval.teacher_forced import ppl, teacher_forced, teacher_forced_exact
from .influence import block_influence as block_influence  # imported from here by tests

_write_json = write_json  # its old private name (layerroute.ablation used it)

__all__ = [
    "ACCURACY_SUFFIX", "ACC_CONFIGS", "PPL_CONFIGS", "REFERENCE", "STEP_TYPES", "accuracy", "accuracy_subset",
    "add_arguments", "aggregate_metrics", "aggregate_seeds", "assemble", "bootstrap_differential", "combine",
    "evaluate_adapter", "flop_summary", "input_dependence", "length_correlation", "paired_accuracy",
    "paired_by_config", "ppl", "random_patterns", "read_json", "read_per_adapter", "reuse_counts", "run",
    "run_eval", "seed_metrics", "shortgpt_pattern", "step_constraint", "teacher_forced", "teacher_forced_exact",
    "write_json",
]
