"""The KV cache every generation path here uses: `RoutedCache`, a DynamicCache with two changes.

1. **Its length is that of its longest layer.** Under the ``exact`` policy a skipped block writes no K/V, so its
   cache layer can be empty (block 0 too); transformers reads the sequence length and mask sizes from layer 0 by
   default. Every block that runs in a step has the same length, so the longest layer is the true length.
2. **Decode writes in place.** transformers' `DynamicLayer.update` concatenates, so each decode step copies the
   whole cache of every layer (O(T) per token per layer): 22% of a batch-8 SmolLM2 decode step's CPU time in the
   profiler (bf16, 264-token prompts). Removing it took that step from 77-78 ms to 70-73 ms and left batch 1 at
   57-58 ms (`benchmarks/scheduler_decode.py`, one thread; docs/results/serving_concurrency.md).
   `GrowingLayer` keeps K/V in a buffer with spare time columns and hands out the filled prefix as a view; a step
   writes its tokens into the spare columns. Costs up to `SPARE_COLUMNS` + 1/8 of the length in unused memory per layer
   and one copy each time the buffer fills; `RoutedCache.compact` drops the spare columns (the engine does before
   it stores a session, so the session store's byte count is what it holds).

Safety rule: a buffer is only ever written past its high-water mark, and only while the layer's ``keys`` and
``values`` are still the very views it handed out. Anything that replaced or cropped ``keys`` (the scheduler's row gathers, a
session's checkpoint slices, `crop`, `batch_select_indices`) makes the next update copy into a fresh buffer, so a
tensor returned earlier is never changed under its holder, as with concatenation.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

SPARE_COLUMNS = 128  # time columns allocated beyond what is needed (plus 1/8 of the length); ~1 copy per 128 steps


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose K/V live in a buffer with spare time columns (module doc)."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._buf_k = self._buf_v = None
        self._filled = 0  # columns of the buffers ever written (the high-water mark)
        self._handed = None  # the (keys, values) views last handed out

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n_new = key_states.shape[-2]
        # in place only while keys / values are still the very views handed out (anything that gathered, cropped
        # or replaced them made new tensors) and the buffer has room
        handed = self._handed is not None and self.keys is self._handed[0] and self.values is self._handed[1]
        if not (handed and self._filled + n_new <= self._buf_k.shape[2]):
            old = self.keys.shape[-2] if self.keys.dim() == 4 else 0
            need = old + n_new
            shape = (*key_states.shape[:2], need + SPARE_COLUMNS + need // 8, key_states.shape[-1])
            self._buf_k = key_states.new_empty(shape)
            self._buf_v = value_states.new_empty((*shape[:3], value_states.shape[-1]))
            if old:
                self._buf_k[:, :, :old] = self.keys
                self._buf_v[:, :, :old] = self.values
            self._filled = old
        end = self._filled + n_new
        self._buf_k[:, :, self._filled:end] = key_states
        self._buf_v[:, :, self._filled:end] = value_states
        self._filled = end
        self.keys, self.values = self._handed = (self._buf_k[:, :, :end], self._buf_v[:, :, :end])
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        self._buf_k = self._buf_v = self._handed = None
        self._filled = 0

    def rewind(self, length: int) -> None:
        """Drop the columns past `length` in place, keeping the buffer (the next update writes over them): the one
        exception to the safety rule, for a caller that owns the cache and holds no view of the dropped columns
        (a draft verification dropping its rejected drafts, `layerroute.infer.drafts`). Otherwise a plain crop."""
        if not self.is_initialized or self.keys.dim() != 4 or self.keys.shape[-2] <= length:
            return
        handed = self._handed is not None and self.keys is self._handed[0] and self.values is self._handed[1]
        if not handed:
            self.crop(length - self.keys.shape[-2])  # transformers 5: crop takes minus the tokens to drop
            return
        self._filled = length
        self.keys, self.values = self._handed = (self._buf_k[:, :, :length], self._buf_v[:, :, :length])

    def compact(self) -> None:
        """Keep only the filled columns (a stored session should not hold spare ones); the next update copies."""
        if getattr(self, "_buf_k", None) is not None and self._buf_k.shape[2] > self.keys.shape[2]:
            self.keys, self.values = self.keys.clone(), self.values.clone()
        self._buf_k = self._buf_v = self._handed = None


class RoutedCache(DynamicCache):
    """A DynamicCache of `GrowingLayer`s whose length is that of its longest layer (module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer_class_to_replicate = GrowingLayer

    def compact(self) -> None:
        """Drop every layer's spare columns (`GrowingLayer.compact`): what a kept session stores."""
        for layer in self.layers:
            if isinstance(layer, GrowingLayer) and layer.is_initialized:
                layer.compact()

    def rewind(self, length: int) -> None:
        """Every layer cut to at most `length` tokens in place (`GrowingLayer.rewind`: the caller holds no view of
        the dropped columns)."""
        for layer in self.layers:
            if isinstance(layer, GrowingLayer):
                layer.rewind(length)
            elif layer.is_initialized and layer.keys.dim() == 4 and layer.keys.shape[-2] > length:
                layer.crop(length - layer.keys.shape[-2])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max((layer.get_seq_length() for layer in self.layers), default=0)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length()


__all__ = ["SPARE_COLUMNS", "GrowingLayer", "RoutedCache"]
