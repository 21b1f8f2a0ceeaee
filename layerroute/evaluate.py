"""Evaluation that cannot fool itself: skip rates, perplexity in four configurations, free-running task accuracy,
equal-FLOP baselines, a threshold sweep, diagnostics, and several seeds.

`layerroute eval --adapter DIR [--adapter DIR2 ...] [--config YAML] --output-dir OUT` writes OUT/eval.json,
OUT/report.md and PNG plots.

Configurations, always on the same steps:
  base             LoRA off, every block runs (the frozen model)
  lora_full_depth  LoRA on, every block runs
  routed           LoRA on, the routers decide (hard gates, context only)
  routed_no_lora   LoRA off, the routers decide
Baselines at the routed model's FLOP budget (LoRA on): `shortgpt` removes the k blocks of lowest block influence
(1 - cos(h_in, h_out), measured on training steps), `random` skips k random blocks per step, where k is the
routed model's mean number of skipped blocks.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
from collections import defaultdict
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import flops as flop_count
from .adapters import RoutedModel, load_adapter, read_adapter_meta
from .atomic import write_text_atomic
from .config import EvalConfig, ModelConfig
from .errors import ConfigError
from .eval_accuracy import (
    ACCURACY_SUFFIX,
    REFERENCE,
    paired_accuracy,
    paired_by_config,
    reuse_counts,
)
from .eval_teacher_forced import ppl, teacher_forced, teacher_forced_exact
from .influence import block_influence
from .params import parameter_counts
from .routed import find_routed_layers
from .stage_cache import StageCache, directory_digest, fingerprint

STEP_TYPES = ("tool_call", "planning")
PPL_CONFIGS = ("base", "lora_full_depth", "routed", "routed_no_lora")
ACC_CONFIGS = ("base", "lora_full_depth", "routed", "routed_no_lora")


# ------------------------------------------------------------------------------------------------------------
# Teacher-forced pass (the pass itself, `ppl` and `teacher_forced_exact`: eval_teacher_forced.py)


def flop_summary(model_config, steps, gates: list[list[bool]], idx: list[int], kv_policy: str,
                 count_routers: bool = True, prompt_full_depth: bool = False, bridge_rank: int = 0) -> dict:
    parts = [
        flop_count.step_flops(model_config, steps[i].context_length, steps[i].length, gates[i],
                              kv_preserving=kv_policy == "kv_preserving", count_routers=count_routers,
                              prompt_full_depth=prompt_full_depth, bridge_rank=bridge_rank)
        for i in idx
    ]
    agg = flop_count.aggregate(parts)
    return {"block_flops_skipped": agg["block_skipped_fraction"], "total_flops_skipped": agg["total_skipped_fraction"]}


# ------------------------------------------------------------------------------------------------------------
# Baselines


def shortgpt_pattern(influence: list[float], k: int) -> list[bool]:
    drop = set(np.argsort(influence)[:k].tolist())
    return [i not in drop for i in range(len(influence))]


def random_patterns(n_steps: int, n_layers: int, k: int, seed: int) -> torch.Tensor:
    rng = random.Random(seed)
    pats = torch.ones(n_steps, n_layers, dtype=torch.bool)
    for s in range(n_steps):
        pats[s, rng.sample(range(n_layers), k)] = False
    return pats


# ------------------------------------------------------------------------------------------------------------
# Free-running accuracy (generation, scoring and paired statistics: eval_accuracy.py)


def step_constraint(rm: RoutedModel, step, eos: list[int]):
    """eval.constrained: a tool-call step's grammar (calls of its offered tools with schema-valid arguments, then
    end of turn); None for other steps, which decode freely.

    Several calls only where the step's BFCL category asks for them (parallel, parallel_multiple, live_parallel*;
    a step without a category too): elsewhere one call, then the end of turn, because SmolLM2 measured under a
    grammar that allowed more repeats its correct call until the budget cuts the copy, which then fails to parse."""
    from .constrain import tool_call_processor

    if step.step_type != "tool_call" or not step.tools:
        return None
    parallel = step.category is None or "parallel" in step.category
    return tool_call_processor(rm, [step.tools], "required", stop_ids=eos, parallel=parallel)


def accuracy(rm: RoutedModel, steps, idx: list[int], config: str, cfg: EvalConfig, *, threshold=None,
             forced=None, patterns=None, reference: dict | None = None) -> dict:
    """Greedy generation with real skipping (LoRA merged), in batches of `cfg.accuracy_batch_size` steps
    (`layerroute.eval_accuracy`); fraction scored correct.

    forced: one gate pattern ([L] bools) for every step (the ShortGPT baseline); patterns: one per step of `idx`
    (the random-skip baseline). reference: the full-depth configuration's result on the same steps, whose
    generations are reused where this configuration's gates open every block. `samples` keeps one entry per step
    in `idx` order, so two configurations scored on the same steps can be compared step by step
    (`paired_accuracy`) and any subset re-summarised (`accuracy_subset`)."""
    from .eval_accuracy import generate_and_score

    if patterns is not None and len(patterns) != len(idx):
        raise ValueError(f"accuracy: {len(patterns)} gate patterns for {len(idx)} steps")
    eos = _eos_ids(rm.tokenizer)
    gates = [list(p) for p in patterns] if patterns is not None else (
        [list(forced)] * len(idx) if forced is not None else None)
    samples = generate_and_score(rm, [steps[i] for i in idx], config, cfg, stop=eos,
                                 threshold=threshold, gates=gates, reference=reference,
                                 logits_processor_for=partial(step_constraint, rm, eos=eos) if cfg.constrained else None)
    # the same steps teacher-forced: a step with no greedy token error must come out as its target (the check
    # that the cheap proxy `teacher_forced_exact` means what it says, step by step, on real generations)
    chosen = [steps[i] for i in idx]
    tf_patterns = None
    if config in ("base", "lora_full_depth"):
        tf_config = config
    elif patterns is not None:  # one pattern per step: evaluate's "random" (LoRA on, forced gates)
        tf_config, tf_patterns = "random", torch.tensor([list(p) for p in patterns], dtype=torch.bool)
    elif forced is None:
        tf_config = "routed_no_lora" if config == "routed_no_lora" else "routed"
    else:  # one forced pattern for every step: evaluate's "shortgpt" (LoRA on, forced gates)
        tf_config, tf_patterns = "shortgpt", torch.tensor([forced] * len(idx))
    tf = teacher_forced(rm, chosen, tf_config, cfg, threshold=threshold, patterns=tf_patterns,
                        desc=f"teacher-forced {config}") if idx and cfg.accuracy_teacher_forced else []
    for sample, r in zip(samples, tf, strict=False):  # none when eval.accuracy_teacher_forced is off
        sample["teacher_forced_errors"] = r["errors"]
    return _accuracy_summary(samples)


def _accuracy_summary(samples: list[dict], unseen_categories=None) -> dict:
    """Accuracy, failure reasons and teacher-forced exact rate of some scored steps; with `unseen_categories`, also
    the accuracy on the steps of those categories (BFCL live_*: functions never seen in training)."""
    failures = defaultdict(int)
    for s in samples:
        if not s["correct"]:
            failures[(s["reason"] or "wrong").split(":")[0]] += 1
    n = len(samples)
    out = {"accuracy": sum(s["correct"] for s in samples) / n if n else float("nan"), "n": n,
           "failures": dict(failures), "samples": samples}
    if any("teacher_forced_errors" in s for s in samples):  # eval.accuracy_teacher_forced off: no cross-check
        # ran, so no figure (not a 0% that reads as measured)
        out["teacher_forced_exact"] = sum(s.get("teacher_forced_errors") == 0 for s in samples) / n
    unseen = [s for s in samples if s.get("category") in (unseen_categories or ())]
    if unseen:
        out["accuracy_unseen"] = sum(s["correct"] for s in unseen) / len(unseen)
        out["n_unseen"] = len(unseen)
    return out


def accuracy_subset(result: dict, keys: list[tuple[str, int]], unseen_categories=None) -> dict:
    """`accuracy`'s result restricted to the steps `keys` ((conversation_id, step_index), in this order)."""
    by_key = {(s["conversation_id"], s["step_index"]): s for s in result["samples"]}
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise ValueError(f"accuracy_subset: step {missing[0]} was not scored")
    return _accuracy_summary([by_key[k] for k in keys], unseen_categories)


