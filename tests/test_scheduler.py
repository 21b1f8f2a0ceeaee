"""Continuous batching (`layerroute.serve.scheduler`) = each request run alone by `Engine.generate`, token for token (fp32
tiny models): rows whose routers decide differently, rows that join a running batch mid-decode and rows that leave
early, own budgets / stop strings / grammars, sessions continued inside a batch, cancellation, seeded sampling."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from layerroute.serve.engine import Engine, SamplingParams
from layerroute.serve.scheduler import Job, Scheduler
from tests.test_serve import routed_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [100, 200, 300], [42, 43, 44, 45, 46], [7, 7, 8], [300, 301, 302, 303, 304, 305],
           [11, 12], [900, 901, 902, 903], [60, 61, 62, 63, 64, 65, 66, 67, 68]]
BUDGETS = [9, 4, 12, 7, 1, 10, 6, 8]


def decisive(seed: int = 5, router_seed: int = 3):
    """Routers whose decisions depend on the prompt and differ across rows (as tests/test_batched.py)."""
    rm = routed_model(seed=seed, lora=True)
    gen = torch.Generator().manual_seed(router_seed)
    with torch.no_grad():
        for r in rm.routers():
            r.net.weight.copy_(torch.randn(r.net.weight.shape, generator=gen))
            r.net.bias.zero_()
    return rm


@pytest.fixture(scope="module")
def rm():
    return decisive()


def run_batched(engine: Engine, jobs: list[Job], *, max_batch: int, late: dict[int, int] | None = None,
                prefill_thread: bool = False):
    """Submit `jobs` (those in `late` only once job late[i] has generated 2 tokens, so they join mid-decode);
    returns (completions, the largest batch seen)."""
    sched = Scheduler(engine, max_batch=max_batch, prefill_thread=prefill_thread)
    assert (sched.prefill_thread is not None) == prefill_thread
    late = late or {}
    biggest = [0]

    def watch(i):
        def on_token(tok):
            biggest[0] = max(biggest[0], sched.running)
            if len(counts.setdefault(i, [])) == 1:  # this job's second token: release the ones waiting on it
                for j, k in late.items():
                    if k == i:
                        sched.submit(jobs[j])
            counts[i].append(tok)
        return on_token

    counts: dict[int, list] = {}
    for i, job in enumerate(jobs):
        job.on_token = watch(i)
    try:
        for i, job in enumerate(jobs):
            if i not in late:
                sched.submit(job)
        out = [job.future.result(timeout=120) for job in jobs]
    finally:
        sched.close()
    for i, c in enumerate(out):  # streamed tokens are the generated ones
        assert counts[i][: len(c.tokens)] == c.tokens
    return out, biggest[0]


@pytest.mark.parametrize("prefill_thread", [False, True])
@pytest.mark.parametrize("policy", ["kv_preserving", "exact"])
def test_batched_rows_equal_lone_runs(rm, policy, prefill_thread):
    late = {5: 0, 6: 2, 7: 0}  # rows 5-7 join a batch already decoding
    jobs = [Job(p, SamplingParams(max_new_tokens=b, ignore_eos=True), reuse=False)
            for p, b in zip(PROMPTS, BUDGETS, strict=True)]
    engine = Engine(rm, kv_policy=policy, cache_sessions=0)
    try:
        got, biggest = run_batched(engine, jobs, max_batch=4, late=late, prefill_thread=prefill_thread)
        assert biggest >= 3, "requests should have shared the batch"
        assert len({tuple(c.gates) for c in got}) > 2, "routers should disagree across rows for this test"
        assert any(not all(c.gates) for c in got)
        for job, c in zip(jobs, got, strict=True):
            ref = engine.generate(job.prompt, job.params, reuse=False)
            assert c.gates == ref.gates, "a row's decisions must not depend on the batch"
            assert c.router_logits == pytest.approx(ref.router_logits, abs=1e-5)
            assert c.tokens == ref.tokens and len(c.tokens) == job.params.max_new_tokens
            assert c.finish_reason == ref.finish_reason == "length" and c.timings["batched"]
    finally:
        engine.close()


@pytest.mark.parametrize("prefill_thread", [False, True])
def test_dense_and_forced_batches_equal_lone_runs(prefill_thread):
    for kw in ({"dense": True}, {"forced": [True, False, True, False]}):
        engine = Engine(decisive(seed=6), cache_sessions=0, **kw)
        try:
            jobs = [Job(p, SamplingParams(max_new_tokens=b, ignore_eos=True), reuse=False)
                    for p, b in zip(PROMPTS[:5], BUDGETS[:5], strict=True)]
            got, _ = run_batched(engine, jobs, max_batch=3, late={4: 1}, prefill_thread=prefill_thread)
            for job, c in zip(jobs, got, strict=True):
                ref = engine.generate(job.prompt, job.params, reuse=False)
                assert c.tokens == ref.tokens and c.gates == ref.gates
        finally:
            engine.close()


def test_own_stop_strings_budgets_and_end_of_turn(rm):
    engine = Engine(rm, cache_sessions=0)
    try:
        free = [engine.generate(p, SamplingParams(max_new_tokens=10, ignore_eos=True), reuse=False) for p in PROMPTS]
        params = []
        for i, f in enumerate(free):
            text = f.text
            stop = [text[len(text) // 2: len(text) // 2 + 2]] if i % 2 == 0 and len(text) > 4 else []
            params.append(SamplingParams(max_new_tokens=3 + i, stop=stop))
        jobs = [Job(p, sp, reuse=False) for p, sp in zip(PROMPTS, params, strict=True)]
        got, _ = run_batched(engine, jobs, max_batch=8)
        for job, c in zip(jobs, got, strict=True):
            ref = engine.generate(job.prompt, job.params, reuse=False)
            assert (c.text, c.finish_reason, c.tokens) == (ref.text, ref.finish_reason, ref.tokens)
        assert any(c.finish_reason == "stop" for c in got) and any(c.finish_reason == "length" for c in got)
    finally:
        engine.close()


def test_scripted_rows_and_grammar_rows_in_one_batch(rm):
    engine = Engine(rm, cache_sessions=0)
    try:
        tools = [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}]
        grammar = engine.grammars.for_tools(tools, "required")
        jobs = [Job(PROMPTS[0], SamplingParams(max_new_tokens=40), reuse=False, scripted_text="Hello there."),
                Job(PROMPTS[1], SamplingParams(max_new_tokens=6, ignore_eos=True), reuse=False),
                Job(PROMPTS[2], SamplingParams(max_new_tokens=60, grammar=grammar), reuse=False)]
        got, _ = run_batched(engine, jobs, max_batch=3)
        assert got[0].text == "Hello there." and got[0].finish_reason == "stop"
        for job, c in zip(jobs[1:], got[1:], strict=True):
            ref = engine.generate(job.prompt, job.params, reuse=False)
            assert c.tokens == ref.tokens and c.text == ref.text
        assert got[2].text.lstrip().startswith("<tool_call>")
    finally:
        engine.close()


@pytest.mark.parametrize("prefill_thread", [False, True])
def test_sessions_continue_inside_a_batch_as_alone(rm, prefill_thread):
    """Two conversations, two steps each, batched together: the second step reuses each conversation's session
    (its own cache rows and running sums), and every step equals the lone engine's answer."""
    from layerroute.data.render import render_prompt

    tok = rm.tokenizer
    convos = [[{"role": "user", "content": "Plan a short trip to the coast."}],
              [{"role": "user", "content": "List three prime numbers and why."}]]
    batched, lone = Engine(rm, cache_sessions=4), Engine(rm, cache_sessions=4)
    try:
        sp = SamplingParams(max_new_tokens=6, ignore_eos=True)
        first = [render_prompt(tok, c) for c in convos]
        got1, _ = run_batched(batched, [Job(p, sp) for p in first], max_batch=2, prefill_thread=prefill_thread)
        ref1 = [lone.generate(p, sp) for p in first]
        more = tok("<|im_end|>\n<|im_start|>user\nMore?<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
        second = [p + r.tokens + more for p, r in zip(first, got1, strict=True)]  # the agent resends it all
        got2, _ = run_batched(batched, [Job(p, sp) for p in second], max_batch=2, prefill_thread=prefill_thread)
        ref2 = [lone.generate(p, sp) for p in second]
        for c, r in zip(got1 + got2, ref1 + ref2, strict=True):
            assert c.tokens == r.tokens and c.gates == r.gates
            assert c.router_logits == pytest.approx(r.router_logits, abs=1e-4)
            assert c.cache["cached_tokens"] == r.cache["cached_tokens"]
        assert all(c.cache["reused"] and c.cache["cached_tokens"] > len(p) for c, p in zip(got2, first, strict=True))
    finally:
        batched.close()
        lone.close()


@pytest.mark.parametrize("prefill_thread", [False, True])
def test_cancelled_row_leaves_and_the_others_finish(rm, prefill_thread):
    engine = Engine(rm, cache_sessions=0)
    try:
        jobs = [Job(p, SamplingParams(max_new_tokens=12, ignore_eos=True), reuse=False) for p in PROMPTS[:3]]
        sched = Scheduler(engine, max_batch=3, prefill_thread=prefill_thread)
        seen = []

        def on_token(tok):
            seen.append(tok)
            if len(seen) == 3:
                jobs[1].cancel.set()

        jobs[1].on_token = on_token
        for job in jobs:
            sched.submit(job)
        out = [job.future.result(timeout=120) for job in jobs]
        sched.close()
        assert out[1].finish_reason == "cancelled" and len(out[1].tokens) <= 4
        for job, c in ((jobs[0], out[0]), (jobs[2], out[2])):
            assert c.tokens == engine.generate(job.prompt, job.params, reuse=False).tokens
    finally:
        engine.close()


def test_prefilled_request_whose_client_left_is_answered_and_never_joins(rm):
    """With a prefill thread, a request prefilled while the batch is full waits in `ready`; if its client goes away
    there, it is answered ClientGone when a row frees up, and the batch is unharmed."""
    from layerroute.serve.scheduler import ClientGone

    engine = Engine(rm, cache_sessions=0)
    sched = Scheduler(engine, max_batch=2, prefill_thread=True)
    try:
        started = threading.Event()
        jobs = [Job(p, SamplingParams(max_new_tokens=30, ignore_eos=True), reuse=False) for p in PROMPTS[:3]]
        jobs[1].on_token = lambda tok: started.set()
        for job in jobs[:2]:
            sched.submit(job)
        assert started.wait(60)
        sched.submit(jobs[2])
        deadline = time.monotonic() + 60
        while not sched.ready and time.monotonic() < deadline:  # prefilled beside the full batch
            time.sleep(0.01)
        assert sched.ready and sched.running == 2
        jobs[2].cancel.set()
        assert [len(j.future.result(timeout=120).tokens) for j in jobs[:2]] == [30, 30]
        with pytest.raises(ClientGone):
            jobs[2].future.result(timeout=60)
    finally:
        sched.close()
        engine.close()


def test_a_future_cancelled_by_its_waiter_does_not_fail_the_batch(rm):
    """asyncio cancels a wrapped future when the task awaiting it is cancelled (a request handler at shutdown): a
    submitted job's future refuses (it is running), the job stops through `job.cancel`, the other rows finish."""
    engine = Engine(rm, cache_sessions=0)
    try:
        jobs = [Job(p, SamplingParams(max_new_tokens=8, ignore_eos=True), reuse=False) for p in PROMPTS[:3]]
        sched = Scheduler(engine, max_batch=3)
        refused = []

        def on_token(tok):
            if not refused:
                refused.append(not jobs[1].future.cancel())
                jobs[1].cancel.set()

        jobs[1].on_token = on_token
        for job in jobs:
            sched.submit(job)
        out = [job.future.result(timeout=120) for job in jobs]
        sched.close()
        assert refused == [True] and out[1].finish_reason == "cancelled" and len(out[1].tokens) == 1
        assert [(c.finish_reason, len(c.tokens)) for c in (out[0], out[2])] == [("length", 8), ("length", 8)]
    finally:
        engine.close()


def test_seeded_sampling_reproduces_across_batch_compositions(rm):
    engine = Engine(rm, cache_sessions=0)
    try:
        def sampled():
            return Job(PROMPTS[0], SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.9, seed=11,
                                                  ignore_eos=True), reuse=False)

        alone, _ = run_batched(engine, [sampled()], max_batch=4)
        others = [Job(p, SamplingParams(max_new_tokens=5, ignore_eos=True), reuse=False) for p in PROMPTS[1:4]]
        mixed, _ = run_batched(engine, [*others, sampled()], max_batch=4)
        assert len(alone[0].tokens) == 8 and mixed[-1].tokens == alone[0].tokens
    finally:
        engine.close()


