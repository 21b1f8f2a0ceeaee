"""Free-running accuracy of one configuration: every step generated in batches through the real-skip path
(`layerroute.infer.batched`), scored by the step's task (`layerroute.tasks.registry`: BFCL AST for tool calls,
final-number match for GSM8K), failures counted by reason.

`accuracy` (one configuration on some steps, with its teacher-forced cross-check; `accuracy_subset` re-summarises
part of it) calls `generate_and_score`, which scores each generation with `score_generation`; under eval.constrained
a tool-call step decodes with `step_constraint`'s grammar.
`paired_accuracy` compares two configurations step by step, `paired_by_config` every scored configuration with its
reference. `ACCURACY_SUFFIX` names each split's accuracy keys in eval.json. A step is never dropped: a prompt longer than the model's context and a generation that
hits its budget without closing its tool call are scored wrong with their own reasons.

Configurations that cannot differ are not generated twice: a step whose gates open every block (a forced pattern
that removes nothing, or routers that skip nothing on it) is its reference's generation (`lora_full_depth` for the
LoRA-on configurations, `base` for `routed_no_lora`), reused and marked ``reused_from`` (routers still pay one
prefill to decide; a forced pattern pays nothing).
"""

from __future__ import annotations

from collections import defaultdict
from functools import partial

import numpy as np
import torch

from ..adapters import RoutedModel
from ..config import EvalConfig
from ..infer.batched import Request, generate_batched
from ..infer.generate import stop_ids
from ..infer.stop import FINISH_CONTEXT, FINISH_LENGTH
from ..tasks.registry import task_for_step
from .teacher_forced import teacher_forced

# the configuration a config's step equals when its gates open every block
REFERENCE = {"routed": "lora_full_depth", "shortgpt": "lora_full_depth", "random": "lora_full_depth",
             "routed_no_lora": "base"}
# pairs reported by `paired_by_config`: (reference, configuration)
PAIRS = (("lora_full_depth", "routed"), ("lora_full_depth", "shortgpt"), ("lora_full_depth", "random"),
         ("base", "routed_no_lora"), ("base", "lora_full_depth"))

# the eval.json key suffix of each split's free-running accuracy ("accuracy", "accuracy_paired_routed_vs_lora" are
# the full split's, as before session 9)
ACCURACY_SUFFIX = {"full": "", "length_matched": "_length_matched"}

REASON_CONTEXT = "prompt exceeds the model's context"
REASON_LENGTH = "hit max_new_tokens"


def step_id(sample_or_step) -> str:
    """'conversation#step', the id eval.json lists steps by."""
    if isinstance(sample_or_step, dict):
        return f"{sample_or_step['conversation_id']}#{sample_or_step.get('step_index', 0)}"
    return f"{sample_or_step.conversation_id}#{sample_or_step.step_index}"


def score_generation(step, text: str) -> tuple[bool, str | None]:
    """(correct, reason) for one generated assistant turn, by the task that scores the step
    (`layerroute.tasks.registry.task_for_step`: BFCL's AST checker, GSM8K's final number, ...). Malformed output is
    wrong, never an exception."""
    return task_for_step(step).score(step, text)


def score(step, text: str, finish: str, extra: dict | None = None) -> tuple[bool, str | None]:
    """(correct, reason) of one generated step: `score_generation`'s verdict, with the reason saying when
    the prompt did not fit or the output was cut at its budget."""
    if finish == FINISH_CONTEXT:
        extra = extra or {}
        return False, f"{REASON_CONTEXT}: {extra.get('prompt_tokens')} tokens, context {extra.get('context')}"
    ok, reason = score_generation(step, text)
    if not ok and finish == FINISH_LENGTH:  # a call left open (or an answer cut off) by the budget
        return False, f"{REASON_LENGTH}: {reason}"
    return ok, reason