def _accuracy_steps(ppl_steps, ppl_groups: dict[str, list[int]], all_steps, cfg: EvalConfig) -> dict[str, list]:
    """The steps of each type scored by free-running generation.

    A count the perplexity sample can hold is drawn from it (one generator over the types in order: the draw
    that produced every earlier accuracy figure); a larger one is drawn from the whole eval split, so accuracy
    can rest on many more steps than the teacher-forced passes, which cost several forwards per step."""
    rng = random.Random(cfg.seed + 1)
    out = {}
    for t in STEP_TYPES:
        n, group = cfg.accuracy_steps(t), ppl_groups[t]
        sources = cfg.accuracy_planning_sources if t == "planning" else []
        if n <= 0:
            out[t] = []
        elif sources:  # e.g. GSM8K test problems only: drawn from the whole eval split's steps of those sources
            pool = [s for s in all_steps if s.step_type == t and s.source in sources]
            missing = sorted(set(sources) - {s.source for s in pool})
            if missing:
                raise ConfigError(f"eval.accuracy_planning_sources: no eval planning steps from source {missing[0]!r} "
                                  f"(sources with some: {sorted({s.source for s in all_steps if s.step_type == t})})")
            out[t] = [pool[i] for i in sorted(rng.sample(range(len(pool)), n))] if len(pool) > n else pool
        elif n <= len(group):
            out[t] = [ppl_steps[i] for i in (sorted(rng.sample(group, n)) if len(group) > n else group)]
        else:
            pool = [i for i, s in enumerate(all_steps) if s.step_type == t]
            out[t] = [all_steps[i] for i in (sorted(rng.sample(pool, n)) if len(pool) > n else pool)]
    return out


