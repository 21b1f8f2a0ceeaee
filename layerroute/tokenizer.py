"""Encode chosen added tokens as ordinary text: the tokenizer-level switch behind `model.plain_text_tokens`.

Why. Qwen2.5's tokenizer maps ``<tool_call>`` / ``</tool_call>`` to single added tokens (151657 / 151658), and
Qwen2.5-Coder-0.5B-Instruct never learned them: its LM-head rows for both are untrained (cosine 0.93 with
``<|im_start|>``'s row, similar norm), it writes its calls as bare JSON, and a LoRA trained on targets with the
added token ends up writing ``<|im_start|>`` where the wrapper belongs. With the wrapper written as its BPE pieces
(``<tool``, ``_call``, ``>``...) the model emits tokens it has seen in code, and the decoded text still reads
``<tool_call>`` for the existing parser.

Where. The tokenizer itself: the listed strings are removed from the backend's added-token table, so every path
that turns text into ids (step rendering for training and evaluation, the serving engine, `generate`'s prompts)
sees the same pieces, context and target alike, with nothing to thread through. The ids themselves stay in the
vocabulary, so a stray 151657 still decodes to ``<tool_call>``.

Cost: re-reading the tokenizer's JSON once per load (~1 s for Qwen's 11 MB).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer
from transformers import AutoTokenizer

from .errors import ModelLoadError
from .packaged import OFFLINE_DEFAULT, dequantized_gguf_dir, gguf_file, hub_offline, offline_reason


def plain_text_tokenizer(tokenizer, tokens: list[str]):
    """Make `tokenizer` (a fast tokenizer; changed in place and returned) encode each of `tokens` as ordinary text.

    Raises ModelLoadError when a listed string is not an added token of this tokenizer (the setting would do
    nothing, which is what a typo looks like) or is a special token (an end-of-turn must stay one token)."""
    if not tokens:
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelLoadError(
            f"model.plain_text_tokens needs a fast (tokenizers) tokenizer; {type(tokenizer).__name__} is not one"
        )
    spec = json.loads(backend.to_str())
    added = {a["content"]: a for a in spec.get("added_tokens", [])}
    for token in tokens:
        if token not in added:
            raise ModelLoadError(
                f"model.plain_text_tokens: {token!r} is not an added token of this tokenizer, so it is already "
                "encoded as text (remove it from the setting)"
            )
        if added[token].get("special"):
            raise ModelLoadError(f"model.plain_text_tokens: {token!r} is a special token; only plain added tokens "
                                 "can be written as text")
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["content"] not in tokens]
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(spec))
    return tokenizer


def load_tokenizer(name: str):
    """The tokenizer for a model name: a packaged model, a .gguf file, a local folder or a hub id."""
    gguf = gguf_file(name)
    source = str(dequantized_gguf_dir(gguf)) if gguf is not None else name
    local_only = not Path(source).exists() and hub_offline()
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except OSError as err:
        where = f" ({offline_reason()}, and it is not in the local cache)" if local_only else ""
        raise ModelLoadError(
            f"could not load a tokenizer for {name!r}{where}: {err}. Offline, use {OFFLINE_DEFAULT!r}, a local "
            "folder or a .gguf path"
        ) from err
