"""Batched greedy generation with real skipping: many agent steps, each with its own decision, stop tokens and
token budget, in batches of similar prompt length.

Free-running evaluation generates hundreds of steps; one at a time they cost 25-45 minutes of a core per adapter.
`generate_batched` sorts the requests by prompt length, left-pads each batch, prefills it once (every routed layer
decides per row from that row's own context, left padding excluded; a block that some rows skip runs on the
rows that run it only, `RoutedLayer._forward_rows`), then decodes with its own loop over the model's forward and a
`RoutedCache`. The loop exists because transformers' ``generate()`` keeps computing a finished row until the
whole batch finishes (it only pads it) and has one budget and one stop set per call: here a row that emits one of
its stop tokens or reaches its own ``max_new_tokens`` is dropped from the batch (its cache rows, attention-mask
row and per-block decisions are gathered away), so it stops costing decode work.

Greedy decoding only (what accuracy is scored on). A row may carry its own ``LogitsProcessorList`` (e.g. a
schema constraint), called with that row's ids ``[1, T]`` and scores ``[1, V]``, so per-row processor state
survives rows being dropped. Every row is the same computation as `routed_generate` of that prompt alone, up to
float rounding from the batch shape (a near-tie can flip; benchmarks/accuracy_throughput.py counts them).

A prompt at least as long as the model's context is not generated (finish ``"context"``); a prompt whose budget
would overrun the context gets the budget that fits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..nn.kv_cache import RoutedCache
from ..nn.routed import gate_records, routing
from ..nn.state import RoutingState
from .generate import inference_weights, model_pad_id, pad_left
from .stop import FINISH_CONTEXT, FINISH_LENGTH, FINISH_REUSED, StopRule


@dataclass
class Request:
    """One step to generate."""

    prompt: list[int]
    max_new_tokens: int
    stop: frozenset[int] = frozenset()  # ids that end this row (kept in its tokens, as `routed_generate` does)
    forced: Sequence[bool] | None = None  # this row's gates (True = run); None = the routers decide
    logits_processor: object | None = None  # callable(ids [1, T], scores [1, V]) -> scores, for this row only


@dataclass
class RowResult:
    """What one request produced."""

    tokens: list[int]  # generated ids (prompt excluded), the stop token kept
    gates: list[bool]  # per block, True = the block ran for this step ([] when not generated)
    finish: str  # stop | length (hit its budget) | context (prompt too long: nothing generated) | reused (stop.py)
    budget: int = 0  # the max_new_tokens it ran under (clipped to the context)
    extra: dict = field(default_factory=dict)


def context_limit(rm) -> int | None:
    """The model's context in tokens (max_position_embeddings), or None when the config does not say."""
    return getattr(rm.config, "max_position_embeddings", None)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of at most `batch_size`, by prompt length (stable), so padding stays small."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _keep_rows(cache: RoutedCache, state: RoutingState, keep: torch.Tensor) -> None:
    """Drop finished rows: the cache's batch rows and every routed layer's per-row decision."""
    cache.batch_select_indices(keep)  # an empty layer (a block skipped by every row, exact policy) stays empty
    state.take_rows(keep)


@torch.no_grad()
def _run_batch(rm, model, reqs: list[Request], rules: list[StopRule], pad_id: int, *, forced, threshold, kv_policy,
               prompt_full_depth, on_decided) -> list[RowResult]:
    device = next(model.parameters()).device
    ids, mask = pad_left([r.prompt for r in reqs], pad_id)
    ids, mask = ids.to(device), mask.to(device)
    # positions as generate() makes them from a left-padded mask: each row counts from its first real token
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = RoutedCache()
    n = len(reqs)
    out_tokens: list[list[int]] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    with routing(rm.model, "skip", decision_mask=mask.float(), forced=forced, threshold=threshold,
                 kv_policy=kv_policy, prompt_full_depth=prompt_full_depth) as state:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                       logits_to_keep=1).logits[:, -1, :]
        records = gate_records(rm.model)
        cols = [r.gate.detach().float().cpu().expand(n) > 0.5 for r in records]  # L x [B]
        gates = [[bool(c[row]) for c in cols] for row in range(n)]
        active = list(range(n))  # batch row -> request row, for the rows still decoding
        if on_decided is not None:  # a row whose decision makes it equal to a generation already made
            for row in range(n):
                reused = on_decided(row, gates[row])
                if reused is not None:
                    out_tokens[row], finish[row] = list(reused), FINISH_REUSED
        seqs = [list(r.prompt) for r in reqs]  # only read by per-row logits processors
        next_pos = pos[:, -1]
        chosen = None
        while True:
            live = [b for b, row in enumerate(active) if finish[row] is None]
            if not live:
                break
            if len(live) < len(active):  # drop finished rows: they cost no more decode work
                keep = torch.tensor(live, device=device)
                _keep_rows(cache, state, keep)
                logits, mask, next_pos = logits[keep], mask[keep], next_pos[keep]
                chosen = None if chosen is None else chosen[keep]
                active = [active[b] for b in live]
            if chosen is not None:  # feed the tokens chosen last round (the prefill's logits come first)
                next_pos = next_pos + 1
                mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=-1)
                logits = model(input_ids=chosen.view(-1, 1), attention_mask=mask,
                               position_ids=next_pos.view(-1, 1), past_key_values=cache, use_cache=True,
                               logits_to_keep=1).logits[:, -1, :]
            scores = logits.float()
            for b, row in enumerate(active):
                proc = reqs[row].logits_processor
                if proc is not None:
                    ctx = torch.tensor([seqs[row] + out_tokens[row]], device=device)
                    scores[b : b + 1] = proc(ctx, scores[b : b + 1])
            chosen = scores.argmax(dim=-1)  # [R]
            for row, tok in zip(active, chosen.tolist(), strict=True):
                out_tokens[row].append(tok)
                finish[row] = rules[row].finish(out_tokens[row])  # the one stop rule (stop.py)
    return [RowResult(tokens=out_tokens[i], gates=gates[i], finish=finish[i] or FINISH_LENGTH,
                      budget=rules[i].max_new_tokens) for i in range(n)]


