"""Free-running accuracy of one configuration: every step generated in batches through the real-skip path
(`layerroute.batched`), scored (BFCL AST for tool calls, final-number match for GSM8K), failures counted by reason.

`evaluate.accuracy` calls `generate_and_score`; `paired_by_config` compares every scored configuration with its
reference step by step. A step is never dropped: a prompt longer than the model's context and a generation that
hits its budget without closing its tool call are scored wrong with their own reasons.

Configurations that cannot differ are not generated twice: a step whose gates open every block (a forced pattern
that removes nothing, or routers that skip nothing on it) is its reference's generation (`lora_full_depth` for the
LoRA-on configurations, `base` for `routed_no_lora`), reused and marked ``reused_from`` (routers still pay one
prefill to decide; a forced pattern pays nothing).
"""

from __future__ import annotations

from .batched import FINISH_CONTEXT, FINISH_LENGTH, Request, generate_batched

# the configuration a config's step equals when its gates open every block
REFERENCE = {"routed": "lora_full_depth", "shortgpt": "lora_full_depth", "random": "lora_full_depth",
             "routed_no_lora": "base"}
# pairs reported by `paired_by_config`: (reference, configuration)
PAIRS = (("lora_full_depth", "routed"), ("lora_full_depth", "shortgpt"), ("lora_full_depth", "random"),
         ("base", "routed_no_lora"), ("base", "lora_full_depth"))

REASON_CONTEXT = "prompt exceeds the model's context"
REASON_LENGTH = "hit max_new_tokens"


def step_id(sample_or_step) -> str:
    """'conversation#step', the id eval.json lists steps by."""
    if isinstance(sample_or_step, dict):
        return f"{sample_or_step['conversation_id']}#{sample_or_step.get('step_index', 0)}"
    return f"{sample_or_step.conversation_id}#{sample_or_step.step_index}"


def score(step, text: str, finish: str, extra: dict | None = None) -> tuple[bool, str | None]:
    """(correct, reason) of one generated step: `evaluate.score_generation`'s verdict, with the reason saying when
    the prompt did not fit or the output was cut at its budget."""
    from .evaluate import score_generation

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
    budget = {"tool_call": cfg.max_new_tokens_tool}
    stop_set = frozenset(stop)
    samples: list[dict | None] = [None] * len(steps)
    todo = []
    for i, step in enumerate(steps):
        if ref is not None and gates is not None and all(gates[i]) and "tokens" in ref[i]:
            samples[i] = _reused(step, ref[i], rm, REFERENCE.get(config, "reference"))
        else:
            todo.append(i)
    reqs = [Request(list(steps[i].input_ids[: steps[i].context_length]),
                    budget.get(steps[i].step_type, cfg.max_new_tokens_planning), stop=stop_set,
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
                               desc=f"generate {config}")
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


def paired_by_config(by_config: dict[str, dict], resamples: int, seed: int) -> dict:
    """Per configuration pair present (reference, configuration): the paired difference (configuration minus
    reference) with its bootstrap interval and the ids of the steps only one side got right."""
    from .evaluate import paired_accuracy

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
