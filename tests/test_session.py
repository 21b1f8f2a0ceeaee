"""Multi-step sessions: the cache policies agree when decisions do not change, kv_preserving prefills only the new
tokens and keeps every block's cache complete, its decisions pool over the whole conversation, scoring matches
the training path, and an uncommitted step leaves no trace."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from layerroute.infer.session import Session, SessionTurn, compare_policies, rotating_patterns
from layerroute.nn.routed import find_routed_layers, routing
from tests.helpers import TINY_SHAPES, lively, tiny_routed

TURNS = [[5, 6, 7, 8, 9, 10], [20, 21, 22], [30, 31, 32, 33]]
PATTERN = [True, False, True, True]


@pytest.fixture(scope="module", params=TINY_SHAPES)
def rm(request):
    return lively(tiny_routed(request.param))


def _run(rm, policy, forced=PATTERN, new=5):
    s = Session(rm, policy, forced=forced)
    outs = []
    for t in TURNS:
        s.add(t)
        outs.append(s.generate(new, eos_token_id=None))
    return s, outs


def test_policies_agree_when_decisions_do_not_change(rm):
    exact, a = _run(rm, "exact")
    kv, b = _run(rm, "kv_preserving")
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert exact.tokens == kv.tokens
    # exact re-prefills the whole context; kv_preserving only what is new (the last reply token + the turn)
    assert [r.prefill_tokens for r in a] == [6, 6 + 5 + 3, 6 + 5 + 3 + 5 + 4]
    assert [r.prefill_tokens for r in b] == [6, 1 + 3, 1 + 4]


def test_kv_preserving_cache_is_complete_in_every_block(rm):
    s = Session(rm, "kv_preserving")
    for t, forced in zip(TURNS, [[True, False, True, False], [True, True, False, True], "open"], strict=True):
        s.add(t)
        s.generate(4, forced=forced, eos_token_id=None)
    lengths = [layer.get_seq_length() for layer in s.cache.layers]
    assert len(lengths) == rm.num_layers and set(lengths) == {len(s.tokens) - 1}


def test_kv_preserving_decision_pools_over_the_whole_conversation(rm):
    """Routers input-dependent but every gate open: kv_preserving's router logits at a later step (running sums
    over the cached context + new tokens) equal exact's (pooled over the re-prefilled context)."""
    saved = [(r.net.weight.clone(), r.net.bias.clone()) for r in rm.routers()]
    gen = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            for r in rm.routers():
                r.net.weight.copy_(torch.randn(r.net.weight.shape, generator=gen) * 0.3)
                r.net.bias.fill_(10.0)  # open whatever the input
        logits = {}
        for policy in ("exact", "kv_preserving"):
            s = Session(rm, policy)
            steps = []
            for t in TURNS:
                s.add(t)
                steps.append(s.generate(4, eos_token_id=None).router_logits)
            logits[policy] = torch.tensor(steps)
        assert torch.allclose(logits["exact"], logits["kv_preserving"], atol=1e-4)
        assert not torch.allclose(logits["exact"][0], logits["exact"][2], atol=1e-3), "logits should move"
    finally:
        with torch.no_grad():
            for r, (w, b) in zip(rm.routers(), saved, strict=True):
                r.net.weight.copy_(w)
                r.net.bias.copy_(b)


def test_exact_score_equals_the_training_path(rm):
    context, target = TURNS[0] + TURNS[1], [40, 41, 42, 43]
    s = Session(rm, "exact", forced=PATTERN)
    nll = s.add(context).score(target).nll_sum
    ids = torch.tensor([context + target])
    mask = torch.zeros(ids.shape)
    mask[:, : len(context)] = 1
    with torch.no_grad(), routing(rm.model, "mix", decision_mask=mask, forced=PATTERN):
        logits = rm.model(input_ids=ids).logits[0, len(context) - 1 : -1]
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor(target), reduction="sum").item()
    assert abs(nll - expected) < 1e-3 * max(1.0, abs(expected))


def test_uncommitted_step_leaves_no_trace(rm):
    s = Session(rm, "kv_preserving", forced=PATTERN)
    s.add(TURNS[0]).generate(3, eos_token_id=None)
    s.add(TURNS[1])
    before = (list(s.tokens), s.cached_tokens, [(a.clone(), b.clone()) for a, b in s._pool])
    first = s.generate(4, eos_token_id=None, commit=False)
    assert (s.tokens, s.cached_tokens) == (before[0], before[1])
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(before[2], s._pool, strict=True))
    again = s.generate(4, eos_token_id=None, commit=False)
    assert first.tokens == again.tokens
    # the shared model holds no session sums between steps
    assert all(layer.pool_sum is None for layer in find_routed_layers(rm.model))


def test_compare_policies_reports_both_policies(rm):
    turns = [SessionTurn(t, [50 + i, 51 + i, 52 + i]) for i, t in enumerate(TURNS)]
    same = compare_policies(rm, [turns], schedule=[PATTERN], max_new_tokens=3)["summary"]
    assert same["greedy_exact_match"] == 1.0 and abs(same["nll_diff_kv_minus_exact"]) < 1e-4
    assert same["decision_agreement"] == 1.0
    assert same["kv_preserving_prefill_tokens"] < same["exact_prefill_tokens"]
    rotating = compare_policies(rm, [turns], schedule=[[True, False, True, True], [True, True, True, True],
                                                       [True, True, False, True]], max_new_tokens=3)["summary"]
    assert rotating["steps"] == 3 and "later_steps_nll_diff" in rotating


def test_rotating_patterns_keep_first_two_and_last():
    for pattern in rotating_patterns(24, 0.25):
        assert pattern[0] and pattern[1] and pattern[-1]
    base, dense, shifted = rotating_patterns(24, 0.25)
    assert all(dense) and base != shifted and base.count(False) == shifted.count(False) == 6


@pytest.mark.skipif(importlib.util.find_spec("bfcl_eval") is None, reason="bfcl-eval not installed")
def test_bfcl_multi_turn_renders_incremental_turns():
    from transformers import AutoTokenizer

    from layerroute.infer.session import bfcl_multi_turn

    tok = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(__file__), "fixtures", "tokenizers", "smollm2"))
    convs = bfcl_multi_turn(tok, limit=3)
    assert len(convs) == 3
    for turns in convs:
        assert len(turns) >= 2
        for turn in turns:
            assert turn.new_tokens and turn.target and turn.step_type == "tool_call"
            assert "<tool_call>" in tok.decode(turn.target)
        assert "<|im_start|>user" in tok.decode(turns[1].new_tokens)