def _length_matched_accuracy_steps(matched_steps, cfg: EvalConfig) -> dict[str, list]:
    """The length-matched steps of each type scored by free-running generation: drawn from the whole
    length-matched split (all of them when it holds no more than asked), with a generator of their own so that the
    full split's draw stays the one of every earlier figure."""
    rng = random.Random(cfg.seed + 2)
    out = {}
    for t in STEP_TYPES:
        pool = [s for s in matched_steps if s.step_type == t]
        n = cfg.accuracy_steps(t, "length_matched")
        out[t] = pool if n >= len(pool) else [pool[i] for i in sorted(rng.sample(range(len(pool)), n))]
    return out


def _step_key(step) -> tuple[str, int]:
    return step.conversation_id, step.step_index


def _eos_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


# ------------------------------------------------------------------------------------------------------------
# Diagnostics


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


# ------------------------------------------------------------------------------------------------------------
# One adapter


def _by_type(steps, idx) -> dict[str, list[int]]:
    groups = {t: [] for t in STEP_TYPES}
    for i in idx:
        groups[steps[i].step_type].append(i)
    return groups


def _cap(groups: dict[str, list[int]], n: int, seed: int) -> dict[str, list[int]]:
    if n <= 0:
        return groups
    rng = random.Random(seed)
    return {t: sorted(rng.sample(ix, n)) if len(ix) > n else ix for t, ix in groups.items()}


