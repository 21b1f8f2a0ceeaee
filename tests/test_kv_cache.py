"""`layerroute.nn.kv_cache`: the growing cache layer equals concatenation, writes decode steps in place, and never
changes a tensor it handed out earlier."""

import torch
from transformers.cache_utils import DynamicLayer

from layerroute.nn.kv_cache import SPARE_COLUMNS, GrowingLayer, RoutedCache


def _kv(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, length, 4, generator=g), torch.randn(batch, 2, length, 5, generator=g)


def test_growing_layer_equals_concatenation_through_a_prefill_and_many_decode_steps():
    grow, cat = GrowingLayer(), DynamicLayer()
    steps = [11] + [1] * (SPARE_COLUMNS + 40)  # crosses the first buffer's capacity: one regrowth
    for i, n in enumerate(steps):
        k, v = _kv(3, n, i)
        gk, gv = grow.update(k, v)
        ck, cv = cat.update(k, v)
        assert torch.equal(gk, ck) and torch.equal(gv, cv)
    assert grow.get_seq_length() == sum(steps)


def test_decode_steps_write_into_the_same_buffer_until_it_fills():
    layer = GrowingLayer()
    layer.update(*_kv(2, 20, 0))
    ptr = layer.keys.data_ptr()
    room = layer._buf_k.shape[2] - 20
    assert room >= SPARE_COLUMNS
    for i in range(room):
        layer.update(*_kv(2, 1, i + 1))
        assert layer.keys.data_ptr() == ptr  # in place: no copy of the cache
    layer.update(*_kv(2, 1, 999))
    assert layer.keys.data_ptr() != ptr  # full: one copy into a larger buffer
    assert layer.keys.shape[2] == 20 + room + 1


def test_a_tensor_handed_out_earlier_is_never_changed():
    layer = GrowingLayer()
    layer.update(*_kv(2, 8, 0))
    keys_then, values_then = layer.update(*_kv(2, 1, 1))
    frozen_k, frozen_v = keys_then.clone(), values_then.clone()
    # crop back (what a session checkpoint or speculative decoding does) and write different tokens
    layer.crop(-3)
    layer.update(*_kv(2, 4, 2))
    assert torch.equal(keys_then, frozen_k) and torch.equal(values_then, frozen_v)
    assert layer.keys.shape[2] == 9 - 3 + 4


def test_replaced_keys_are_copied_into_a_fresh_buffer():
    """The scheduler gathers rows (`layer.keys = layer.keys[idx, :, cut:]`); the next update must build on that."""
    layer, cat = GrowingLayer(), DynamicLayer()
    for layer_ in (layer, cat):
        layer_.update(*_kv(3, 6, 0))
        layer_.keys, layer_.values = layer_.keys[[2, 0], :, 1:], layer_.values[[2, 0], :, 1:]
    for i in range(3):
        k, v = _kv(2, 1, i + 1)
        assert all(torch.equal(a, b) for a, b in zip(layer.update(k, v), cat.update(k, v), strict=True))


def test_reset_starts_over():
    layer = GrowingLayer()
    layer.update(*_kv(1, 5, 0))
    layer.reset()
    k, v = _kv(1, 2, 1)
    out_k, out_v = layer.update(k, v)
    assert torch.equal(out_k, k) and torch.equal(out_v, v)


def test_routed_cache_builds_growing_layers_and_reads_its_longest_layer():
    cache = RoutedCache()
    cache.update(*_kv(1, 7, 0), layer_idx=1)  # block 0 skipped under the exact policy: its layer stays empty
    assert all(isinstance(layer, GrowingLayer) for layer in cache.layers) and len(cache.layers) == 2
    assert cache.get_seq_length() == 7 and cache.get_mask_sizes(1, 0) == (8, 0)


def test_compact_keeps_the_filled_columns_only_and_later_updates_still_append():
    cache, cat = RoutedCache(), DynamicLayer()
    for i, n in enumerate((9, 1, 1)):
        k, v = _kv(2, n, i)
        cache.update(k, v, layer_idx=0)
        cat.update(k, v)
    layer = cache.layers[0]
    assert layer._buf_k.shape[2] > 11  # spare columns before
    cache.compact()
    assert layer._buf_k is None and layer.keys.is_contiguous() and layer.keys.untyped_storage().nbytes() == \
        layer.keys.numel() * layer.keys.element_size()
    assert torch.equal(layer.keys, cat.keys) and torch.equal(layer.values, cat.values)
    k, v = _kv(2, 1, 7)
    out_k, out_v = cache.update(k, v, layer_idx=0)
    ck, cv = cat.update(k, v)
    assert torch.equal(out_k, ck) and torch.equal(out_v, cv)
