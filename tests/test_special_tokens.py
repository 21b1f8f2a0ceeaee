"""The one stop rule and the one pad rule (layerroute.special_tokens), and that every path uses them."""

from types import SimpleNamespace

import pytest
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import GenerationConfig, PreTrainedTokenizerFast

from layerroute.infer.generate import model_pad_id, stop_ids
from layerroute.special_tokens import end_of_turn_ids, pad_token_id, stop_token_ids
from tests.helpers import tiny_routed


@pytest.fixture(scope="module")
def tok():
    """Qwen2.5's situation in small: `</s>` is ordinary text in the vocabulary, `<|im_end|>` and `<|endoftext|>`
    are added special tokens, and eos is `<|im_end|>`."""
    vocab = {w: i for i, w in enumerate(["<unk>", "hello", "world", "</s>"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    t = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    t.add_special_tokens({"eos_token": AddedToken("<|im_end|>", special=True),
                          "additional_special_tokens": [AddedToken("<|endoftext|>", special=True)]})
    t.chat_template = "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"  # the engine needs one
    return t


def test_end_of_turn_ids_take_special_tokens_only(tok):
    im_end, endoftext = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.get_vocab()["</s>"] == 3  # present, as text
    assert end_of_turn_ids(tok) == {im_end, endoftext}  # a reply that writes "</s>" does not end there


def test_stop_ids_join_the_generation_config_and_the_tokenizer(tok):
    im_end, endoftext = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert stop_token_ids(tok, GenerationConfig(eos_token_id=[1, im_end])) == sorted({1, im_end, endoftext})
    assert stop_token_ids(tok, None) == sorted({im_end, endoftext})
    assert stop_token_ids(None, GenerationConfig(eos_token_id=7)) == [7]  # shape presets: no tokenizer
    assert stop_token_ids(None, None) == []


def test_pad_rule_order_and_fallback(tok):
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert pad_token_id(tok, SimpleNamespace(pad_token_id=5, eos_token_id=6)) == im_end  # no pad token: its eos
    tok_with_pad = SimpleNamespace(pad_token_id=9, eos_token_id=im_end)
    assert pad_token_id(tok_with_pad, None) == 9
    assert pad_token_id(None, SimpleNamespace(pad_token_id=None, eos_token_id=[4, 6])) == 4
    assert pad_token_id(None, SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0  # masked anyway


def test_generation_evaluation_and_serving_share_the_rules(tok):
    """The three places that used to disagree (evaluation stopped on 3 ids, serving on 7+, generate on the
    generation config's eos alone) now read the same rule."""
    from layerroute.serve.engine import Engine

    rm = tiny_routed(tokenizer=tok)
    rm.base_model.generation_config.eos_token_id = 1
    expected = stop_token_ids(tok, rm.base_model.generation_config)
    assert 1 in expected and tok.convert_tokens_to_ids("<|im_end|>") in expected
    assert stop_ids(rm) == expected  # generate / sessions / evaluation (eval.accuracy calls stop_ids)
    assert stop_ids(rm, None) is None and stop_ids(rm, 3) == [3]
    engine = Engine(rm)
    try:
        assert engine.eos_ids == expected
        assert engine.pad_id == model_pad_id(rm) == pad_token_id(tok, rm.base_model.generation_config)
    finally:
        engine.close()
