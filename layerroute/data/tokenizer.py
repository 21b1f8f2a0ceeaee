"""The tokenizer that renders the data: the model module's loader, plus the pad-id rule for collation."""

from __future__ import annotations

from layerroute.errors import ModelLoadError
from layerroute.model import load_tokenizer

__all__ = ["load_tokenizer", "pad_token_id"]


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its eos token (padding is masked anyway)."""
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise ModelLoadError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has neither a pad nor an eos token"
        )
    return pid