def test_prompt_lookup_runs_a_lone_request_with_drafts(rm):
    plain, drafted = Engine(rm, cache_sessions=0), Engine(rm, cache_sessions=0, prompt_lookup=3)
    try:
        prompt = [5, 6, 7, 5, 6, 7, 5, 6, 7, 5, 6]
        sp = SamplingParams(max_new_tokens=8, ignore_eos=True)
        (c,), _ = run_batched(drafted, [Job(prompt, sp, reuse=False)], max_batch=4)
        assert "batched" not in c.timings  # the engine's own path, with drafts
        assert c.tokens == plain.generate(prompt, sp, reuse=False).tokens
    finally:
        plain.close()
        drafted.close()


@pytest.mark.parametrize("prefill_thread", [False, True])
def test_failed_prefill_fails_that_request_only(rm, monkeypatch, prefill_thread):
    import layerroute.serve.scheduler as scheduler_module

    real = scheduler_module.prefill_alone

    def flaky(engine, job, replica):
        if job.prompt == PROMPTS[1]:
            raise RuntimeError("boom")
        return real(engine, job, replica)

    monkeypatch.setattr(scheduler_module, "prefill_alone", flaky)
    engine = Engine(rm, cache_sessions=0)
    sched = Scheduler(engine, max_batch=4, prefill_thread=prefill_thread)
    try:
        jobs = [Job(p, SamplingParams(max_new_tokens=3, ignore_eos=True), reuse=False) for p in PROMPTS[:3]]
        for job in jobs:
            sched.submit(job)
        with pytest.raises(RuntimeError, match="boom"):
            jobs[1].future.result(timeout=60)
        assert [len(jobs[i].future.result(timeout=60).tokens) for i in (0, 2)] == [3, 3]
        ok = Job(PROMPTS[3], SamplingParams(max_new_tokens=2, ignore_eos=True), reuse=False)
        assert len(sched.submit(ok).result(timeout=60).tokens) == 2
        assert threading.active_count() >= 1 and sched.thread.is_alive()
        assert sched.prefill_thread is None or sched.prefill_thread.is_alive()
    finally:
        sched.close()
        engine.close()


