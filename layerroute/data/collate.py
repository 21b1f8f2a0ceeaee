"""Batching steps: right-padded tensors, and batches grouped by length to limit padding."""

from __future__ import annotations

import random

import torch

from layerroute.data.render import IGNORE_INDEX, Step


def collate_steps(steps: list[Step], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of steps into a batch.

    Returns (B = len(steps), T = longest step):
      input_ids       [B, T] long   pad_token_id after each step's end
      attention_mask  [B, T] long   1 on real tokens
      labels          [B, T] long   -100 on context and padding
      decision_mask   [B, T] long   1 on context positions only (never target, never padding)
      is_tool_call    [B]    bool
      context_length  [B]    long
      length          [B]    long   number of target tokens
    """
    if not steps:
        raise ValueError("collate_steps needs at least one step")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None: pass the tokenizer's pad (or eos) token id")
    B, T = len(steps), max(len(s.input_ids) for s in steps)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    decision_mask = torch.zeros((B, T), dtype=torch.long)
    for i, s in enumerate(steps):
        n = len(s.input_ids)
        input_ids[i, :n] = torch.tensor(s.input_ids, dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.tensor(s.labels, dtype=torch.long)
        decision_mask[i, :n] = torch.tensor(s.decision_mask, dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "decision_mask": decision_mask,
        "is_tool_call": torch.tensor([s.is_tool_call for s in steps], dtype=torch.bool),
        "context_length": torch.tensor([s.context_length for s in steps], dtype=torch.long),
        "length": torch.tensor([s.length for s in steps], dtype=torch.long),
    }


def length_grouped_batches(
    steps: list[Step], batch_size: int, seed: int, mega_factor: int = 50
) -> list[list[int]]:
    """Indices of `steps` in batches of similar total length, in a seeded random order.

    As Hugging Face's LengthGroupedSampler: shuffle, cut into megabatches of `mega_factor * batch_size`,
    sort each by length (longest first), cut into batches, shuffle the batch order. Every index appears
    exactly once; the last batch may be smaller. Deterministic for a given seed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(seed)
    idx = list(range(len(steps)))
    rng.shuffle(idx)
    mega = batch_size * max(1, mega_factor)
    batches: list[list[int]] = []
    for start in range(0, len(idx), mega):
        chunk = sorted(idx[start : start + mega], key=lambda i: -len(steps[i].input_ids))
        batches.extend(chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches
