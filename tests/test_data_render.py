"""Step rendering: labels cover exactly the step's tokens, decision_mask never does, with both template kinds."""

import os
from collections import Counter

import pytest
from transformers import AutoTokenizer

from layerroute.data.config import DataConfig, SourceConfig
from layerroute.data.records import Conversation
from layerroute.data.render import (
    IGNORE_INDEX,
    PLANNING,
    TOOL_CALL,
    RenderError,
    hermes_text_messages,
    render_steps,
    template_supports_tools,
)
from layerroute.data.sources import iter_source
from layerroute.data.toolcalls import parse_tool_calls

HERE = os.path.dirname(__file__)
TOK = os.path.join(HERE, "fixtures", "tokenizers", "smollm2")
QWEN_TEMPLATE = os.path.join(HERE, "fixtures", "tokenizers", "qwen2.5_chat_template.jinja")
FIX = os.path.join(HERE, "fixtures", "data")


def _load(kind):
    tok = AutoTokenizer.from_pretrained(TOK)
    if kind == "qwen":
        with open(QWEN_TEMPLATE) as f:
            tok.chat_template = f.read()
    return tok


@pytest.fixture(scope="module", params=["smollm2", "qwen"])
def tok(request):
    return _load(request.param)


@pytest.fixture(scope="module")
def convs():
    out = []
    for name, path in [
        ("hermes", "hermes_function_calling_v1.json"),
        ("glaive", "glaive_function_calling_v2.json"),
        ("jsonl", "messages.jsonl"),
        ("gsm8k_hub", "gsm8k_main.jsonl"),
    ]:
        out += [
            r
            for r in iter_source(SourceConfig(name, path=os.path.join(FIX, path)), DataConfig())
            if isinstance(r, Conversation)
        ]
    return out


def test_template_detection():
    assert not template_supports_tools(_load("smollm2"))
    assert template_supports_tools(_load("qwen"))


def test_labels_cover_exactly_the_step_and_decision_mask_never_does(tok, convs):
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    n_steps = Counter()
    for conv in convs:
        steps = render_steps(conv, tok, max_length=4096)
        assert len(steps) == sum(m["role"] == "assistant" for m in conv.messages)
        for s in steps:
            n_steps[s.step_type] += 1
            T, n = len(s.input_ids), s.context_length
            assert len(s.labels) == len(s.decision_mask) == T == n + s.length
            assert s.labels[:n] == [IGNORE_INDEX] * n
            assert s.labels[n:] == s.input_ids[n:]  # every target token labelled, nothing else
            assert s.decision_mask == [1] * n + [0] * s.length
            assert s.input_ids[-1] == eot  # the end-of-turn token is the last label
            assert tok.decode(s.input_ids[:n]).endswith("<|im_start|>assistant\n")  # header is context
            # the context is exactly what a server would prompt with
            prompt = s.context_messages
            kw = {"tools": conv.tools} if (conv.tools and template_supports_tools(tok)) else {}
            msgs = prompt if template_supports_tools(tok) else hermes_text_messages(prompt, conv.tools)
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kw)
            assert s.context_ids == tok(text, add_special_tokens=False)["input_ids"]
            # the target text parses back to the gold call(s)
            target = tok.decode(s.target_ids[:-1])
            calls, _, err = parse_tool_calls(target)
            assert err is None
            gold = [
                (c["function"]["name"], c["function"]["arguments"])
                for c in s.reference.get("tool_calls") or []
            ]
            assert [(c["name"], c["arguments"]) for c in calls] == gold
            assert s.step_type == (TOOL_CALL if gold else PLANNING)
    assert n_steps[TOOL_CALL] >= 5 and n_steps[PLANNING] >= 5


def test_hermes_convention_equals_qwen_template_text(convs):
    """Without template support, tools/calls/results are written exactly as Qwen2.5's template writes them."""
    smol, qwen = _load("smollm2"), _load("qwen")
    checked = 0
    for conv in convs:
        if conv.messages[0]["role"] != "system" or not conv.tools:
            continue  # the default system lines differ by design (each template keeps its own)
        a = smol.apply_chat_template(hermes_text_messages(conv.messages, conv.tools), tokenize=False)
        b = qwen.apply_chat_template(conv.messages, tools=conv.tools, tokenize=False)
        assert a == b
        checked += 1
    assert checked >= 3


def test_step_contexts_grow_and_include_earlier_turns(convs):
    tok = _load("smollm2")
    conv = next(c for c in convs if c.id == "hermes:c3a1e0d2-0001")
    first, second = render_steps(conv, tok, 4096)
    assert (first.step_type, second.step_type) == (TOOL_CALL, PLANNING)
    assert second.input_ids[: first.total_length] == first.input_ids  # the earlier step, then more
    assert "<tool_response>" in tok.decode(second.context_ids)
    assert (first.step_index, second.step_index) == (0, 1)


def test_over_long_steps_are_dropped_and_counted_never_truncated(convs):
    tok = _load("smollm2")
    conv = next(c for c in convs if c.id == "hermes:c3a1e0d2-0001")
    full = render_steps(conv, tok, 4096)
    limit = full[0].total_length  # the first fits exactly, the second does not
    dropped = Counter()
    kept = render_steps(conv, tok, limit, dropped=dropped)
    assert [s.step_index for s in kept] == [0] and kept[0].input_ids == full[0].input_ids
    assert dropped == Counter({PLANNING: 1})


def test_unstable_template_is_rejected():
    tok = _load("smollm2")
    tok.chat_template = (  # renders the message count first: the context is not a prefix of the full text
        "{{ messages|length }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    conv = Conversation(
        "x:1", "x", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    )
    with pytest.raises(RenderError) as e:
        render_steps(conv, tok, 4096)
    assert e.value.reason == "template_prefix_unstable"


def test_end_of_turn_inside_the_turn_is_rejected_not_truncated():
    tok = _load("smollm2")
    conv = Conversation(
        "x:2", "x", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a<|im_end|>b"}]
    )
    with pytest.raises(RenderError) as e:
        render_steps(conv, tok, 4096)
    assert e.value.reason == "end_of_turn_inside_turn"