@pytest.mark.parametrize("dense", [False, True])
def test_side_replica_shares_the_weights_not_the_modules(rm, dense):
    """The prefill thread's module tree reads the engine's weight tensors (no copy) and keeps its own per-step
    routing state."""
    engine = Engine(rm, cache_sessions=0, dense=dense)
    try:
        from layerroute.serve.prefill import own_replica, side_replica

        own, side = own_replica(engine), side_replica(engine)
        assert side.model is not own.model
        pairs = list(zip(own.model.parameters(), side.model.parameters(), strict=True))
        assert pairs and all(a is b for a, b in pairs)
        assert len(side.layers) == len(own.layers) == (0 if dense else rm.num_layers)
        assert all(a is not b and a.state is not b.state for a, b in zip(own.layers, side.layers, strict=True))
    finally:
        engine.close()


@pytest.mark.slow
@pytest.mark.parametrize("prefill_thread", [False, True])
def test_real_model_batched_equals_lone_with_forced_skips(prefill_thread):
    """SmolLM2-135M-Instruct, four BFCL tool-call prompts, rows with different forced skip patterns decoded together:
    each equals its lone run (float32; a near-tie flip would show here first), with and without the prefill thread
    (its module tree deep-copied from the GGUF-loaded model, weights shared)."""
    import json
    from pathlib import Path

    from layerroute.data.render import render_prompt
    from layerroute.infer.generate import load_for_inference
    from layerroute.tasks.bfcl import bfcl_data_dir, bfcl_tool

    rm = load_for_inference("smollm2-135m-instruct", None, "float32", "cpu")
    lines = (Path(bfcl_data_dir()) / "BFCL_v4_simple_python.json").read_text(encoding="utf-8").splitlines()[:4]
    rows = [json.loads(line) for line in lines]
    prompts = [render_prompt(rm.tokenizer, [{"role": m["role"], "content": m["content"]} for m in r["question"][0]],
                             [bfcl_tool(fn) for fn in r["function"]]) for r in rows]
    for forced in (None, [i not in (12, 17, 20) for i in range(rm.num_layers)]):
        engine = Engine(rm, cache_sessions=0, forced=forced)
        try:
            jobs = [Job(p, SamplingParams(max_new_tokens=24), reuse=False) for p in prompts]
            got, biggest = run_batched(engine, jobs, max_batch=4, late={3: 0}, prefill_thread=prefill_thread)
            assert biggest >= 3
            for job, c in zip(jobs, got, strict=True):
                assert c.tokens == engine.generate(job.prompt, job.params, reuse=False).tokens
        finally:
            engine.close()


