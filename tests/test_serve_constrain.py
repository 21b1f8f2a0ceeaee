"""The server's constrained decoding, driven by the official `openai` client against a tiny random model.

The model writes garbage; the grammar built from each request makes it a well-formed answer: `tool_choice`
required / named / auto / none, `parallel_tool_calls`, `response_format` json_object and json_schema, and a 400
(never a 500) naming the schema the grammar compiler rejects. The tools and schemas bound every value (enums,
integer ranges), so a random model finishes inside the token budget.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from layerroute.data.toolcalls import TOOL_CALL_OPEN
from layerroute.serve import BackgroundServer, create_app
from tests.test_constrain import GCD, LIGHT, NOTE, SEARCH, WEATHER
from tests.test_serve import raw, routed_model

MODEL = "tiny-constrained"
TOOLS = [WEATHER, GCD, LIGHT]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the gcd of 12 and 18, and the weather in Oslo?"}]
ANSWER = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                                "maximum": 9}},
          "required": ["ok", "n"]}


@pytest.fixture(scope="module")
def served():
    # the forced skip pattern: constrained decoding on the routed path (real skipping) as well
    app = create_app(routed_model(seed=1), model_name=MODEL, max_tokens_limit=256, default_max_tokens=96,
                     forced=[True, False, True, True])
    with BackgroundServer(app) as srv:
        yield srv, app


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].base_url, api_key="unused", max_retries=0, timeout=120)


def valid_calls(message, names=None):
    assert message.tool_calls, message.content
    for tc in message.tool_calls:
        assert tc.function.name in (names or SCHEMAS)
        jsonschema.validate(json.loads(tc.function.arguments), SCHEMAS[tc.function.name])
    return [tc.function.name for tc in message.tool_calls]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_gives_valid_calls(client, seed):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=96, temperature=1.0, seed=seed)
    assert r.choices[0].finish_reason == "tool_calls"
    assert len(valid_calls(r.choices[0].message)) == 1
    assert r.model_extra["layerroute"]["constrained"] is True


def test_named_function_only(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, parallel_tool_calls=False,
                                       tool_choice={"type": "function", "function": {"name": "set_light"}},
                                       max_tokens=96)
    assert valid_calls(r.choices[0].message) == ["set_light"]


def test_auto_and_none(client):
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=48, temperature=1.0,
                                           seed=seed)
        msg = r.choices[0].message
        if msg.tool_calls:  # text is allowed; a call, if any, is well formed
            valid_calls(msg)
        else:
            assert TOOL_CALL_OPEN not in (msg.content or "") or r.choices[0].finish_reason == "length"
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=32)
    assert r.choices[0].message.tool_calls is None and TOOL_CALL_OPEN not in r.choices[0].message.content


def test_streamed_required_call(client):
    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=False, max_tokens=96, stream=True)
    calls, finish = [], None
    for ch in stream:
        if ch.choices and ch.choices[0].delta.tool_calls:
            calls += ch.choices[0].delta.tool_calls
        if ch.choices and ch.choices[0].finish_reason:
            finish = ch.choices[0].finish_reason
    assert finish == "tool_calls" and len(calls) == 1
    jsonschema.validate(json.loads(calls[0].function.arguments), SCHEMAS[calls[0].function.name])


def test_response_format_json_schema_and_object(client):
    for seed in range(3):
        r = client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=64, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER,
                                                                    "strict": True}})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), ANSWER)
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=64,
                                       response_format={"type": "json_object"})
    content = r.choices[0].message.content
    assert content.startswith("{")  # free keys may not close in 64 tokens; a finished object parses
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    # with tools and auto: the JSON content or calls
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=96, temperature=1.0,
                                       seed=5, parallel_tool_calls=False, response_format={
                                           "type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER}})
    msg = r.choices[0].message
    if msg.tool_calls:
        valid_calls(msg)
    else:
        jsonschema.validate(json.loads(msg.content), ANSWER)


def least_tokens(served, tools=None, choice="auto", response_format=None) -> int:
    """The tokens of the shortest valid answer, as the server's budget rule counts them."""
    import xgrammar as xgr

    engine = served[1].state.engine
    compiled = engine.grammars.for_tools(tools, choice, response_format=response_format)
    return len(engine.grammars.closer.closing_tokens(xgr.GrammarMatcher(compiled,
                                                                         override_stop_tokens=engine.eos_ids)))


