"""All metrics for one adapter (`evaluate_adapter`): the teacher-forced passes of each configuration and the
equal-FLOP baselines, per split and step type; the threshold sweep; free-running accuracy, paired with its
reference. Each stage can be kept in a `StageCache`, so an interrupted evaluation resumes from its finished stages."""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from tqdm.auto import tqdm

from ..adapters import RoutedModel
from ..calibrate.influence import block_influence
from ..config import EvalConfig
from ..model import parameter_counts
from .accuracy import (
    ACCURACY_SUFFIX,
    REFERENCE,
    accuracy,
    accuracy_subset,
    paired_accuracy,
    paired_by_config,
    reuse_counts,
)
from .baselines import model_flop_summary, random_patterns, shortgpt_pattern
from .configurations import ACC_CONFIGS, PPL_CONFIGS, STEP_TYPES
from .diagnostics import bootstrap_differential, input_dependence, length_correlation
from .sampling import _accuracy_steps, _by_type, _cap, _length_matched_accuracy_steps, _step_key, _steps_key
from .stage_cache import StageCache
from .teacher_forced import ppl, teacher_forced, teacher_forced_exact


def _staged(cache: StageCache | None, name: str, key, fn):
    """fn() once: from `cache` when an earlier, interrupted run of the same evaluation finished this stage."""
    return fn() if cache is None else cache.run(name, key, fn)