def test_failing_row_processor_fails_that_row_only(rm, monkeypatch):
    import layerroute.serve.prefill as prefill_module

    engine = Engine(rm, cache_sessions=0)
    try:
        def bad(ids, scores):
            raise ValueError("processor broke")

        jobs = [Job(p, SamplingParams(max_new_tokens=5, ignore_eos=True), reuse=False) for p in PROMPTS[:3]]
        real = prefill_module.logits_processor
        monkeypatch.setattr(prefill_module, "logits_processor",
                            lambda eng, job: bad if job is jobs[1] else real(eng, job))
        sched = Scheduler(engine, max_batch=3)
        for job in jobs:
            sched.submit(job)
        with pytest.raises(ValueError, match="processor broke"):
            jobs[1].future.result(timeout=60)
        for i in (0, 2):
            assert jobs[i].future.result(timeout=60).tokens == engine.generate(jobs[i].prompt, jobs[i].params,
                                                                                reuse=False).tokens
        sched.close()
    finally:
        engine.close()


def _two_patterns(engine):
    """Two prompts whose lone gates differ so that the second runs a block the first skips."""
    gates = {i: engine.generate(p, SamplingParams(max_new_tokens=1), reuse=False).gates for i, p in enumerate(PROMPTS)}
    for a in gates:
        for b in gates:
            if any(gb and not ga for ga, gb in zip(gates[a], gates[b], strict=True)):
                return PROMPTS[a], PROMPTS[b]
    pytest.skip("no two prompts with such gates for these routers")