def generate_batched(
    rm,
    requests: Sequence[Request],
    *,
    batch_size: int = 8,
    threshold: float | None = None,
    kv_policy: str = "exact",
    prompt_full_depth: bool = False,
    lora: bool = True,
    drafts: list[str] | None = None,
    on_decided: Callable[[int, list[bool]], list[int] | None] | None = None,
    desc: str = "generate",
    progress: bool = True,
) -> list[RowResult]:
    """Greedy generation of every request with real skipping, in length-sorted batches; results in request order.

    lora: True = LoRA merged into the weights for the whole call (as `routed_generate`), False = adapters off.
    drafts: lossless drafter names (`layerroute.infer.drafts`, e.g. ['grammar', 'lookup']): each request alone, greedy,
    its drafts verified in one forward under its grammar (a `GrammarLogitsProcessor` with one grammar, or none):
    the same tokens, fewer forwards; `batch_size` and `on_decided` are then not used.
    on_decided(i, gates): called once per generated request right after its prefill decided; a token list it
    returns is taken as the request's output (finish ``"reused"``) and the row stops decoding (a step whose
    decision opens every block equals its full-depth generation, which the caller may already hold).
    Requests with forced gates and requests left to the routers go into separate batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    limit = context_limit(rm)
    results: list[RowResult | None] = [None] * len(requests)
    rules = {}  # each generated row's stop rule, its budget clipped to the context its prompt leaves
    todo = []
    for i, r in enumerate(requests):
        if not r.prompt:
            raise ValueError(f"request {i} has an empty prompt")
        rule = StopRule(r.max_new_tokens, stop_ids=frozenset(r.stop), context=limit)
        before = rule.finish([], prompt_length=len(r.prompt))  # context: the prompt fills it; length: no budget
        if before == FINISH_CONTEXT:
            results[i] = RowResult(tokens=[], gates=[], finish=before,
                                   extra={"prompt_tokens": len(r.prompt), "context": limit})
            continue
        if before is not None:
            results[i] = RowResult(tokens=[], gates=[], finish=before, budget=0)
            continue
        rules[i] = StopRule(rule.budget(len(r.prompt)), stop_ids=rule.stop_ids)
        todo.append(i)
    groups: list[list[int]] = []
    for forced_kind in (False, True):  # the routers decide for a whole batch or for none of it
        part = [i for i in todo if (requests[i].forced is not None) == forced_kind]
        groups += [[part[j] for j in b] for b in length_sorted_batches([len(requests[i].prompt) for i in part],
                                                                       batch_size)]
    if drafts:
        budgets = {i: rules[i].max_new_tokens for i in todo}
        return _drafted(rm, requests, todo, budgets, results, drafts, threshold=threshold, kv_policy=kv_policy,
                        prompt_full_depth=prompt_full_depth, lora=lora)
    pad_id = model_pad_id(rm)
    weights = inference_weights(rm) if lora else rm.lora_disabled()
    with weights as model, tqdm(total=len(todo), desc=desc, leave=False, disable=not progress or not todo) as bar:
        model = model if lora else rm.model
        for group in groups:
            reqs = [requests[i] for i in group]
            forced = None if reqs[0].forced is None else torch.tensor([list(r.forced) for r in reqs], dtype=torch.bool)
            hook = None if on_decided is None else (lambda row, g, group=group: on_decided(group[row], g))
            rows = _run_batch(rm, model, reqs, [rules[i] for i in group], pad_id, forced=forced,
                              threshold=threshold, kv_policy=kv_policy, prompt_full_depth=prompt_full_depth,
                              on_decided=hook)
            for i, res in zip(group, rows, strict=True):
                results[i] = res
            bar.update(len(group))
    return results  # type: ignore[return-value]


def _drafted(rm, requests, todo, budgets, results, drafts, *, threshold, kv_policy, prompt_full_depth, lora):
    """`generate_batched` with drafts: each request through `layerroute.infer.verify.routed_draft_generate` (its
    grammar's budget rule too, where its processor has one)."""
    from .constrain import GrammarLogitsProcessor
    from .verify import routed_draft_generate

    for i in todo:
        r = requests[i]
        proc = r.logits_processor
        if proc is not None and not (isinstance(proc, GrammarLogitsProcessor) and len(proc.grammars) == 1):
            raise ValueError("drafts decode under one grammar (a GrammarLogitsProcessor) or none, not other processors")
        rule = None if proc is None else proc.budgets
        if isinstance(rule, list):
            rule = rule[0]
        if rule is not None and rule != budgets[i]:
            raise ValueError(f"drafts apply a grammar's budget rule with the request's own budget ({budgets[i]}), "
                             f"not {rule}")
        res, gates = routed_draft_generate(
            rm, list(r.prompt), drafts=drafts, max_new_tokens=budgets[i], grammar=proc.grammars[0] if proc else None,
            closer=proc.closer if rule is not None else None, forced=r.forced, threshold=threshold,
            kv_policy=kv_policy, eos_token_id=sorted(r.stop), lora=lora, prompt_full_depth=prompt_full_depth)
        results[i] = RowResult(tokens=res.tokens, gates=gates, finish="stop" if res.finish == "stop"
                               else FINISH_LENGTH, budget=budgets[i],
                               extra={"forwards": res.forwards, "drafts": res.by_source()})
    return results