def _steps_key(steps) -> str:
    """What a stage computed on some steps depends on: their identity and their tokens."""
    return fingerprint([[s.conversation_id, s.step_index, s.context_length, list(map(int, s.input_ids))]
                        for s in steps])


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
    model_config = rm.config
    # FLOP summary of some steps under this evaluation's cache policy and prompt depth
    # (a skipped block's skip bridge, when the adapter has them, runs in every forced configuration too)
    flops = partial(flop_summary, model_config, steps, kv_policy=cfg.kv_policy,
                    prompt_full_depth=cfg.prompt_full_depth, bridge_rank=rm.router_cfg.bridge_rank)

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


# ------------------------------------------------------------------------------------------------------------
# Several adapters (seeds)


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


def run_eval(adapters: list[str], data_cfg, cfg: EvalConfig, model_name: str | None, out_dir: Path, *,
             tokenizer: str | None = None, chat_template: str | None = None, dtype: str = "float32") -> dict:
    """Evaluate each adapter on the base model (its own unless `model_name`) loaded in `dtype` (model.dtype).

    `tokenizer` / `chat_template`: model.tokenizer / model.chat_template given explicitly, which each adapter
    must have been trained with (its own saved tokenizer and template are what it is evaluated with)."""
    from .adapters import adapter_base_name
    from .data.build import load_steps
    from .identity import same_tokenizer, tokenizer_identity

    out_dir.mkdir(parents=True, exist_ok=True)
    per_adapter, data, loaded_tok = [], None, None
    for n, path in enumerate(adapters):
        meta = read_adapter_meta(path)
        rm = load_adapter(path, ModelConfig(name=model_name or adapter_base_name(path, meta), tokenizer=tokenizer,
                                            chat_template=chat_template, dtype=dtype))
        if data is None:
            data = load_steps(data_cfg, rm.tokenizer)
            loaded_tok = rm.tokenizer
        elif (not same_tokenizer(tokenizer_identity(rm.tokenizer), tokenizer_identity(loaded_tok))
              or rm.tokenizer.chat_template != loaded_tok.chat_template):  # the steps were rendered with the first's
            raise ConfigError(f"adapter {path} uses another tokenizer or chat template than {adapters[0]}; evaluate "
                              "them separately")
        # finished stages kept until eval.json is written: an interrupted run resumes from them (a changed adapter,
        # config or step set is not reused: each stage's key names what it depends on)
        cache = StageCache(out_dir / "partial" / f"adapter{n}",
                           {"adapter": directory_digest(path), "model": model_name, "eval": asdict(cfg),
                            **({"dtype": dtype} if dtype != "float32" else {})})  # fp32 keys as before
        res = evaluate_adapter(rm, data, cfg, meta, cache=cache)
        res["adapter"] = str(path)
        per_adapter.append(res)
        del rm
    doc = assemble(per_adapter, asdict(cfg), data.stats() if hasattr(data, "stats") else None)
    from .report import write_report

    _write_json(out_dir / "eval.json", doc)
    write_report(doc, out_dir)
    shutil.rmtree(out_dir / "partial", ignore_errors=True)  # eval.json holds everything now
    return doc


def assemble(per_adapter: list[dict], eval_config: dict, data_report) -> dict:
    """One eval.json document from per-adapter results; several adapters are aggregated as seeds."""
    first = per_adapter[0]
    several = len(per_adapter) > 1
    doc = {
        **{k: v for k, v in first.items() if k != "adapter"},
        "adapters": [r["adapter"] for r in per_adapter],
        "seeds": per_adapter if several else [],
        "aggregate": aggregate_seeds(per_adapter) if several else None,
        "eval_config": eval_config,
        "data_report": data_report,
    }
    # headline fields at top level, from the full split (mean over seeds when several adapters)
    doc["skip_differential_points"] = (
        doc["aggregate"]["full"]["skip_differential_points"]["mean"] if several
        else first["splits"]["full"]["skip_differential_points"]
    )
    doc["per_layer_run_rate"] = first["splits"]["full"]["per_layer_run_rate"]
    return doc


