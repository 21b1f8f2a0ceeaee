"""Prefill one request alone, for the serving scheduler (`layerroute.serve.scheduler`): its KV cache, last logits, routing
decisions and running sums, ready to join the running batch.

`Replica` names the module tree a prefill runs on. The engine's own (`own_replica`) serves the scheduler's thread;
`side_replica` builds a second tree that shares every weight tensor but not the modules, for a prefill
thread beside the batch's decode: the routed layers keep their per-step state on themselves (`RoutingState`, each
layer's decision, plan, record and running sums), so two threads cannot run forwards through one tree. The copy costs
the modules' Python objects, no weights (tests/test_scheduler.py checks the storage is shared).
"""

from __future__ import annotations

import copy
import itertools
import time
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LogitsProcessorList

from ..nn.routed import find_routed_layers, gate_records, routing
from .batch_jobs import Job, _Row
from .engine import GREEDY_BELOW, _Scripted


@dataclass
class Replica:
    """What a prefill runs: `model` (forward), `root` (what `routing` and `gate_records` read; None when dense) and
    its routed layers (empty when dense)."""

    model: nn.Module
    root: nn.Module | None
    layers: list


def own_replica(engine) -> Replica:
    """The engine's own module tree."""
    return Replica(engine.model, None if engine.dense else engine.rm.model, engine.routed_layers)


def side_replica(engine) -> Replica | None:
    """A second module tree sharing every weight tensor (parameters and buffers) with the engine's, for a prefill
    thread beside the batch's decode. None where that is not safe: last_turn pooling's hook on the input embeddings
    writes into the original tree's routing state."""
    if not engine.dense and engine.routed_layers and engine.routed_layers[0].state.turn_hook is not None:
        return None
    shared = {id(t): t for t in itertools.chain(engine.model.parameters(), engine.model.buffers())}
    model = copy.deepcopy(engine.model, shared)
    return Replica(model, None if engine.dense else model, [] if engine.dense else find_routed_layers(model))


def logits_processor(engine, job: Job) -> LogitsProcessorList | None:
    """The request's scripted text or grammar as a logits processor (None: unconstrained)."""
    if job.scripted_text is not None:  # imposes the tokens: a grammar is not applied on top
        script = engine.tokenizer(job.scripted_text, add_special_tokens=False)["input_ids"]
        return LogitsProcessorList([_Scripted(script, len(job.prompt), engine.eos_ids[0])])
    if job.params.grammar is not None:
        return LogitsProcessorList([engine.grammar_processor(job.params)])
    return None


@torch.no_grad()
def prefill_alone(engine, job: Job, replica: Replica):
    """Prefill `job` at batch 1 on `replica`: (row, its cache, last logits [1, V], per-block decisions, running
    sums). Its own routing decision per block from its own context, a kept session's cache and sums reused."""
    eng = engine
    start = time.perf_counter()
    prompt = job.prompt
    session, cached, cache, pools = eng.take_session(prompt, job.reuse)
    n_new = len(prompt) - cached
    ids = torch.tensor([prompt[cached:]], dtype=torch.long, device=eng.device)
    mask = torch.ones(1, len(prompt), dtype=torch.long, device=eng.device)
    pos = torch.arange(cached, len(prompt), device=eng.device).view(1, -1)
    gates, probs, logits_r, decisions, at_prompt = None, [], [], None, None
    with ExitStack() as stack:
        if not eng.dense:
            state = stack.enter_context(routing(
                replica.root, "skip", decision_mask=torch.ones(1, n_new, device=eng.device), forced=eng.forced,
                threshold=eng.threshold, kv_policy=eng.kv_policy, session_pooling=eng._pooling))
            stack.enter_context(state.request_sums(pools if eng._pooling else None))  # taken back at the end
        out = replica.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1, :]
        if not eng.dense:
            recs = gate_records(replica.root)
            gates = [bool(r.gate.reshape(-1)[0] > 0.5) for r in recs]
            probs = [float(r.prob.reshape(-1)[0]) for r in recs]
            logits_r = [float(r.logit.reshape(-1)[0]) for r in recs]
            decisions = state.decisions()
            if eng._pooling:
                at_prompt = state.sums()
    gen = None
    p = job.params
    if p.temperature is not None and p.temperature > GREEDY_BELOW:
        gen = torch.Generator(device=eng.device)
        gen.manual_seed(p.seed if p.seed is not None else int(torch.randint(0, 2**62, (1,))))
    row = _Row(job=job, processor=logits_processor(eng, job), generator=gen, cached=cached,
               reused=session is not None, length=len(prompt), gates=gates, probs=probs, logits=logits_r,
               at_prompt=at_prompt, start=start)
    return row, cache, out, decisions, at_prompt


__all__ = ["Replica", "logits_processor", "own_replica", "prefill_alone", "side_replica"]