def generate_and_score(rm, steps, config: str, cfg, *, stop: list[int], threshold=None, gates=None,
                       reference: dict | None = None, logits_processor_for=None) -> list[dict]:
    """One sample per step (in order): correct, reason, text, tokens, finish, gates, and ``reused_from`` when the
    step was its reference's generation.

    gates: None (the routers decide; 'open' for base / lora_full_depth) or one [L] pattern per step (forced).
    reference: the reference configuration's `accuracy` result on the same steps (reused where gates are open).
    logits_processor_for(step): an optional per-step processor (e.g. a schema constraint), None for none."""
    n_layers = rm.num_layers
    if config in ("base", "lora_full_depth"):
        gates = [[True] * n_layers] * len(steps)
    if gates is not None and len(gates) != len(steps):
        raise ValueError(f"accuracy: {len(gates)} gate patterns for {len(steps)} steps")
    ref = None
    if reference is not None:
        ref = reference["samples"]
        if [step_id(s) for s in ref] != [step_id(s) for s in steps]:
            raise ValueError(f"{config}: the reference generations are not of the same steps")
    stop_set = frozenset(stop)
    samples: list[dict | None] = [None] * len(steps)
    todo = []
    for i, step in enumerate(steps):
        if ref is not None and gates is not None and all(gates[i]) and "tokens" in ref[i]:
            samples[i] = _reused(step, ref[i], rm, REFERENCE.get(config, "reference"))
        else:
            todo.append(i)
    reqs = [Request(list(steps[i].input_ids[: steps[i].context_length]),
                    task_for_step(steps[i]).budget(steps[i], cfg), stop=stop_set,
                    forced=None if gates is None or config in ("base", "lora_full_depth") else gates[i],
                    logits_processor=None if logits_processor_for is None else logits_processor_for(steps[i]))
            for i in todo]
    on_decided = None
    if ref is not None and gates is None:  # routers: a step they open fully is its reference's generation
        def on_decided(j, g):
            r = ref[todo[j]]
            return r["tokens"] if all(g) and "tokens" in r else None

    # base and lora_full_depth run every block: forced "open" (a router is still evaluated, as before)
    if config in ("base", "lora_full_depth"):
        reqs = [Request(r.prompt, r.max_new_tokens, r.stop, forced=[True] * n_layers,
                        logits_processor=r.logits_processor) for r in reqs]
    results = generate_batched(rm, reqs, batch_size=cfg.accuracy_batch_size, threshold=threshold,
                               kv_policy=cfg.kv_policy, prompt_full_depth=cfg.prompt_full_depth,
                               lora=config not in ("base", "routed_no_lora"), on_decided=on_decided,
                               desc=f"generate {config}", drafts=list(getattr(cfg, "drafts", None) or []) or None)
    for i, res in zip(todo, results, strict=True):
        step = steps[i]
        if res.finish == "reused":
            samples[i] = {**_reused(step, ref[i], rm, REFERENCE.get(config, "reference")), "gates": res.gates}
            continue
        text = rm.tokenizer.decode(res.tokens, skip_special_tokens=True)
        ok, reason = score(step, text, res.finish, res.extra)
        # kept so that a failure can be read, not only counted (a few hundred characters per step)
        samples[i] = {"conversation_id": step.conversation_id, "step_index": step.step_index,
                      "category": step.category, "correct": bool(ok), "reason": reason, "text": text[:2000],
                      "tokens": res.tokens, "finish": res.finish, "gates": res.gates}
    return samples  # type: ignore[return-value]


def _reused(step, ref_sample: dict, rm, ref_name: str) -> dict:
    out = {k: v for k, v in ref_sample.items() if k != "teacher_forced_errors"}
    out.update(conversation_id=step.conversation_id, step_index=step.step_index, reused_from=ref_name,
               gates=[True] * rm.num_layers)
    return out


