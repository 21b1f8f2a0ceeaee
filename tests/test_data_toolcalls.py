"""parse_tool_calls / render_tool_calls: every accepted form, and malformed input never raises."""

import json

import pytest

from layerroute.data.toolcalls import (
    parse_tool_calls,
    parse_tool_calls_detailed,
    render_tool_call,
    render_tool_calls,
)


@pytest.mark.parametrize(
    "text, calls, rest, repairs",
    [
        (  # Hermes / Qwen JSON
            '<tool_call>\n{"name": "f", "arguments": {"a": 1, "b": "x"}}\n</tool_call>',
            [{"name": "f", "arguments": {"a": 1, "b": "x"}}],
            "",
            [],
        ),
        (  # Hermes single-quoted Python literal, keys in the other order
            "<tool_call>\n{'arguments': {'flag': True, 'v': None}, 'name': 'g'}\n</tool_call>\n",
            [{"name": "g", "arguments": {"flag": True, "v": None}}],
            "",
            ["python_literal_call"],
        ),
        (  # two calls and text around them
            'Sure.\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "h", "parameters": {"x": [1, 2]}}\n</tool_call>',
            [{"name": "f", "arguments": {}}, {"name": "h", "arguments": {"x": [1, 2]}}],
            "Sure.",
            [],
        ),
        (  # Glaive: arguments as a single-quoted JSON string
            '<functioncall> {"name": "get_news", "arguments": \'{"country": "US", "n": 3}\'} <|endoftext|>',
            [{"name": "get_news", "arguments": {"country": "US", "n": 3}}],
            "",
            ["python_literal_call", "string_encoded_arguments"],
        ),
        (  # Glaive with a text lead and a plain-object arguments
            'Let me check. <functioncall> {"name": "tip", "arguments": {"bill": 50}}',
            [{"name": "tip", "arguments": {"bill": 50}}],
            "Let me check.",
            [],
        ),
        (  # OpenAI-style string-encoded arguments inside a Hermes block, JSON literals true/null
            '<tool_call>\n{"name": "f", "arguments": "{\\"ok\\": true, \\"z\\": null}"}\n</tool_call>',
            [{"name": "f", "arguments": {"ok": True, "z": None}}],
            "",
            ["string_encoded_arguments"],
        ),
        ("No call here, just an answer.", [], "No call here, just an answer.", []),
    ],
)
def test_parse_accepted_forms(text, calls, rest, repairs):
    r = parse_tool_calls_detailed(text)
    assert r.error is None
    assert r.calls == calls
    assert r.remaining_text == rest
    assert r.repairs == repairs
    assert parse_tool_calls(text) == (calls, rest, None)


@pytest.mark.parametrize(
    "text, reason",
    [
        ('<tool_call>\n{"name": "f", "arguments": {"a": 1\n</tool_call>', "tool_call_invalid_json"),
        ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}', "tool_call_unclosed"),
        ('<tool_call>\n{"arguments": {"a": 1}}\n</tool_call>', "tool_call_missing_name"),
        ('<tool_call>\n["f", {"a": 1}]\n</tool_call>', "tool_call_not_object"),
        ('<tool_call>\n{"name": "f", "arguments": [1, 2]}\n</tool_call>', "tool_call_arguments_not_object"),
        ('<functioncall> {"name": "f", "arguments": \'{"a": \'}', "tool_call_arguments_invalid_json"),
        (
            "<tool_call>\n{'name': 'f', 'arguments': {'a': __import__('os')}}\n</tool_call>",
            "tool_call_invalid_json",
        ),
    ],
)
def test_parse_malformed_returns_error(text, reason):
    calls, rest, err = parse_tool_calls(text)
    assert calls == []
    assert err is not None and err.split(":")[0] == reason