def evaluate_adapter(rm: RoutedModel, data, cfg: EvalConfig, meta: dict, cache: StageCache | None = None) -> dict:
    """All metrics for one adapter on the eval split and its length-matched subset.

    cache: where finished stages (each teacher-forced pass, each configuration's generations) are kept, so that a
    run interrupted part-way resumes from them (`run_eval` keeps one per adapter until eval.json is written)."""
    steps = all_steps = list(data.eval)
    matched_keys = {(s.conversation_id, s.step_index) for s in data.eval_length_matched}
    groups = _cap(_by_type(steps, range(len(steps))), cfg.max_steps_per_type, cfg.seed)
    matched_idx = _cap(
        _by_type(steps, [i for i, s in enumerate(steps) if (s.conversation_id, s.step_index) in matched_keys]),
        cfg.max_steps_per_type, cfg.seed,
    )
    # both splits capped per type; a step in both is evaluated once
    keep = sorted(set(sum(groups.values(), [])) | set(sum(matched_idx.values(), [])))
    matched_keys = {(steps[i].conversation_id, steps[i].step_index) for i in sum(matched_idx.values(), [])}
    steps = [steps[i] for i in keep]
    full = _cap(_by_type(steps, range(len(steps))), cfg.max_steps_per_type, cfg.seed)
    matched = _by_type(steps, [i for i, s in enumerate(steps) if (s.conversation_id, s.step_index) in matched_keys])
    splits = {"full": full, "length_matched": matched}
    # FLOP summary of some steps under this evaluation's cache policy and prompt depth, routers counted by kind
    # (a skipped block's skip bridge, when the adapter has them, runs in every forced configuration too)
    flops = model_flop_summary(rm, steps, cfg)

    steps_key = _steps_key(steps)
    runs = {c: _staged(cache, f"teacher_forced-{c}", steps_key, partial(teacher_forced, rm, steps, c, cfg))
            for c in tqdm(PPL_CONFIGS, desc="teacher-forced passes", unit="config")}
    routed = runs["routed"]
    gates = [r["gates"] for r in routed]

    out: dict = {"splits": {}, "meta": meta, "parameters": parameter_counts(rm.model)}
    n_layers = rm.num_layers
    # Equal-FLOP baselines per step type: each type's steps lose as many blocks as the routers took from that type
    # on average (rounded). A static removal that knows the step type is the honest rival of a router that learned
    # to tell the types apart; one count for both types would hand tool calls an easier budget than routing had.
    all_idx = sorted(set(sum(full.values(), [])) | set(sum(matched.values(), [])))
    step_type_of = {i: steps[i].step_type for i in all_idx}
    k = {t: int(round(float(np.mean([n_layers - sum(gates[i]) for i in all_idx if step_type_of[i] == t]))))
         if any(step_type_of[i] == t for i in all_idx) else 0 for t in STEP_TYPES}
    baseline_runs = {}
    if cfg.baselines and any(k.values()):
        calibration = list(data.train)[: cfg.calibration_steps] or steps
        influence = _staged(cache, "block_influence", _steps_key(calibration),
                            partial(block_influence, rm, calibration, cfg))
        by_type = {t: shortgpt_pattern(influence, k[t]) for t in STEP_TYPES}
        per_step = torch.tensor([by_type.get(s.step_type, [True] * n_layers) for s in steps])
        baseline_runs["shortgpt"] = (_staged(cache, "teacher_forced-shortgpt", [steps_key, per_step.tolist()],
                                             partial(teacher_forced, rm, steps, "shortgpt", cfg, patterns=per_step)),
                                     by_type)
        rand = torch.ones(len(steps), n_layers, dtype=torch.bool)
        for t in STEP_TYPES:
            rows = [i for i, s in enumerate(steps) if s.step_type == t]
            rand[rows] = random_patterns(len(rows), n_layers, k[t], cfg.seed + 1 + STEP_TYPES.index(t))
        baseline_runs["random"] = (_staged(cache, "teacher_forced-random", [steps_key, rand.tolist()],
                                           partial(teacher_forced, rm, steps, "random", cfg, patterns=rand)), None)
        out["block_influence"] = influence
    out["baseline_blocks_skipped"] = k

    for split, groups_ in splits.items():
        entry = {}
        for t in STEP_TYPES:
            idx = groups_[t]
            e = {"n": len(idx), **flops(gates, idx)}
            e["ppl"] = {c: ppl(runs[c], idx) for c in PPL_CONFIGS}
            e["teacher_forced_exact"] = {c: teacher_forced_exact(runs[c], idx) for c in PPL_CONFIGS}
            e["context_length_mean"] = float(np.mean([steps[i].context_length for i in idx])) if idx else None
            e["step_length_mean"] = float(np.mean([steps[i].length for i in idx])) if idx else None
            for name, (res, _) in baseline_runs.items():
                e.setdefault("baselines", {})[name] = {
                    "ppl": ppl(res, idx),
                    "teacher_forced_exact": teacher_forced_exact(res, idx),
                    **flops([r["gates"] for r in res], idx, count_routers=False),
                }
            entry[t] = e
        # each step's own block-FLOP skip: the fraction of blocks closed, except under prompt_full_depth, where a
        # closed block still runs over the context (so the interval is about the same quantity as the estimate)
        per_step_skip = {t: [flops(gates, [i])["block_flops_skipped"] for i in groups_[t]] for t in STEP_TYPES}
        entry["skip_differential_points"] = 100 * (
            entry["tool_call"]["block_flops_skipped"] - entry["planning"]["block_flops_skipped"]
        ) if groups_["tool_call"] and groups_["planning"] else float("nan")
        entry["differential_ci95"] = bootstrap_differential(per_step_skip, cfg.bootstrap, cfg.seed)
        entry["per_layer_run_rate"] = {
            t: [float(np.mean([gates[i][b] for i in groups_[t]])) if groups_[t] else None for b in range(n_layers)]
            for t in STEP_TYPES
        }
        entry["input_dependence"] = input_dependence(rm, routed, sum(groups_.values(), []))
        entry["gate_context_length_correlation"] = length_correlation(steps, routed, sum(groups_.values(), []))
        out["splits"][split] = entry

    if cfg.thresholds:
        sweep = []
        for thr in tqdm(cfg.thresholds, desc="threshold sweep", unit="threshold"):
            res = _staged(cache, f"teacher_forced-routed-threshold{thr}", steps_key,
                          partial(teacher_forced, rm, steps, "routed", cfg, threshold=thr, desc=f"threshold {thr}"))
            g = [r["gates"] for r in res]
            point = {"threshold": thr}
            for t in STEP_TYPES:
                idx = full[t]
                point[t] = {"ppl": ppl(res, idx), **flops(g, idx)}
            sweep.append(point)
        out["threshold_sweep"] = sweep

    # free-running accuracy: each type's draws from the full and the length-matched split, generated once per
    # configuration over their union and summarised per split (BFCL live_* steps also apart: unseen functions)
    draws = {"full": _accuracy_steps(steps, full, all_steps, cfg),
             "length_matched": _length_matched_accuracy_steps(data.eval_length_matched, cfg)}
    unseen = tuple(getattr(data.config, "bfcl_eval_only_categories", None) or ())
    acc = {split: {t: {} for t in STEP_TYPES} for split in draws}
    for t in STEP_TYPES:
        union = list({_step_key(s): s for d in draws.values() for s in d[t]}.values())
        if not union:
            continue
        idx = list(range(len(union)))
        union_key = _steps_key(union)
        results = {}
        # references first: a configuration reuses its reference's generation where its gates open every block
        ordered = sorted(cfg.accuracy_configs, key=lambda c: c not in ("base", "lora_full_depth"))
        for c in tqdm(ordered, desc=f"free-running accuracy ({t})", unit="config"):
            reference = results.get(REFERENCE.get(c))
            if c in ACC_CONFIGS:
                gates_key, run = None, partial(accuracy, rm, union, idx, c, cfg, reference=reference)
            elif c == "shortgpt" and "shortgpt" in baseline_runs:
                gates_key = baseline_runs["shortgpt"][1][t]
                run = partial(accuracy, rm, union, idx, c, cfg, forced=gates_key, reference=reference)
            elif c == "random" and "random" in baseline_runs:  # fresh patterns with the same count per type
                gates_key = random_patterns(len(union), n_layers, k[t], cfg.seed + 11 + STEP_TYPES.index(t)).tolist()
                run = partial(accuracy, rm, union, idx, c, cfg, patterns=gates_key, reference=reference)
            else:
                continue
            res = results[c] = _staged(cache, f"generate-{t}-{c}", [union_key, gates_key], run)
            for split, d in draws.items():
                if d[t]:
                    acc[split][t][c] = accuracy_subset(res, [_step_key(s) for s in d[t]], unseen)
                    reused = reuse_counts(res)
                    if reused:  # said, not hidden: these steps were not generated again
                        acc[split][t][c]["reused_from"] = reused
    for split, key in ACCURACY_SUFFIX.items():
        by_type = {t: v for t, v in acc[split].items() if v}
        if split == "full" or by_type:  # eval.json keeps "accuracy" (full split) as before
            out["accuracy" + key] = by_type
            # routed minus LoRA full depth, step by step on the same steps (issue 8's "within 1 point" target)
            out["accuracy_paired_routed_vs_lora" + key] = {
                t: paired_accuracy(v["lora_full_depth"], v["routed"], cfg.bootstrap, cfg.seed)
                for t, v in by_type.items() if "lora_full_depth" in v and "routed" in v}
            # every configuration minus its reference (lora_full_depth, or base for routed_no_lora), paired
            out["accuracy_paired" + key] = {t: paired_by_config(v, cfg.bootstrap, cfg.seed) for t, v in by_type.items()}
    return out