def paired_accuracy(a: dict, b: dict, resamples: int, seed: int) -> dict:
    """b minus a on the same steps: counts of steps only one of them gets right, the accuracy difference in
    points and its 95% bootstrap interval over steps (paired: a step's two verdicts are resampled together)."""
    pa = np.array([s["correct"] for s in a["samples"]], dtype=float)
    pb = np.array([s["correct"] for s in b["samples"]], dtype=float)
    if len(pa) != len(pb) or [s["conversation_id"] for s in a["samples"]] != [s["conversation_id"]
                                                                               for s in b["samples"]]:
        raise ValueError("paired_accuracy needs both configurations scored on the same steps in the same order")
    out = {"n": len(pa), "both_correct": int((pa * pb).sum()), "only_a": int((pa * (1 - pb)).sum()),
           "only_b": int(((1 - pa) * pb).sum()), "diff_points": float("nan"), "diff_ci95": [float("nan")] * 2,
           # the steps behind the difference, by id, so that each can be read
           "only_a_ids": [step_id(s) for s, x, y in zip(a["samples"], pa, pb, strict=True) if x and not y],
           "only_b_ids": [step_id(s) for s, x, y in zip(a["samples"], pa, pb, strict=True) if y and not x]}
    if len(pa):
        d = pb - pa
        out["diff_points"] = 100 * float(d.mean())
    if len(pa) and resamples > 0:  # eval.bootstrap: 0 means no interval (as bootstrap_differential), not a crash
        rows = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))
        means = 100 * d[rows].mean(axis=1)
        out["diff_ci95"] = [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
    return out


def paired_by_config(by_config: dict[str, dict], resamples: int, seed: int) -> dict:
    """Per configuration pair present (reference, configuration): the paired difference (configuration minus
    reference) with its bootstrap interval and the ids of the steps only one side got right."""
    out = {}
    for ref, c in PAIRS:
        if ref in by_config and c in by_config:
            out[f"{c}_vs_{ref}"] = paired_accuracy(by_config[ref], by_config[c], resamples, seed)
    return out


def reuse_counts(result: dict) -> dict:
    """How many of a configuration's steps were reused from its reference, and from which."""
    counts: dict[str, int] = {}
    for s in result["samples"]:
        if s.get("reused_from"):
            counts[s["reused_from"]] = counts.get(s["reused_from"], 0) + 1
    return counts


# ------------------------------------------------------------------------------------------------------------
# One configuration on some steps (`evaluate_adapter`'s accuracy stage)


def step_constraint(rm: RoutedModel, step, eos: list[int]):
    """eval.constrained: a tool-call step's grammar (calls of its offered tools with schema-valid arguments, then
    end of turn); None for other steps, which decode freely.

    Several calls only where the step's BFCL category asks for them (parallel, parallel_multiple, live_parallel*;
    a step without a category too): elsewhere one call, then the end of turn, because SmolLM2 measured under a
    grammar that allowed more repeats its correct call until the budget cuts the copy, which then fails to parse."""
    from ..infer.constrain import tool_call_processor

    if step.step_type != "tool_call" or not step.tools:
        return None
    parallel = step.category is None or "parallel" in step.category
    return tool_call_processor(rm, [step.tools], "required", stop_ids=eos, parallel=parallel)


def accuracy(rm: RoutedModel, steps, idx: list[int], config: str, cfg: EvalConfig, *, threshold=None,
             forced=None, patterns=None, reference: dict | None = None) -> dict:
    """Greedy generation with real skipping (LoRA merged), in batches of `cfg.accuracy_batch_size` steps
    (`generate_and_score`); fraction scored correct.

    forced: one gate pattern ([L] bools) for every step (the ShortGPT baseline); patterns: one per step of `idx`
    (the random-skip baseline). reference: the full-depth configuration's result on the same steps, whose
    generations are reused where this configuration's gates open every block. `samples` keeps one entry per step
    in `idx` order, so two configurations scored on the same steps can be compared step by step
    (`paired_accuracy`) and any subset re-summarised (`accuracy_subset`)."""
    if patterns is not None and len(patterns) != len(idx):
        raise ValueError(f"accuracy: {len(patterns)} gate patterns for {len(idx)} steps")
    eos = stop_ids(rm)  # the one stop rule, the same as the server's
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