def test_parse_never_raises_on_any_truncation():
    good = render_tool_calls([{"name": "f", "arguments": {"a": [1, {"b": "c'd"}], "e": "ü"}}]) + " trailing"
    glaive = '<functioncall> {"name": "f", "arguments": \'{"a": "b"}\'} <|endoftext|>'
    for s in (good, glaive):
        for i in range(len(s) + 1):
            calls, rest, err = parse_tool_calls(s[:i])
            assert isinstance(calls, list) and isinstance(rest, str)
            assert err is None or isinstance(err, str)
    assert parse_tool_calls(None)[2].startswith("tool_call_not_text")


def test_render_matches_qwen_form_and_roundtrips():
    calls = [
        {"name": "weather.get", "arguments": {"city": "Zürich", "days": 2}},
        {"name": "g", "arguments": {}},
    ]
    text = render_tool_calls(calls)
    assert text == (
        '<tool_call>\n{"name": "weather.get", "arguments": {"city": "Zürich", "days": 2}}\n</tool_call>\n'
        '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>'
    )
    assert parse_tool_calls(text) == (calls, "", None)
    openai = [{"type": "function", "function": {"name": "g", "arguments": json.dumps({"x": 1})}}]
    assert render_tool_calls(openai) == '<tool_call>\n{"name": "g", "arguments": {"x": 1}}\n</tool_call>'


@pytest.mark.parametrize(
    "text, calls",
    [
        ('{"name": "math.factorial", "arguments": {"number": 5}}', [{"name": "math.factorial", "arguments": {"number": 5}}]),
        ('{\n  "name": "f",\n  "arguments": {"a": [1, 2]}\n}\n', [{"name": "f", "arguments": {"a": [1, 2]}}]),
        ('{"name": "f", "arguments": {}}\n{"name": "g", "arguments": {"x": 1}}',
         [{"name": "f", "arguments": {}}, {"name": "g", "arguments": {"x": 1}}]),
    ],
)
def test_bare_json_call_only_when_asked(text, calls):
    assert parse_tool_calls(text)[0] == []  # off by default: dataset rows are never read as calls
    r = parse_tool_calls_detailed(text, bare_json=True)
    assert r.error is None and r.calls == calls and r.remaining_text == "" and r.repairs == ["bare_json_call"]


@pytest.mark.parametrize(
    "text",
    [
        '{"answer": 72}',  # JSON that is not the call shape
        '{"name": "f", "arguments": {}, "extra": 1}',
        '{"name": "f", "arguments": "not an object"}',
        'The call is {"name": "f", "arguments": {}}',  # text around it: an answer that mentions a call
        '{"name": "f", "arguments": {}}\nand then some words',
        "72",
    ],
)
def test_bare_json_refuses_anything_but_the_call_shape(text):
    calls, rest, err = parse_tool_calls(text, bare_json=True)
    assert calls == [] and err is None


def test_wrapped_calls_win_over_bare_json():
    text = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    assert parse_tool_calls_detailed(text, bare_json=True).repairs == []


def test_a_closing_tag_inside_a_json_string_does_not_cut_the_call():
    """A schema-constrained call may write any text in a string, the closing tag too (seen on Qwen2.5-Coder, routed,
    constrained): the call is the whole JSON object, not the text up to the first tag."""
    value = 'not here.}}</tool_call><tool_call> {"'
    text = "<tool_call>\n" + json.dumps({"name": "answer", "arguments": {"answer": value}}) + "\n</tool_call>"
    calls, rest, error = parse_tool_calls(text)
    assert error is None and rest == ""
    assert calls == [{"name": "answer", "arguments": {"answer": value}}]
    # two calls, the first with the tag in a string
    calls, _, error = parse_tool_calls(text + "\n" + render_tool_call("f", {"x": 1}))
    assert error is None and [c["name"] for c in calls] == ["answer", "f"]
    # a broken body is still an error (nothing to extend to)
    assert parse_tool_calls('<tool_call>{"name": "a", </tool_call>')[2]
