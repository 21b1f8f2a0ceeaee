"""The OpenAI-compatible server on a tiny model, driven over loopback HTTP by the official `openai` client.

The server runs in a background thread (uvicorn on a port the OS picks) and is stopped by the fixture. A tiny
random model writes gibberish, so tool calls are imposed by the `scripted` hook (the generation path still
runs: routing, cache and accounting; only the token choice is forced); plain chat and streaming use real
generation and are checked against the library's own `routed_generate`.
"""

from __future__ import annotations

import http.client
import json
import os
import threading

import openai
import pytest
import torch
from transformers import AutoTokenizer

from layerroute.data.records import Conversation
from layerroute.data.render import render_prompt, render_steps
from layerroute.infer.generate import routed_generate
from layerroute.serve import BackgroundServer, create_app
from tests.helpers import lively, tiny_routed

HERE = os.path.dirname(__file__)
TOKENIZER = os.path.join(HERE, "fixtures", "tokenizers", "smollm2")
MODEL = "tiny-routed"
LIMIT = 64  # --max-tokens-limit of the test server
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def scripted(messages, tools):
    """Test hook: 'SCRIPT:<text>' in the last message imposes <text>; a tool result gets a fixed answer."""
    last = messages[-1]
    if last["role"] == "tool":
        return "It is sunny in Paris."
    if "SCRIPT:" in last["content"]:
        return last["content"].split("SCRIPT:", 1)[1]
    return None


def routed_model(seed: int = 0, lora: bool = True):
    rm = lively(tiny_routed("shape:tiny-qwen2", lora=lora, seed=seed), seed=seed)
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():  # input-dependent routers whose gates stay open (bias 2 dominates)
        for r in rm.routers():
            r.net.weight.copy_(torch.randn(r.net.weight.shape, generator=gen) * 0.05)
    rm.tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    return rm


@pytest.fixture(scope="module")
def served():
    rm = routed_model()
    app = create_app(rm, model_name=MODEL, max_tokens_limit=LIMIT, default_max_tokens=8, cache_sessions=4,
                     scripted=scripted, prefill_thread=True)  # as `layerroute serve` runs by default
    with BackgroundServer(app) as srv:
        yield srv, app, rm


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].base_url, api_key="unused", max_retries=0, timeout=120)


def raw(srv, method: str, path: str, body=None) -> tuple[int, dict | str, dict]:
    """One plain HTTP request (no client-side validation); JSON bodies decoded."""
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=120)
    data = body if isinstance(body, str | bytes) or body is None else json.dumps(body)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    text = resp.read().decode()
    headers = dict(resp.getheaders())
    conn.close()
    try:
        return resp.status, json.loads(text), headers
    except json.JSONDecodeError:
        return resp.status, text, headers


def ext(response) -> dict:
    return response.model_extra["layerroute"]


USER = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]


# -- basics --------------------------------------------------------------------------------------------------
def test_models_and_health(served, client):
    srv, app, _ = served
    assert [m.id for m in client.models.list().data] == [MODEL]
    status, body, _ = raw(srv, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["model"] == MODEL and body["kv_policy"] == "kv_preserving"


def test_plain_chat_real_generation_equals_routed_generate(served, client):
    srv, app, rm = served
    engine = app.state.engine
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.tool_calls is None
    assert choice.finish_reason in ("stop", "length")
    prompt = render_prompt(rm.tokenizer, USER)
    assert r.usage.prompt_tokens == len(prompt) and 1 <= r.usage.completion_tokens <= 8
    # the library's routed generation on the same prompt, while the server holds the model (LoRA merged)
    with engine.lock:
        ref = routed_generate(rm, [prompt], max_new_tokens=8, eos_token_id=engine.eos_ids, merge_lora=False,
                              kv_policy="kv_preserving")
    tokens = [t for t in ref.tokens[0] if t not in engine.eos_ids]
    assert choice.message.content == rm.tokenizer.decode(tokens, skip_special_tokens=True)
    e = ext(r)
    assert e["blocks_run"] == [0, 1, 2, 3] and e["blocks_skipped"] == [] and e["gate_pattern"] == "1111"
    assert e["block_flops_skipped"] == 0 and e["total_flops_skipped"] <= 0  # routers cost a little, skip nothing
    assert e["parsed_tool_call"] is False and e["step_type"] == "planning" and e["mode"] == "routed"
    assert len(e["router_probs"]) == 4 and all(p > 0.5 for p in e["router_probs"])
    assert {"queue_s", "ttft_s", "decode_s_per_token", "total_s"} <= set(e["timings"])


def test_prompt_is_the_training_context():
    """The server renders a request exactly as the data pipeline rendered the step's context."""
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": '{"sky": "clear"}'},
        {"role": "assistant", "content": "Clear skies."},
    ]
    steps = render_steps(Conversation("t:1", "t", messages, TOOLS), tok, max_length=4096)
    assert [s.step_type for s in steps] == ["tool_call", "planning"]
    for step, cut in zip(steps, (1, 3), strict=True):
        assert render_prompt(tok, messages[:cut], TOOLS) == step.context_ids


# -- tool calls ----------------------------------------------------------------------------------------------
def test_tool_call_round_trip(served, client):
    first = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather? SCRIPT:" + CALL}], tools=TOOLS, max_tokens=40)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (tc,) = choice.message.tool_calls
    assert tc.type == "function" and tc.id.startswith("call_") and tc.function.name == "get_weather"
    assert json.loads(tc.function.arguments) == {"city": "Paris"}
    assert ext(first)["parsed_tool_call"] is True and ext(first)["step_type"] == "tool_call"
    # the agent executes the call and sends the conversation back, the assistant turn as the server returned it
    messages = [{"role": "user", "content": "Weather? SCRIPT:" + CALL},
                choice.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": tc.id, "content": '{"sky": "clear", "temp_c": 21}'}]
    second = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=40)
    assert second.choices[0].finish_reason == "stop" and second.choices[0].message.content == "It is sunny in Paris."
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    cache = ext(second)["cache"]
    # the call re-renders to the tokens the model wrote, so the whole first step's cache is reused
    assert cache["reused"] and cache["cached_tokens"] >= first.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens == cache["cached_tokens"]


@pytest.mark.parametrize("bad", [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>',  # invalid JSON
    '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>',  # no name
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}',  # never closed
])
def test_malformed_tool_call_comes_back_as_text(client, bad):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "SCRIPT:" + bad}], tools=TOOLS, max_tokens=40)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content == bad and ext(r)["parsed_tool_call"] is False


def test_a_turn_cut_by_its_budget_keeps_the_calls_it_completed(served, client):
    """The model repeats calls until the budget cuts the last one: the complete ones come back, finish_reason
    length (the cut one is dropped), streamed or not."""
    tok = served[2].tokenizer
    budget = len(tok(CALL + "\n" + CALL[:30], add_special_tokens=False)["input_ids"])  # ends inside the second
    messages = [{"role": "user", "content": "SCRIPT:" + CALL + "\n" + CALL}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=budget)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == budget
    (tc,) = r.choices[0].message.tool_calls
    assert tc.function.name == "get_weather" and json.loads(tc.function.arguments) == {"city": "Paris"}
    assert r.choices[0].message.content is None and ext(r)["parsed_tool_call"] is True
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=budget,
                                                 stream=True))
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [c.function.name for c in calls] == ["get_weather"] and chunks[-1].choices[0].finish_reason == "length"
    # a call the budget cuts before it closes is no call: text, as before
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=6)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.tool_calls is None


def test_tool_choice_named_function_starts_the_call(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": 'SCRIPT:{"city": "Rome"}}\n</tool_call>'}], tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=40)
    (tc,) = r.choices[0].message.tool_calls
    assert tc.function.name == "get_weather" and json.loads(tc.function.arguments) == {"city": "Rome"}


def test_tool_choice_none_hides_tools_and_does_not_parse(served, client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "SCRIPT:" + CALL}],
                                       tools=TOOLS, tool_choice="none", max_tokens=40)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content == CALL
    shown = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "SCRIPT:" + CALL}],
                                           tools=TOOLS, max_tokens=40)
    assert shown.usage.prompt_tokens > r.usage.prompt_tokens  # the tools block is not in the prompt


