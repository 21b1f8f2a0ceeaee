"""model.plain_text_tokens: the tool-call wrapper written as ordinary BPE pieces, in context and target alike."""

from __future__ import annotations

import os

import pytest
from transformers import AutoTokenizer

from layerroute.adapters import load_adapter, save_adapter
from layerroute.config import ModelConfig, RunConfig
from layerroute.data.records import Conversation
from layerroute.data.render import render_steps
from layerroute.data.toolcalls import parse_tool_calls
from layerroute.errors import AdapterError, ConfigError, ModelLoadError
from layerroute.model import load_base
from layerroute.tokenizer import plain_text_tokenizer

from .helpers import tiny_routed

HERE = os.path.dirname(__file__)
TOK = os.path.join(HERE, "fixtures", "tokenizers", "smollm2")
QWEN_TEMPLATE = os.path.join(HERE, "fixtures", "tokenizers", "qwen2.5_chat_template.jinja")
WRAPPER = ["<tool_call>", "</tool_call>"]
TOOLS = [{"type": "function", "function": {"name": "math.factorial", "description": "n!",
                                           "parameters": {"type": "object", "properties": {"number": {"type": "integer"}}}}}]
CONV = Conversation(
    "t:1", "t",
    [{"role": "user", "content": "What is 5 factorial?"},
     {"role": "assistant", "content": None,
      "tool_calls": [{"type": "function", "function": {"name": "math.factorial", "arguments": {"number": 5}}}]}],
    TOOLS,
)


def _qwen_like(plain: bool):
    """SmolLM2's BPE with Qwen2.5's template and the wrapper as added tokens, as in Qwen2.5's tokenizer."""
    tok = AutoTokenizer.from_pretrained(TOK)
    with open(QWEN_TEMPLATE) as f:
        tok.chat_template = f.read()
    tok.add_tokens(WRAPPER)
    return plain_text_tokenizer(tok, WRAPPER) if plain else tok


def test_wrapper_becomes_bpe_pieces_in_context_and_target():
    added = _qwen_like(plain=False)
    plain = _qwen_like(plain=True)
    wrapper_ids = {added.convert_tokens_to_ids(t) for t in WRAPPER}
    (before,) = render_steps(CONV, added, 4096)
    (after,) = render_steps(CONV, plain, 4096)
    assert wrapper_ids <= set(before.target_ids)  # the template's tools text and the call use the added tokens
    assert wrapper_ids & set(before.context_ids)
    assert not wrapper_ids & set(after.input_ids)  # context and target alike
    text = plain.decode(after.target_ids, skip_special_tokens=True)
    assert text == added.decode(before.target_ids, skip_special_tokens=True)  # same text, other ids
    calls, _, error = parse_tool_calls(text)
    assert error is None and calls == [{"name": "math.factorial", "arguments": {"number": 5}}]
    # the labels still cover exactly the target
    assert after.labels[: after.context_length] == [-100] * after.context_length


def test_other_added_and_special_tokens_are_untouched():
    tok = _qwen_like(plain=True)
    assert tok("<|im_end|>", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_errors_name_the_setting():
    with pytest.raises(ModelLoadError, match=r"plain_text_tokens: '<nope>' is not an added token"):
        plain_text_tokenizer(_qwen_like(plain=False), ["<nope>"])
    with pytest.raises(ModelLoadError, match=r"'<\|im_end\|>' is a special token"):
        plain_text_tokenizer(_qwen_like(plain=False), ["<|im_end|>"])
    with pytest.raises(ConfigError, match=r"model.plain_text_tokens must be a list of distinct non-empty strings"):
        ModelConfig(plain_text_tokens=["<a>", "<a>"])
    with pytest.raises(ConfigError, match=r"model.plain_text_tokens must be of type list"):
        RunConfig.from_dict({"model": {"plain_text_tokens": "<tool_call>"}})


def test_load_base_applies_it_and_records_it_in_the_identity(tmp_path):
    folder = tmp_path / "tok"
    _qwen_like(plain=False).save_pretrained(folder)
    cfg = ModelConfig(name="shape:tiny-qwen2", tokenizer=str(folder), plain_text_tokens=WRAPPER)
    loaded = load_base(cfg)
    assert loaded.identity["plain_text_tokens"] == WRAPPER
    ids = loaded.tokenizer("<tool_call>x</tool_call>", add_special_tokens=False)["input_ids"]
    assert len(ids) > 2 and loaded.tokenizer.decode(ids) == "<tool_call>x</tool_call>"
    assert "plain_text_tokens" not in load_base(ModelConfig(name="shape:tiny-qwen2"), tokenizer=False).identity


def test_adapter_trained_on_pieces_brings_them_or_refuses_a_model_without_them(tmp_path):
    rm = tiny_routed()
    rm.identity["plain_text_tokens"] = WRAPPER
    save_adapter(rm, tmp_path / "a")
    with pytest.raises(AdapterError, match=r"plain_text_tokens=\['<tool_call>', '</tool_call>'\]"):
        load_adapter(tmp_path / "a", loaded=load_base(ModelConfig(name="shape:tiny-qwen2"), tokenizer=False))
    folder = tmp_path / "tok"
    _qwen_like(plain=False).save_pretrained(folder)
    # a model named without the setting (e.g. `generate --adapter A --model M --dtype ...`) inherits the adapter's
    again = load_adapter(tmp_path / "a", ModelConfig(name="shape:tiny-qwen2", tokenizer=str(folder)))
    assert again.identity["plain_text_tokens"] == WRAPPER
    assert len(again.tokenizer("<tool_call>", add_special_tokens=False)["input_ids"]) > 1