def read_json(path: str, *, missing: str, invalid: str):
    """A JSON file's content, or a ConfigError saying `missing` (no file) or `invalid` (and why it is not JSON)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(missing) from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{invalid} (invalid JSON: {err})") from None


def read_per_adapter(paths: list[str]) -> list[dict]:
    """Per-adapter results from finished eval.json files (a multi-seed file contributes each of its seeds)."""
    per_adapter = []
    for path in paths:
        doc = read_json(path, missing=f"no such evaluation: {path}", invalid=f"{path} is not an eval.json")
        if "splits" not in doc:
            raise ConfigError(f"{path} is not an eval.json (no 'splits')")
        for one in doc.get("seeds") or [doc]:
            one = {k: v for k, v in one.items() if k not in ("seeds", "aggregate", "adapters")}
            one.setdefault("adapter", (doc.get("adapters") or [path])[0])
            per_adapter.append(one)
    return per_adapter


def combine(paths: list[str], out_dir: Path) -> dict:
    """Aggregate finished evaluations (their eval.json files) as seeds, without evaluating again."""
    per_adapter = read_per_adapter(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    first = json.loads(Path(paths[0]).read_text())
    doc = assemble(per_adapter, first.get("eval_config", {}), first.get("data_report"))
    from .report import write_report

    _write_json(out_dir / "eval.json", doc)
    write_report(doc, out_dir)
    return doc


def _write_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=_json_default))


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, float) and math.isnan(o):
        return None
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ------------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", action="append", help="adapter directory (repeat for seeds)")
    parser.add_argument("--combine", nargs="+", metavar="EVAL_JSON",
                        help="aggregate finished evaluations (eval.json files) as seeds instead of evaluating")
    parser.add_argument("--config", help="YAML whose data: and eval: sections to use (default: the adapter's)")
    parser.add_argument("--model", help="base model to load the adapter on (default: the adapter's own)")
    parser.add_argument("--overlay", action="append", default=[], metavar="YAML",
                        help="YAML whose eval: section overrides the config's, key by key (e.g. "
                             "configs/eval-of-record.overlay.yaml); applied before --set")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. eval.bootstrap=0")
    parser.add_argument("--output-dir", required=True)


def run(args: argparse.Namespace) -> int:
    from .config import RunConfig, apply_eval_overlay, apply_overrides, load_yaml

    if args.combine:
        doc = combine(args.combine, Path(args.output_dir))
        print(json.dumps({"skip_differential_points": doc["skip_differential_points"],
                          "report": str(Path(args.output_dir) / "report.md")}, default=_json_default))
        return 0
    if not args.adapter:
        raise ConfigError("layerroute eval needs --adapter DIR (or --combine EVAL_JSON ...)")
    if args.config:
        raw = load_yaml(args.config)
    else:  # the run config the first adapter was trained with
        raw = dict(read_adapter_meta(args.adapter[0]).get("training", {}).get("config", {}))
        # the adapter carries its template: a Jinja file named at training time need not exist any more
        raw["model"] = {k: v for k, v in (raw.get("model") or {}).items() if k != "chat_template"}
    for path in args.overlay:
        raw = apply_eval_overlay(raw, load_yaml(path), path)
    raw = apply_overrides(raw, args.set)
    run_cfg = RunConfig.from_dict({k: raw.get(k) for k in ("model", "router", "lora", "data", "train", "eval")})
    explicit = {item.split("=", 1)[0].strip() for item in args.set}  # model.* given on this command line
    model_keys = {k: getattr(run_cfg.model, k) for k in ("tokenizer", "chat_template") if f"model.{k}" in explicit}
    doc = run_eval(args.adapter, run_cfg.data, run_cfg.eval, args.model, Path(args.output_dir),
                   dtype=run_cfg.model.dtype, **model_keys)
    print(json.dumps({"skip_differential_points": doc["skip_differential_points"],
                      "report": str(Path(args.output_dir) / "report.md")}, default=_json_default))
    return 0