# -- streaming -----------------------------------------------------------------------------------------------
def test_streaming_equals_non_streaming(served, client):
    srv = served[0]
    full = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, temperature=0,
                                          extra_body={"layerroute": {"cache": False}})
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"layerroute": {"cache": False}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == full.choices[0].finish_reason
    assert finals[0].model_extra["layerroute"]["gate_pattern"] == "1111"
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    status, body, headers = raw(srv, "POST", "/v1/chat/completions",
                                {"model": MODEL, "messages": USER, "max_tokens": 4, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [line for line in body.split("\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_streaming_tool_call(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "SCRIPT:Checking. " + CALL}], tools=TOOLS, max_tokens=40,
        stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert content.strip() == "Checking." and "<tool_call>" not in content
    assert len(calls) == 1 and calls[0].function.name == "get_weather" and calls[0].id.startswith("call_")
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


# -- invalid requests ----------------------------------------------------------------------------------------
LONG = "lorem ipsum " * 1100  # over the tiny model's 2048-token context
MSG = [{"role": "user", "content": "hi"}]
INVALID = {
    "unknown_model": ({"model": "gpt-9", "messages": MSG}, 404, "model", "model_not_found"),
    "missing_model": ({"messages": MSG}, 400, "model", "missing_required_parameter"),
    "bad_json": ('{"model": "tiny-routed", "messages": [', 400, None, "invalid_json"),
    "body_not_object": ([1, 2], 400, None, "invalid_type"),
    "messages_not_array": ({"model": MODEL, "messages": "hi"}, 400, "messages", "invalid_type"),
    "max_tokens_string": ({"model": MODEL, "messages": MSG, "max_tokens": "ten"}, 400, "max_tokens", "invalid_type"),
    "max_tokens_bool": ({"model": MODEL, "messages": MSG, "max_tokens": True}, 400, "max_tokens", "invalid_type"),
    "temperature_string": ({"model": MODEL, "messages": MSG, "temperature": "hot"}, 400, "temperature",
                           "invalid_type"),
    "temperature_range": ({"model": MODEL, "messages": MSG, "temperature": 3}, 400, "temperature", "invalid_value"),
    "stream_string": ({"model": MODEL, "messages": MSG, "stream": "yes"}, 400, "stream", "invalid_type"),
    "tools_object": ({"model": MODEL, "messages": MSG, "tools": {"name": "f"}}, 400, "tools", "invalid_type"),
    "max_tokens_over_limit": ({"model": MODEL, "messages": MSG, "max_tokens": LIMIT + 1}, 400, "max_tokens",
                              "max_tokens_exceeded"),
    "max_tokens_zero": ({"model": MODEL, "messages": MSG, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    "prompt_over_context": ({"model": MODEL, "messages": [{"role": "user", "content": LONG}], "max_tokens": 8}, 400,
                            "messages", "context_length_exceeded"),
    "empty_messages": ({"model": MODEL, "messages": []}, 400, "messages", "empty_array"),
    "unknown_role": ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role",
                     "invalid_value"),
    "message_not_object": ({"model": MODEL, "messages": ["hi"]}, 400, "messages[0]", "invalid_type"),
    "image_content": ({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages[0].content", "invalid_type"),
    "bad_call_arguments": ({"model": MODEL, "messages": MSG + [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}, 400,
        "messages[1].tool_calls[0].function.arguments", "invalid_type"),
    "tool_choice_unknown": ({"model": MODEL, "messages": MSG, "tools": TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "nope"}}}, 400, "tool_choice", "invalid_value"),
    "n_two": ({"model": MODEL, "messages": MSG, "n": 2}, 400, "n", "unsupported_value"),
    "tool_without_id": ({"model": MODEL, "messages": MSG + [
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "content": "sunny"}], "tools": TOOLS}, 400, "messages[2].tool_call_id",
        "missing_required_parameter"),
    "tool_id_not_string": ({"model": MODEL, "messages": MSG + [{"role": "tool", "tool_call_id": 7, "content": "x"}]},
                           400, "messages[1].tool_call_id", "invalid_type"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_requests_get_the_error_shape(served, case):
    srv = served[0]
    body, status, param, code = INVALID[case]
    got, payload, _ = raw(srv, "POST", "/v1/chat/completions", body)
    assert got == status, payload
    assert set(payload) == {"error"} and set(payload["error"]) == {"message", "type", "param", "code"}
    err = payload["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["code"] == code
    assert isinstance(err["message"], str) and err["message"]


def test_openai_client_raises_the_matching_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=MSG)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=4)
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=LIMIT + 1, stream=True)


def test_unknown_routes_and_methods(served):
    srv = served[0]
    status, body, _ = raw(srv, "GET", "/v1/nothing")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body, _ = raw(srv, "GET", "/v1/chat/completions")
    assert status == 405 and set(body["error"]) == {"message", "type", "param", "code"}


def test_internal_error_is_500_and_the_server_survives(served, client, monkeypatch):
    srv, app, _ = served
    engine = app.state.engine

    def boom(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(engine, "generate", boom)  # a lone request's path
    monkeypatch.setattr("layerroute.serve.scheduler.prefill_alone", boom)  # a batched one's
    status, body, _ = raw(srv, "POST", "/v1/chat/completions", {"model": MODEL, "messages": MSG, "max_tokens": 2})
    assert status == 500 and body["error"]["type"] == "server_error" and "simulated failure" in body["error"]["message"]
    status, body, _ = raw(srv, "POST", "/v1/chat/completions",
                          {"model": MODEL, "messages": MSG, "max_tokens": 2, "stream": True})
    assert status == 200 and '"server_error"' in body and body.rstrip().endswith("data: [DONE]")
    with pytest.raises(openai.APIError):  # the client surfaces an error event in a stream
        list(client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2, stream=True))
    monkeypatch.undo()
    assert client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2).choices[0].message.role == "assistant"
    assert raw(srv, "GET", "/health")[1]["status"] == "ok"


# -- concurrency ---------------------------------------------------------------------------------------------
def test_concurrent_burst_all_answered(served, client):
    srv = served[0]
    n = 8
    results, errors = [None] * n, []

    def one(i):
        try:
            results[i] = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"Request number {i}."}], max_tokens=4,
                stream=(i % 2 == 1))
            if i % 2 == 1:
                results[i] = list(results[i])
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and all(r is not None for r in results)
    plain = [r for r in results if not isinstance(r, list)]
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in plain)
    streamed = [r for r in results if isinstance(r, list)]
    assert all(s[-1].choices[0].finish_reason in ("stop", "length") for s in streamed)
    assert max(ext(r)["timings"]["queue_s"] for r in plain) > 0  # they waited for the one worker
    health = raw(srv, "GET", "/health")[1]
    assert health["pending"] == 0


