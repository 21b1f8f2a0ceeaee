"""FLOP accounting against counts done by hand, and the two headline ratios for Qwen2.5-0.5B."""

import math

import pytest

from layerroute.errors import ConfigError
from layerroute.flops import (
    ModelShape,
    aggregate,
    attention_pairs,
    block_flops,
    from_model_config,
    kv_only_flops,
    lm_head_flops,
    router_flops,
    step_flops,
)

# hidden 8, 2 query heads, 1 KV head, head_dim = 8 / 2 = 4, MLP 16, vocab 10, 2 blocks.
TINY = {
    "hidden_size": 8,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 16,
    "vocab_size": 10,
    "num_hidden_layers": 2,
}

# The public Qwen2.5-0.5B(-Instruct) config.json.
QWEN25_05B = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "num_hidden_layers": 24,
    "vocab_size": 151936,
}

# Tiny config, per token, by hand (multiply-add = 2 FLOPs):
#   q: 2*8*8 = 128   k: 2*8*4 = 64   v: 2*8*4 = 64   o: 2*8*8 = 128
#   gate: 2*8*16 = 256   up: 256   down: 256
TINY_LINEAR_PER_TOKEN = 128 + 64 + 64 + 128 + 256 + 256 + 256  # = 1152
# Attention per visible (query, key) pair: QK^T 2*4 per head + PV 2*4 per head, 2 query heads = 32.
TINY_ATTN_PER_PAIR = (2 * 4 + 2 * 4) * 2  # = 32


def test_tiny_shape_defaults():
    s = from_model_config(TINY)
    assert s.head_dim == 4 and s.num_key_value_heads == 1
    assert TINY_LINEAR_PER_TOKEN == 1152 and TINY_ATTN_PER_PAIR == 32


def test_attention_pairs_are_causal():
    assert attention_pairs(1) == 1
    assert attention_pairs(3) == 1 + 2 + 3
    assert attention_pairs(3, n_past=2) == 3 + 4 + 5
    assert attention_pairs(0, n_past=7) == 0


@pytest.mark.parametrize(
    "n_new, n_past, expected",
    [
        (1, 0, 1 * 1152 + 1 * 32),  # 1184
        (3, 0, 3 * 1152 + (1 + 2 + 3) * 32),  # 3456 + 192 = 3648
        (3, 2, 3 * 1152 + (3 + 4 + 5) * 32),  # 3456 + 384 = 3840
        (1, 4, 1 * 1152 + 5 * 32),  # one decode step after 4 cached tokens = 1312
        (0, 5, 0),
    ],
)
def test_block_flops_hand_counts(n_new, n_past, expected):
    assert block_flops(TINY, n_new, n_past) == expected


def test_prefill_equals_token_by_token_decoding():
    prefill = block_flops(TINY, 5)
    decode = sum(block_flops(TINY, 1, n_past=p) for p in range(5))
    assert prefill == decode == 5 * 1152 + 15 * 32


def test_kv_lm_head_router_hand_counts():
    assert kv_only_flops(TINY, 3) == 3 * (64 + 64)  # k and v projections only = 384
    assert lm_head_flops(TINY, 4) == 4 * (2 * 8 * 10)  # 640
    # Linear router over 5 context positions: pooling 5*8 adds + 8 divisions, dot product 2*8.
    assert router_flops(TINY, 5) == 5 * 8 + 8 + 2 * 8  # 64
    # Bottleneck router, r = 4: pooling 48, Linear(8, 4) 2*8*4 = 64, Linear(4, 1) 2*4 = 8.
    assert router_flops(TINY, 5, router_hidden=4) == 48 + 64 + 8  # 120


