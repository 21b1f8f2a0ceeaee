"""One stop rule (`layerroute.infer.stop`) for every generation path: the rule itself, and the same prompts run
through routed_generate, generate_batched, a session, the engine and the serving scheduler end with the same tokens
(the end-of-turn token kept) and the same finish reason (issue 37)."""

from __future__ import annotations

import pytest
import torch

from layerroute.infer.batched import Request, generate_batched
from layerroute.infer.generate import routed_generate
from layerroute.infer.session import Session
from layerroute.infer.stop import (
    FINISH_CANCELLED,
    FINISH_CONTEXT,
    FINISH_LENGTH,
    FINISH_REASONS,
    FINISH_STOP,
    StopRule,
)
from layerroute.serve.engine import Engine, SamplingParams
from layerroute.serve.scheduler import Job, Scheduler
from tests.test_serve import routed_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [100, 200, 300], [42, 43, 44, 45, 46], [900, 901, 902, 903]]
BUDGET = 8


def test_the_rule_and_its_order():
    rule = StopRule(4, stop_ids=frozenset({9}), context=10)
    assert rule.finish([1, 2]) is None
    assert rule.finish([1, 9]) == FINISH_STOP
    assert rule.finish([1, 2, 3, 4]) == FINISH_LENGTH
    assert rule.finish([1, 2, 3, 9]) == FINISH_STOP  # a stop on the last budgeted token is a stop
    assert rule.finish([1], cancelled=True) == FINISH_CANCELLED
    assert rule.finish([], prompt_length=10) == FINISH_CONTEXT
    assert rule.budget(prompt_length=8) == 2 and rule.finish([1, 2], prompt_length=8) == FINISH_LENGTH
    assert rule.finished([1]) == FINISH_LENGTH  # over without a reason: its generation ended at a budget
    assert rule.cut([1, 9, 0, 0]) == [1, 9] and rule.content([1, 9]) == [1] and rule.content([1, 2]) == [1, 2]
    words = StopRule(10, stop_ids=frozenset({9}), stop_strings=("cd",), decode=lambda t: "".join("abcdef"[i] for i in t))
    assert words.finish([0, 1]) is None and words.finish([0, 2, 3]) == FINISH_STOP and words.stopped_on([2, 3]) == "cd"
    assert set(FINISH_REASONS) >= {FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED, FINISH_CONTEXT}
    with pytest.raises(ValueError, match="decode"):
        StopRule(3, stop_strings=("x",))


@pytest.fixture(scope="module")
def rm_and_stop():
    """A tiny routed model and a stop id it generates early for the first prompt, late or never for the others."""
    rm = routed_model()
    free = routed_generate(rm, PROMPTS, max_new_tokens=BUDGET, eos_token_id=None)
    stop = free.tokens[0][3]
    assert any(stop not in row for row in free.tokens[1:]), "the test needs a prompt that runs to its budget"
    return rm, stop


def test_every_path_ends_the_same_rows_the_same_way(rm_and_stop):
    rm, stop = rm_and_stop
    got = {}
    gen = routed_generate(rm, PROMPTS, max_new_tokens=BUDGET, eos_token_id=[stop])
    got["generate"] = list(zip(gen.tokens, gen.finish, strict=True))
    rows = generate_batched(rm, [Request(p, BUDGET, stop=frozenset({stop})) for p in PROMPTS], progress=False)
    got["batched"] = [(r.tokens, r.finish) for r in rows]
    steps = [Session(rm, "kv_preserving").add(p).generate(BUDGET, eos_token_id=[stop]) for p in PROMPTS]
    got["session"] = [(s.tokens, s.finish) for s in steps]
    engine = Engine(rm, cache_sessions=0)
    engine.eos_ids = [stop]  # the rule's stop ids, as the other paths were given them
    try:
        alone = [engine.generate(p, SamplingParams(max_new_tokens=BUDGET), reuse=False) for p in PROMPTS]
        got["engine"] = [(c.tokens, c.finish_reason) for c in alone]
        sched = Scheduler(engine, max_batch=4)
        try:
            futures = [sched.submit(Job(p, SamplingParams(max_new_tokens=BUDGET), reuse=False)) for p in PROMPTS]
            got["scheduler"] = [(c.tokens, c.finish_reason) for c in (f.result(timeout=120) for f in futures)]
        finally:
            sched.close()
    finally:
        engine.close()
    reference = got["generate"]
    assert reference[0][1] == FINISH_STOP and reference[0][0][-1] == stop  # the end-of-turn token kept
    assert {f for _, f in reference} == {FINISH_STOP, FINISH_LENGTH}
    for path, rows in got.items():
        assert rows == reference, f"{path} ends rows differently from routed_generate"
    assert [c.content_tokens for c in alone] == [StopRule(BUDGET, frozenset({stop})).content(t) for t, _ in reference]
    assert torch.is_grad_enabled()