# -- KV sessions ---------------------------------------------------------------------------------------------
def test_cache_reuse_on_resent_prefix(client):
    convo = [{"role": "system", "content": "Session test."}, {"role": "user", "content": "First question here."}]
    first = client.chat.completions.create(model=MODEL, messages=convo, max_tokens=6)
    assert ext(first)["cache"]["reused"] is False or ext(first)["cache"]["cached_tokens"] < first.usage.prompt_tokens
    convo += [{"role": "assistant", "content": first.choices[0].message.content},
              {"role": "user", "content": "A follow-up."}]
    second = client.chat.completions.create(model=MODEL, messages=convo, max_tokens=6)
    cache = ext(second)["cache"]
    assert cache["reused"] and cache["cached_tokens"] >= first.usage.prompt_tokens
    assert cache["prefilled_tokens"] == second.usage.prompt_tokens - cache["cached_tokens"]
    fresh = client.chat.completions.create(model=MODEL, messages=convo, max_tokens=6,
                                           extra_body={"layerroute": {"cache": False}})
    assert ext(fresh)["cache"] == {**ext(fresh)["cache"], "reused": False, "cached_tokens": 0}
    # every gate open: a reused kv_preserving cache is the plain model's prefix cache, so the same tokens, and the
    # routers decided from the running sums over the whole context = the mean a fresh prefill computes
    assert second.choices[0].message.content == fresh.choices[0].message.content
    assert ext(second)["router_probs"] == pytest.approx(ext(fresh)["router_probs"], abs=2e-4)




def test_sessions_are_bounded(served, client):
    engine = served[1].state.engine
    for i in range(6):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Distinct {i} " * 3}],
                                       max_tokens=3)
    assert len(engine.sessions) <= engine.sessions.capacity == 4


# -- routed, forced and dense servers ------------------------------------------------------------------------
def test_forced_skipping_dense_and_exact_servers():
    pattern = [True, False, True, True]
    apps = {
        "forced": create_app(routed_model(seed=1, lora=False), model_name=MODEL, forced=pattern, default_max_tokens=6),
        "dense": create_app(routed_model(seed=1, lora=False), model_name=MODEL, dense=True, default_max_tokens=6),
        "routed_exact": create_app(routed_model(seed=1, lora=False), model_name=MODEL, kv_policy="exact",
                                   default_max_tokens=6),
    }
    convo = [{"role": "user", "content": "Tell me a story."}]
    out = {}
    for name, app in apps.items():
        with BackgroundServer(app) as srv:
            cl = openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0, timeout=120)
            first = cl.chat.completions.create(model=MODEL, messages=convo, temperature=0)
            follow = convo + [{"role": "assistant", "content": first.choices[0].message.content},
                              {"role": "user", "content": "More."}]
            second = cl.chat.completions.create(model=MODEL, messages=follow, temperature=0)
            out[name] = (first, second)
    f1, f2 = out["forced"]
    assert ext(f1)["blocks_skipped"] == [1] and ext(f1)["gate_pattern"] == "1.11" and ext(f1)["mode"] == "forced"
    assert ext(f1)["block_flops_skipped"] == pytest.approx(0.25)
    assert 0 < ext(f1)["total_flops_skipped"] < 0.25  # the LM head is never skipped
    assert ext(f2)["cache"]["reused"] and ext(f2)["blocks_skipped"] == [1]  # kv_preserving: block 1 has its K/V
    d1, d2 = out["dense"]
    assert ext(d1)["mode"] == "dense" and ext(d1)["router_probs"] == [] and ext(d1)["total_flops_skipped"] == 0
    assert ext(d2)["cache"]["reused"]
    e1, e2 = out["routed_exact"]
    assert not ext(e2)["cache"]["reused"] and ext(e2)["cache"]["prefilled_tokens"] == e2.usage.prompt_tokens
    # routers at init run every block: routed (either policy) answers exactly as the dense model
    assert e1.choices[0].message.content == d1.choices[0].message.content
    assert e2.choices[0].message.content == d2.choices[0].message.content


# -- operators: burst with malformed requests, queue limit, metrics -------------------------------------------
def _good(i: int) -> dict:
    if i % 3 == 0:  # a tool-call step (scripted: the tiny model writes the call), the others free text
        return {"model": MODEL, "messages": [{"role": "user", "content": f"Weather {i}? SCRIPT:" + CALL}],
                "tools": TOOLS, "max_tokens": 40}
    return {"model": MODEL, "messages": [{"role": "user", "content": f"Say something, number {i}."}],
            "max_tokens": 3 + i % 4, "temperature": 0 if i % 2 else 0.7, "seed": i}