def test_step_exact_policy_hand_count():
    # context 2 + step 3 = 5 tokens through every block that runs; block 1 skipped.
    out = step_flops(TINY, context_length=2, step_length=3, run_mask=[True, False])
    one_block = 5 * 1152 + (1 + 2 + 3 + 4 + 5) * 32  # 5760 + 480 = 6240
    lm_head = 3 * 160  # the step's 3 positions
    router = 2 * (2 * 8 + 8 + 2 * 8)  # 2 routers pooling 2 context positions: 2 * 40 = 80
    assert out["per_block"] == [one_block, 0]
    assert out["block_total"] == 2 * one_block == 12480
    assert out["block_run"] == one_block
    assert out["block_skipped_fraction"] == 0.5
    assert out["lm_head"] == lm_head and out["router"] == router and out["kv"] == 0
    assert out["total_dense"] == 2 * one_block + lm_head == 12960
    assert out["total_routed"] == one_block + lm_head + router == 6800
    assert out["total_skipped_fraction"] == pytest.approx((12960 - 6800) / 12960)
    assert out["n_run"] == 1 and out["policy"] == "exact"


def test_step_kv_preserving_hand_count():
    # Only the step's 3 tokens are processed, attending to 2 cached ones; the skipped block writes K/V.
    out = step_flops(TINY, context_length=2, step_length=3, run_mask=[True, False], kv_preserving=True)
    one_block = 3 * 1152 + (3 + 4 + 5) * 32  # 3840
    kv = 3 * (64 + 64)  # 384
    assert out["per_block"] == [one_block, kv]
    assert out["block_total"] == 7680 and out["block_run"] == 3840
    assert out["block_skipped_fraction"] == 0.5  # the paper's measure ignores the K/V cost
    assert out["total_dense"] == 7680 + 480
    assert out["total_routed"] == 3840 + 384 + 480 + 80
    assert out["policy"] == "kv_preserving"


def test_nothing_skipped_costs_the_routers():
    out = step_flops(TINY, 2, 3, [True, True])
    assert out["block_skipped_fraction"] == 0.0
    assert out["total_skipped_fraction"] == pytest.approx(-out["router"] / out["total_dense"])
    assert out["total_skipped_fraction"] < 0
    baseline = step_flops(TINY, 2, 3, [True, True], count_routers=False)
    assert baseline["total_skipped_fraction"] == 0.0


def test_lm_head_positions_override():
    out = step_flops(TINY, 2, 3, [False, False], lm_head_positions=5, count_routers=False)
    assert out["lm_head"] == 5 * 160
    assert out["block_skipped_fraction"] == 1.0
    assert out["total_routed"] == 5 * 160


def test_aggregate_sums_before_dividing():
    short = step_flops(TINY, 0, 1, [False, False])  # cheap step, everything skipped
    long = step_flops(TINY, 40, 10, [True, True])  # expensive step, nothing skipped
    agg = aggregate([short, long])
    mean_of_ratios = (short["block_skipped_fraction"] + long["block_skipped_fraction"]) / 2
    expected = short["block_total"] / (short["block_total"] + long["block_total"])
    assert agg["block_skipped_fraction"] == pytest.approx(expected)
    assert agg["block_skipped_fraction"] < mean_of_ratios == 0.5
    assert agg["total_dense"] == short["total_dense"] + long["total_dense"]
    assert agg["total_skipped_fraction"] == pytest.approx(
        (agg["total_dense"] - agg["total_routed"]) / agg["total_dense"]
    )
    assert agg["per_block"] == [a + b for a, b in zip(short["per_block"], long["per_block"], strict=True)]
    assert agg["n_steps"] == 2 and agg["n_run"] == 2
    empty = aggregate([])
    assert empty["n_steps"] == 0 and math.isnan(empty["block_skipped_fraction"])


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="run_mask has 3"):
        step_flops(TINY, 2, 3, [True, True, True])
    with pytest.raises(ConfigError, match="vocab_size"):
        from_model_config({k: v for k, v in TINY.items() if k != "vocab_size"})
    with pytest.raises(ConfigError, match="n_new"):
        block_flops(TINY, -1)


