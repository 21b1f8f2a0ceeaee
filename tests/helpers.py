"""Tiny models built in code for tests (no downloads, no tokenizer)."""

from __future__ import annotations

import torch

from layerroute.adapters import RoutedModel, build_routed_model
from layerroute.config import LoraSettings, ModelConfig, RouterConfig
from layerroute.model import load_base

TINY_SHAPES = ["shape:tiny-qwen2", "shape:tiny-llama"]


def tiny_routed(shape: str = "shape:tiny-qwen2", *, lora: bool = True, seed: int = 0, router=None) -> RoutedModel:
    """A tiny routed model whose LoRA B matrices are random (peft starts them at zero, which would hide bugs)."""
    cfg = ModelConfig(name=shape, seed=seed)
    loaded = load_base(cfg, tokenizer=False)
    rm = build_routed_model(cfg, router or RouterConfig(), LoraSettings(enabled=lora), loaded=loaded)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in rm.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    rm.model.eval()
    return rm


def random_batch(batch: int = 2, length: int = 12, context: int = 8, vocab: int = 1000, seed: int = 0):
    """input_ids [B, T] and a decision mask with `context` leading context positions per row."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=gen)
    mask = torch.zeros(batch, length)
    mask[:, :context] = 1
    return ids, mask