def test_burst_with_malformed_requests_no_5xx_and_the_server_answers_after(served):
    """32 concurrent requests, a third malformed (each a different mistake): every well-formed one is a 200 with a
    complete answer, every malformed one a 4xx in the API's error shape, none a 5xx; the server answers after."""
    srv = served[0]
    malformed = [INVALID[k][0] for k in sorted(INVALID) if k != "prompt_over_context"]
    plan = [("bad", malformed[i % len(malformed)]) if i % 3 == 1 else ("good", {**_good(i), "stream": i % 4 == 0})
            for i in range(32)]
    got: list = [None] * len(plan)

    def one(i):
        got[i] = raw(srv, "POST", "/v1/chat/completions", plan[i][1])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(plan))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert all(g is not None for g in got)
    for (kind, body), (status, payload, _) in zip(plan, got, strict=True):
        assert status < 500, payload
        if kind == "bad":
            assert 400 <= status < 500, payload
            assert set(payload) == {"error"} and set(payload["error"]) == {"message", "type", "param", "code"}
        elif body.get("stream"):
            assert status == 200 and payload.rstrip().endswith("data: [DONE]") and '"error"' not in payload
        else:
            assert status == 200 and payload["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
    assert raw(srv, "GET", "/health")[1]["status"] == "ok"
    status, payload, _ = raw(srv, "POST", "/v1/chat/completions", _good(5))
    assert status == 200 and payload["usage"]["completion_tokens"] >= 1


def _metric(text: str, name: str, labels: str = "") -> float:
    """The value of one sample line of the text exposition format (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + (("{" + labels + "}") if labels else " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_prometheus_text(served, client):
    srv = served[0]
    before = raw(srv, "GET", "/metrics")[1]
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=5, temperature=0,
                                       extra_body={"layerroute": {"ignore_eos": True}})
    raw(srv, "POST", "/v1/chat/completions", {"model": MODEL})  # a 400
    status, text, headers = raw(srv, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("layerroute_queue_length", "layerroute_running_batch_size",
                 "layerroute_time_to_first_token_seconds_bucket", "layerroute_inter_token_latency_seconds_bucket",
                 "layerroute_prompt_tokens_total", "layerroute_generation_tokens_total", "layerroute_blocks_run_total",
                 "layerroute_blocks_skipped_total", "layerroute_session_cache_total"):
        assert f"\n{name}" in text, name

    def grew(name, labels=""):
        return _metric(text, name, labels) - _metric(before, name, labels)

    assert grew("layerroute_generation_tokens_total") == r.usage.completion_tokens == 5
    assert grew("layerroute_prompt_tokens_total") == r.usage.prompt_tokens
    assert grew("layerroute_blocks_run_total") == 4 and grew("layerroute_blocks_skipped_total") == 0
    assert grew("layerroute_requests_total", 'endpoint="/v1/chat/completions",status="200"') == 1
    assert grew("layerroute_requests_total", 'endpoint="/v1/chat/completions",status="400"') == 1
    assert grew("layerroute_inter_token_latency_seconds_count") == 4  # 5 tokens, 4 gaps
    assert grew("layerroute_time_to_first_token_seconds_count") == 1
    assert _metric(text, "layerroute_queue_length") == 0


def test_full_queue_is_429_with_retry_after():
    rm = routed_model(seed=2, lora=False)
    app = create_app(rm, model_name=MODEL, default_max_tokens=2, max_queue=1, max_batch=1)
    engine = app.state.engine
    with BackgroundServer(app) as srv:
        results = []
        with engine.lock:  # the engine is busy: the first request waits in the queue
            t = threading.Thread(target=lambda: results.append(raw(srv, "POST", "/v1/chat/completions",
                                                                   {"model": MODEL, "messages": MSG})))
            t.start()
            for _ in range(200):
                if raw(srv, "GET", "/health")[1]["pending"] == 1:
                    break
                threading.Event().wait(0.02)
            status, body, headers = raw(srv, "POST", "/v1/chat/completions", {"model": MODEL, "messages": MSG})
        t.join(60)
        assert status == 429 and body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "queue_full"
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert int(headers["retry-after"]) >= 1
        assert results and results[0][0] == 200  # the queued one is answered
        assert _metric(raw(srv, "GET", "/metrics")[1], "layerroute_queue_rejected_total") == 1


@pytest.mark.parametrize("kw", [{"schedule": "pattern", "max_wait_s": 0.5}, {"prefill_thread": True},
                                {"schedule": "pattern", "prefill_thread": True}])
def test_pattern_schedule_and_prefill_thread_servers_answer_a_burst(kw):
    app = create_app(routed_model(seed=3, lora=False), model_name=MODEL, default_max_tokens=4, max_batch=2, **kw)
    with BackgroundServer(app) as srv:
        got = [None] * 6

        def one(i):
            got[i] = raw(srv, "POST", "/v1/chat/completions", _good(i + 1))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert all(g is not None and g[0] == 200 for g in got), got
        health = raw(srv, "GET", "/health")[1]
        assert health["schedule"] == kw.get("schedule", "fcfs") and health["max_batch"] == 2
        assert health["pending"] == 0 and health["prefill_thread"] == kw.get("prefill_thread", False)
    with pytest.raises(ValueError, match="schedule"):
        create_app(routed_model(seed=3, lora=False), model_name=MODEL, schedule="sjf")