def test_linear_flops_are_twice_the_weights_of_a_real_decoder_layer():
    """Cross-check the projection shapes against transformers' own Qwen2 and Llama layers."""
    transformers = pytest.importorskip("transformers")
    import torch

    for cfg in (
        transformers.Qwen2Config(**TINY, max_window_layers=2),
        transformers.LlamaConfig(**TINY),
        transformers.LlamaConfig(**{**TINY, "head_dim": 6}),  # head_dim set explicitly, != hidden/heads
    ):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        layer = model.model.layers[0]
        matmul_weights = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
        one_token = block_flops(cfg, 1) - 2 * 2 * cfg.num_attention_heads * from_model_config(cfg).head_dim
        assert one_token == 2 * matmul_weights, type(cfg).__name__
        assert lm_head_flops(cfg, 1) == 2 * model.lm_head.weight.numel()


def test_qwen25_05b_kv_preserving_cost_is_about_1_5_percent_of_a_block():
    for n in (1, 16, 128):
        share = kv_only_flops(QWEN25_05B, n) / block_flops(QWEN25_05B, n)
        print(f"Qwen2.5-0.5B, {n} tokens: K/V of a skipped block = {100 * share:.2f}% of a block")
        assert 0.014 < share < 0.016
    # Short-sequence limit, exactly: k+v = 2*128 of the 2*896 + 2*128 + 3*4864 weight columns per row.
    limit = (2 * 128) / (2 * 896 + 2 * 128 + 3 * 4864)
    assert limit == pytest.approx(0.01537, abs=1e-4)


def test_qwen25_05b_lm_head_is_about_a_quarter_of_a_token():
    for n in (1, 128):
        blocks = 24 * block_flops(QWEN25_05B, n)
        head = lm_head_flops(QWEN25_05B, n)
        share = head / (blocks + head)
        print(f"Qwen2.5-0.5B, {n} tokens: LM head = {100 * share:.1f}% of the forward")
        assert 0.22 < share < 0.30


def test_qwen25_05b_weights_add_up_to_the_published_parameter_count():
    s = from_model_config(QWEN25_05B)
    matmul_weights_per_block = (block_flops(s, 1) - 4 * 14 * 64) // 2
    biases = 24 * (896 + 128 + 128)  # q, k, v biases
    norms = 24 * 2 * 896 + 896  # two RMSNorms per block + the final one
    embeddings = 151936 * 896  # tied with the LM head
    assert 24 * matmul_weights_per_block + biases + norms + embeddings == 494_032_768


def test_shape_validation():
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        ModelShape(8, 16, 3, 2, 4, 10, 2)
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelShape(0, 16, 2, 1, 4, 10, 2)


@pytest.mark.parametrize("kv_preserving", [False, True])
def test_prompt_full_depth_skips_the_steps_own_tokens_only(kv_preserving):
    # context 2 + step 3; block 1 skipped for the step's 3 tokens but run over the 2 context tokens
    out = step_flops(TINY, context_length=2, step_length=3, run_mask=[True, False], kv_preserving=kv_preserving,
                     prompt_full_depth=True)
    context_part = block_flops(TINY, 2)
    step_part = block_flops(TINY, 3, n_past=2)
    assert context_part + step_part == block_flops(TINY, 5)  # causal attention splits exactly at the context
    kv = 3 * (64 + 64) if kv_preserving else 0
    assert out["per_block"] == [context_part + step_part, context_part + kv]
    assert out["block_total"] == 2 * block_flops(TINY, 5)
    assert out["block_run"] == block_flops(TINY, 5) + context_part
    assert out["block_skipped_fraction"] == pytest.approx(step_part / (2 * block_flops(TINY, 5)))
    dense = step_flops(TINY, context_length=2, step_length=3, run_mask=[True, True], prompt_full_depth=True)
    assert dense["block_skipped_fraction"] == 0
    assert step_flops(TINY, context_length=0, step_length=3, run_mask=[True, False],
                      prompt_full_depth=True)["block_skipped_fraction"] == 0.5  # no context: as before