def test_required_under_a_small_budget_always_carries_a_valid_call(served, client):
    """tool_choice=required, parallel calls allowed (OpenAI's default), a free-string tool among the offered ones:
    at every budget from the shortest call's length up, greedy or sampled, the response carries at least one
    call of an offered function with schema-valid arguments (finish_reason tool_calls, or length when the budget
    cut the turn after its last complete call)."""
    tools = [SEARCH, WEATHER, GCD, LIGHT]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    least = least_tokens(served, tools, "required")
    for budget, temperature, seed in [(least, 0.0, 0), (least + 4, 1.0, 1), (48, 0.0, 0), (48, 1.0, 2),
                                      (80, 1.0, 3)]:
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=tools, tool_choice="required",
                                           max_tokens=budget, temperature=temperature, seed=seed)
        choice = r.choices[0]
        assert choice.finish_reason in ("tool_calls", "length") and choice.message.tool_calls, (budget, choice)
        for tc in choice.message.tool_calls:
            jsonschema.validate(json.loads(tc.function.arguments), schemas[tc.function.name])
        assert r.usage.completion_tokens <= budget


def test_json_schema_within_its_budget_always_parses(served, client):
    fmt = {"type": "json_schema", "json_schema": {"name": "note", "schema": NOTE, "strict": True}}
    least = least_tokens(served, response_format=fmt)
    for budget, temperature, seed in [(least, 0.0, 0), (least + 3, 1.0, 1), (48, 0.0, 0), (48, 1.0, 4)]:
        r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=budget, temperature=temperature,
                                           seed=seed, response_format=fmt)
        jsonschema.validate(json.loads(r.choices[0].message.content), NOTE)
    # below the shortest answer the rule cannot help: the content is cut, finish_reason length
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=least - 1, response_format=fmt)
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.choices[0].message.content)


@pytest.mark.parametrize("body,param,needle", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strange"}}}},
     "response_format", "strange"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}}, "response_format", "missing"),
    ({"response_format": {"type": "yaml"}}, "response_format", "yaml"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "vector"}}}}}], "tool_choice": "required"}, "tools", "vector"),
])
def test_uncompilable_schema_is_a_400(served, client, body, param, needle):
    srv, _ = served
    status, resp, _ = raw(srv, "POST", "/v1/chat/completions", {"model": MODEL, "messages": ASK, **body})
    assert status == 400, resp
    err = resp["error"]
    assert err["param"] == param and err["code"] == "invalid_schema" and needle in err["message"]
    with pytest.raises(openai.BadRequestError, match=needle):
        client.chat.completions.create(model=MODEL, messages=ASK, **body)
    assert raw(srv, "GET", "/health")[0] == 200


def test_unconstrained_server_keeps_the_prefix_and_refuses_json_formats():
    app = create_app(routed_model(seed=1), model_name=MODEL, default_max_tokens=8, constrained=False)
    with BackgroundServer(app) as srv:
        status, resp, _ = raw(srv, "POST", "/v1/chat/completions", {
            "model": MODEL, "messages": ASK, "response_format": {"type": "json_object"}})
        assert status == 400 and resp["error"]["param"] == "response_format"
        status, resp, _ = raw(srv, "POST", "/v1/chat/completions", {
            "model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": "required", "max_tokens": 4})
        assert status == 200 and resp["layerroute"]["constrained"] is False
        assert resp["choices"][0]["message"]["content"].startswith(TOOL_CALL_OPEN)  # the forced opening text
