"""The one rule for the special ids every path needs: where generation stops, and what pads a batch.

Evaluation, the CLI's `generate`, sessions, the engine and the server all stop on the same set of ids and pad with
the same id, so a step scored in evaluation ends where the server would end it. Plain functions over a tokenizer and
a (generation) config; imports nothing from the rest of the package.
"""

from __future__ import annotations

__all__ = ["END_OF_TURN_TOKENS", "end_of_turn_ids", "pad_token_id", "stop_token_ids"]

#: Tokens that end an assistant turn in common chat templates (besides the tokenizer's eos token).
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
)


def _ids(value) -> list[int]:
    """A config's eos/pad entry as a list: transformers allows an int, a list of ints or None."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def end_of_turn_ids(tokenizer) -> set[int]:
    """The tokenizer's eos id and every END_OF_TURN_TOKENS entry it has as a special (added) token. Only special
    ones: Qwen2.5's vocabulary also holds `</s>` as ordinary text (id 128247), which a reply may legitimately write."""
    ids = set(_ids(getattr(tokenizer, "eos_token_id", None)))
    special = dict(tokenizer.get_added_vocab())
    vocab = tokenizer.get_vocab()
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for t in END_OF_TURN_TOKENS:
        if t in special:
            ids.add(special[t])
        elif t in vocab and vocab[t] in special_ids:
            ids.add(vocab[t])
    return ids


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Where a generated turn ends: the model's generation-config eos ids, the tokenizer's eos id and the chat
    templates' end-of-turn tokens it knows (sorted). Without a tokenizer (shape presets), the config's ids alone."""
    ids = set(_ids(getattr(generation_config, "eos_token_id", None)))
    if tokenizer is not None:
        ids |= end_of_turn_ids(tokenizer)
    return sorted(ids)


def pad_token_id(tokenizer, config=None) -> int:
    """The id to pad with: the tokenizer's pad token, else its eos, else the model config's pad, else its eos, else
    0. Padded positions are masked (attention and labels), so any id in the vocabulary gives the same results; the
    order only keeps padded text readable."""
    candidates = []
    if tokenizer is not None:
        candidates += [getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)]
    if config is not None:
        candidates += [getattr(config, "pad_token_id", None), getattr(config, "eos_token_id", None)]
    for value in candidates:
        ids = _ids(value)
        if ids:
            return ids[0]
    return 0
