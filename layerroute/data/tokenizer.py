"""The tokenizer that renders the data: the model module's loader, and the one pad-id rule (layerroute.special_tokens)."""

from __future__ import annotations

from layerroute.model import load_tokenizer
from layerroute.special_tokens import pad_token_id

__all__ = ["load_tokenizer", "pad_token_id"]
