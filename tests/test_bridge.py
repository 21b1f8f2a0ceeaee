"""Skip bridges: zero = the plain skip, the closed-form fit, real skipping = teacher forcing, save/load, FLOPs."""

from __future__ import annotations

import json

import pytest
import torch

from layerroute import flops
from layerroute.adapters import load_adapter, save_adapter
from layerroute.calibrate.bridges import fit_bridges, reduced_rank_solution
from layerroute.config import RouterConfig
from layerroute.errors import AdapterError, ConfigError
from layerroute.infer.generate import routed_generate
from layerroute.model import parameter_counts
from layerroute.nn.bridge import install_bridges
from layerroute.nn.routed import find_routed_layers, routing
from tests.helpers import TINY_SHAPES, random_batch, synthetic_step, tiny_routed

PATTERN = [True, False, True, False]  # blocks 1 and 3 skipped


def _randomise_bridges(rm, seed: int = 0, std: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in find_routed_layers(rm.model):
            for p in layer.bridge.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def _logits(rm, ids, mask, forced):
    with torch.no_grad(), routing(rm.model, "mix", decision_mask=mask, forced=forced):
        return rm.model(input_ids=ids).logits


def test_a_zero_bridge_is_the_plain_skip_and_a_trained_one_is_not():
    rm = tiny_routed()
    ids, mask = random_batch()
    plain = _logits(rm, ids, mask, PATTERN)
    install_bridges(rm.model, 4)
    # up starts at zero (equal up to rounding: the plain path's open gates return h + (block(h) - h))
    assert torch.allclose(_logits(rm, ids, mask, PATTERN), plain, atol=1e-6)
    _randomise_bridges(rm)
    assert not torch.allclose(_logits(rm, ids, mask, PATTERN), plain)
    # an open gate never reads its bridge
    open_before = _logits(rm, ids, mask, "open")
    _randomise_bridges(rm, seed=1)
    assert torch.equal(_logits(rm, ids, mask, "open"), open_before)
    # the closed layer returns exactly h + bridge(norm(h))
    layer = find_routed_layers(rm.model)[1]
    seen = {}
    layer.register_forward_hook(lambda m, args, out: seen.update(inp=args[0].clone(), out=out.clone()))
    _logits(rm, ids, mask, PATTERN)
    expected = seen["inp"] + layer.bridge(layer.block.input_layernorm(seen["inp"]))
    assert torch.allclose(seen["out"], expected, atol=1e-6)


def test_reduced_rank_solution_recovers_a_low_rank_map_and_beats_truncating_least_squares():
    gen = torch.Generator().manual_seed(0)
    n, d, r = 400, 12, 3
    scales = torch.logspace(0, 1.5, d, dtype=torch.float64)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) * scales  # badly conditioned inputs
    true = torch.randn(d, r, generator=gen, dtype=torch.float64) @ torch.randn(r, d, generator=gen, dtype=torch.float64)
    down, up = reduced_rank_solution(x.T @ x, x.T @ (x @ true), r, ridge=1e-12)
    assert down.shape == (d, r) and up.shape == (r, d)
    assert torch.allclose(down @ up, true, atol=1e-6)
    # a full-rank target: the rank-r fit must be at least as good as the truncated SVD of the least-squares map
    target = x @ torch.randn(d, d, generator=gen, dtype=torch.float64) + torch.randn(n, d, generator=gen,
                                                                                     dtype=torch.float64)
    down, up = reduced_rank_solution(x.T @ x, x.T @ target, r, ridge=1e-12)
    ols = torch.linalg.lstsq(x, target).solution
    u, s, vh = torch.linalg.svd(ols)
    naive = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
    err = float(((x @ (down @ up) - target) ** 2).sum())
    assert err < float(((x @ naive - target) ** 2).sum())
    # ... and no other rank-r map does better (a few random directions as a spot check)
    for _ in range(5):
        v = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64)).Q
        assert err <= float(((x @ (ols @ v @ v.T) - target) ** 2).sum()) + 1e-9


def test_fitted_bridges_bring_a_skipped_layer_closer_to_its_block():
    rm = tiny_routed()
    gen = torch.Generator().manual_seed(5)
    steps = [synthetic_step(i, 10, 6, "tool_call", torch.randint(3, 1000, (16,), generator=gen).tolist())
             for i in range(6)]
    install_bridges(rm.model, 8)
    explained = fit_bridges(rm, steps, batch_size=3, pad_id=0)
    assert len(explained) == rm.num_layers and all(0.0 < e <= 1.0 for e in explained)
    # on the calibration tokens, the bridged skip of block 1 lands closer to the block's output than h does
    layer = find_routed_layers(rm.model)[1]
    ids = torch.tensor([s.input_ids for s in steps[:3]])
    seen = {}
    handle = layer.block.register_forward_hook(lambda m, args, out: seen.update(inp=args[0].clone(), out=out.clone()))
    _logits(rm, ids, None, "open")
    handle.remove()
    h, block_out = seen["inp"], seen["out"]
    with torch.no_grad():
        bridged = layer.skipped(h)
    assert float((bridged - block_out).pow(2).sum()) < float((h - block_out).pow(2).sum())
    with pytest.raises(ValueError, match="at least one"):
        fit_bridges(rm, [], batch_size=3, pad_id=0)


