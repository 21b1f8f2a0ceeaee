"""The serving engine without HTTP: the session store, per-conversation KV sessions against the Session class,
prompt-lookup drafting. (The HTTP server over it: tests/test_serve.py.)"""

from __future__ import annotations

import pytest
import torch

from layerroute.data.render import render_prompt
from layerroute.nn.kv_cache import RoutedCache
from layerroute.serve.session_store import CachedSession, SessionStore
from tests.test_serve import routed_model


def _session(ids, checkpoints):
    return CachedSession(list(ids), RoutedCache(), {k: None for k in checkpoints})


def test_session_store_lru_and_checkpoints():
    store = SessionStore(2, any_prefix=False)
    store.put(_session([1, 2, 3, 4], [2, 4]))
    store.put(_session([5, 6, 7], [3]))
    assert store.take([9, 9])[0] is None  # nothing shared
    s, n = store.take([1, 2, 3, 4])  # the same tokens again: one must be new, so checkpoint 4 is out, 2 is in
    assert n == 2 and s.ids == [1, 2, 3, 4] and len(store) == 1  # taken out while in use
    store.put(s)
    s, n = store.take([1, 2, 3, 9])  # diverges after 3 tokens: the running sums exist at 2 only
    assert n == 2
    store.put(s)
    store.put(_session([8, 8, 8], [3]))  # the least recently used ([5, 6, 7]) goes
    assert len(store) == 2 and store.evictions == 1 and store.take([5, 6, 7, 1])[0] is None
    s, n = store.take([1, 2, 3, 4, 5])
    assert n == 4  # the longest usable checkpoint
    dense = SessionStore(2, any_prefix=True)
    dense.put(_session([1, 2, 3, 4], [4]))
    assert dense.take([1, 2, 3, 9])[1] == 3  # the dense model can reuse any common prefix
    assert SessionStore(0, any_prefix=False).capacity == 0


def test_engine_sessions_agree_with_the_session_class():
    """The server's per-conversation caches follow `layerroute.infer.session.Session` (kv_preserving): same tokens,
    same gates and router logits at every step, with input-dependent routers that skip different blocks."""
    from layerroute.infer.session import Session
    from layerroute.serve.engine import Engine, SamplingParams

    rm = routed_model(seed=5, lora=False)
    gen = torch.Generator().manual_seed(20)  # seed picked for gates that change between the steps
    with torch.no_grad():  # decisive, input-dependent routers: some blocks skip, differently per step
        for r in rm.routers():
            r.net.weight.copy_(torch.randn(r.net.weight.shape, generator=gen))
            r.net.bias.zero_()
    engine = Engine(rm, cache_sessions=2)
    try:
        tok = rm.tokenizer
        convo = [{"role": "user", "content": "Plan a short trip to the coast."}]
        p1 = render_prompt(tok, convo)
        c1 = engine.generate(p1, SamplingParams(max_new_tokens=6))
        stored = next(iter(engine.sessions._items.values()))  # kept without spare decode columns (kv_cache.compact)
        assert stored.nbytes == sum(t.untyped_storage().nbytes() for layer in stored.cache.layers
                                    for t in (layer.keys, layer.values))
        convo += [{"role": "assistant", "content": c1.text}, {"role": "user", "content": "And pack what?"}]
        p2 = render_prompt(tok, convo)
        c2 = engine.generate(p2, SamplingParams(max_new_tokens=6))
        assert c2.cache["reused"] and c2.cache["cached_tokens"] > len(p1)

        s = Session(rm, "kv_preserving", merge_lora=False)  # the engine already holds the inference weights
        r1 = s.add(p1).generate(6, eos_token_id=engine.eos_ids)
        assert p2[: len(s.tokens)] == s.tokens  # the resent conversation extends the session's tokens
        r2 = s.add(p2[len(s.tokens):]).generate(6, eos_token_id=engine.eos_ids)
        for c, r in ((c1, r1), (c2, r2)):
            assert c.tokens == r.tokens and c.finish_reason == r.finish  # one stop rule: the end-of-turn kept
            assert c.content_tokens == [t for t in r.tokens if t not in engine.eos_ids]
            assert c.gates == r.gates
            assert c.router_logits == pytest.approx(r.router_logits, abs=1e-4)
        # a block skipped at step 1 runs at step 2: it reads the K/V it wrote while skipped
        assert any(not a and b for a, b in zip(c1.gates, c2.gates, strict=True)), (c1.gates, c2.gates)
    finally:
        engine.close()


def test_engine_prompt_lookup_keeps_tokens_and_gates_and_reuses_only_the_prompt_checkpoint():
    """Prompt-lookup drafting in the server: every request answers as without it (tokens, gates, router logits),
    and a routed session left by a drafted request continues from its prompt checkpoint only (the sums after the
    prefill hold rejected drafts)."""
    from layerroute.serve.engine import Engine, SamplingParams

    rm = routed_model(seed=5, lora=False)
    gen = torch.Generator().manual_seed(20)
    with torch.no_grad():  # decisive, input-dependent routers: some blocks skip
        for r in rm.routers():
            r.net.weight.copy_(torch.randn(r.net.weight.shape, generator=gen))
            r.net.bias.zero_()
    tok = rm.tokenizer
    convo = [{"role": "user", "content": "Plan a short trip to the coast, the coast, the coast."}]
    p1 = render_prompt(tok, convo)
    p2 = None
    answers = {}
    # exact policy: no sessions, every request prefills afresh, so drafted and plain answers must be equal
    for policy in ("exact", "kv_preserving"):
        for lookup in (0, 3):
            engine = Engine(rm, cache_sessions=2, prompt_lookup=lookup, kv_policy=policy)
            try:
                c1 = engine.generate(p1, SamplingParams(max_new_tokens=8))
                p2 = p2 or render_prompt(tok, convo + [{"role": "assistant", "content": c1.text},
                                                       {"role": "user", "content": "And pack what?"}])
                c2 = engine.generate(p2, SamplingParams(max_new_tokens=8))
                answers[policy, lookup] = (c1, c2)
            finally:
                engine.close()
    pairs = [(answers["exact", 0], answers["exact", 3]), (answers["kv_preserving", 0][:1], answers["kv_preserving", 3][:1])]
    for plain, drafted in pairs:
        for a, b in zip(plain, drafted, strict=True):
            assert a.tokens == b.tokens and a.gates == b.gates
            assert a.router_logits == pytest.approx(b.router_logits, abs=1e-4)
            assert b.timings["forwards"] <= a.timings["forwards"]
    # kv_preserving keeps the K/V each token got under its own step's gates, so where a session is continued
    # changes the answer: the plain engine continues after c1's tokens, the drafted one after p1 only
    assert answers["kv_preserving", 0][1].cache["cached_tokens"] > len(p1)
    assert answers["kv_preserving", 3][1].cache["cached_tokens"] == len(p1)
    with pytest.raises(ValueError, match="prompt_lookup"):
        Engine(rm, prompt_lookup=-1)