@pytest.mark.parametrize("schedule, max_wait, expect_match", [("pattern", 60.0, True), ("pattern", 0.0, False),
                                                             ("fcfs", 60.0, False)])
def test_pattern_schedule_batches_matching_gates_within_the_wait_bound(rm, schedule, max_wait, expect_match):
    """Waiting A, B, A', B' (A' has A's prompt, so its gates) and room for two: the pattern schedule admits A with A'
    (B runs a block A skips); with no wait allowed, or first-come-first-served, B comes second. Outputs equal lone
    runs whatever the order."""
    engine = Engine(rm, cache_sessions=0)
    try:
        a, b = _two_patterns(engine)
        jobs = [Job(p, SamplingParams(max_new_tokens=4, ignore_eos=True), reuse=False) for p in (a, b, a, b)]
        sched = Scheduler(engine, max_batch=2, schedule=schedule, max_wait_s=max_wait)
        with engine.lock:  # the four wait together before the first turn
            for job in jobs:
                sched.submit(job)
        out = [job.future.result(timeout=60) for job in jobs]
        sched.close()
        order = [job.order for job in jobs]
        assert sorted(order) == [1, 2, 3, 4] and order[0] == 1
        assert (order[2] == 2) == expect_match, order
        for job, c in zip(jobs, out, strict=True):
            assert c.tokens == engine.generate(job.prompt, job.params, reuse=False).tokens
    finally:
        engine.close()