@pytest.mark.parametrize("shape", TINY_SHAPES)
@pytest.mark.parametrize("policy", ["exact", "kv_preserving"])
def test_real_skipping_with_a_cache_generates_what_teacher_forcing_predicts(shape, policy):
    """Generation in skip mode (KV cache, the bridge in place of the block, rows with different decisions in one
    batch) produces the tokens that greedy decoding without a cache in mix mode produces."""
    rm = tiny_routed(shape, router=RouterConfig(bridge_rank=4))
    _randomise_bridges(rm)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [100, 200, 300], [42, 43, 44, 45, 46]]
    patterns = [PATTERN, [True] * 4, [False, True, True, False]]
    batch = routed_generate(rm, prompts, max_new_tokens=6, eos_token_id=None, forced=patterns, kv_policy=policy)
    for row, prompt in enumerate(prompts):
        seq = list(prompt)
        for _ in range(6):
            logits = _logits(rm, torch.tensor([seq]), torch.ones(1, len(seq)), patterns[row])
            seq.append(int(logits[0, -1].argmax()))
        assert batch.tokens[row] == seq[len(prompt):], f"row {row}"


def test_bridges_train_only_where_their_block_is_skipped_and_are_counted():
    rm = tiny_routed(router=RouterConfig(bridge_rank=4))
    counts = parameter_counts(rm.model)
    assert counts["bridge"] == rm.num_layers * 2 * rm.config.hidden_size * 4
    assert counts["trainable"] == counts["lora"] + counts["router"] + counts["bridge"]
    _randomise_bridges(rm)
    ids, mask = random_batch()
    rm.model.train()
    with routing(rm.model, "mix", decision_mask=mask, forced=PATTERN):
        rm.model(input_ids=ids).logits.pow(2).mean().backward()
    for layer in find_routed_layers(rm.model):
        grad = layer.bridge.up.weight.grad
        assert layer.bridge.up.weight.requires_grad
        if PATTERN[layer.index]:
            assert grad is None or float(grad.abs().sum()) == 0.0, f"block {layer.index} ran: no bridge gradient"
        else:
            assert grad is not None and float(grad.abs().sum()) > 0.0, f"block {layer.index} skipped"


def test_bridges_save_and_load_with_the_adapter(tmp_path):
    rm = tiny_routed(router=RouterConfig(bridge_rank=4))
    _randomise_bridges(rm)
    ids, mask = random_batch()
    before = _logits(rm, ids, mask, PATTERN)
    save_adapter(rm, tmp_path / "a")
    loaded = load_adapter(tmp_path / "a")
    assert torch.equal(_logits(loaded, ids, mask, PATTERN), before)
    # a file with bridges under a config without them is refused, not silently read as the plain skip
    meta_path = tmp_path / "a" / "layerroute.json"
    meta = json.loads(meta_path.read_text())
    meta["router"]["bridge_rank"] = 0
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="skip bridge"):
        load_adapter(tmp_path / "a")


def test_bridge_rank_is_validated_naming_the_flag():
    with pytest.raises(ConfigError, match="router.bridge_rank"):
        RouterConfig(bridge_rank=-1)
    with pytest.raises(ConfigError, match="router.bridge_rank 65 exceeds"):
        tiny_routed(router=RouterConfig(bridge_rank=65))  # hidden 64


@pytest.mark.parametrize("kv_preserving", [False, True])
def test_flops_count_each_skipped_blocks_bridge(kv_preserving):
    shape = flops.ModelShape(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=16, vocab_size=100, num_hidden_layers=4)
    mask = [True, False, True, False]
    plain = flops.step_flops(shape, 20, 5, mask, kv_preserving=kv_preserving)
    bridged = flops.step_flops(shape, 20, 5, mask, kv_preserving=kv_preserving, bridge_rank=8)
    tokens = 5 if kv_preserving else 25  # what a skipped block would have processed
    assert flops.bridge_flops(shape, tokens, 8) == 2 * 2 * tokens * 64 * 8
    assert bridged["block_run"] - plain["block_run"] == 2 * flops.bridge_flops(shape, tokens, 8)
    assert bridged["total_routed"] - plain["total_routed"] == 2 * flops.bridge_flops(shape, tokens, 8)
    assert bridged["block_skipped_fraction"] < plain["block_skipped_fraction"]
    assert flops.step_flops(shape, 20, 5, mask, kv_preserving=kv_preserving, bridge_rank=0) == plain


def test_bridges_stay_fp32_on_a_bf16_backbone():
    from layerroute.adapters import build_routed_model
    from layerroute.config import LoraSettings, ModelConfig
    from layerroute.model import load_base

    cfg = ModelConfig(name="shape:tiny-qwen2", dtype="bfloat16")
    loaded = load_base(cfg, tokenizer=False)
    rm = build_routed_model(cfg, RouterConfig(bridge_rank=4), LoraSettings(), loaded=loaded)
    _randomise_bridges(rm)
    layer = find_routed_layers(rm.model)[1]
    assert layer.bridge.up.weight.dtype == torch.float32 and next(layer.block.parameters()).dtype == torch.bfloat16
    ids, mask = random_batch()
    logits = _logits(rm, ids, mask, PATTERN)
    assert torch.isfinite(logits).all()
    out = routed_generate(rm, [[5, 6, 7]], max_new_tokens=3, eos_token_id=None, forced=PATTERN)
    assert len(out.tokens[0]) == 3
