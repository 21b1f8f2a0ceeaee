"""Invariants of the routed layer: open = plain model, closed = identity, causal decisions, real skips."""

from __future__ import annotations

import pytest
import torch

from layerroute.nn.blocks import decoder_layers
from layerroute.nn.kv_cache import RoutedCache
from layerroute.nn.routed import find_routed_layers, gate_records, routing, unwrap_model
from tests.helpers import TINY_SHAPES, TurnTokenizer, lively, random_batch, tiny_routed


@pytest.mark.parametrize("shape", TINY_SHAPES)
def test_open_gates_equal_plain_lora_model(shape):
    rm = tiny_routed(shape)
    ids, mask = random_batch()
    with torch.no_grad(), routing(rm.model, "mix", decision_mask=mask):
        routed = rm.model(input_ids=ids).logits
        assert all(bool(r.gate.eq(1).all()) for r in gate_records(rm.model)), "init bias should open every gate"
    unwrap_model(rm.model)  # the very same weights, plain transformers blocks
    assert not find_routed_layers(rm.model)
    with torch.no_grad():
        plain = rm.model(input_ids=ids).logits
    assert (routed - plain).abs().max().item() < 1e-5


@pytest.mark.parametrize("shape", TINY_SHAPES)
def test_closed_gate_is_identity(shape):
    rm = tiny_routed(shape)
    ids, mask = random_batch()
    seen = {}
    layer = find_routed_layers(rm.model)[1]
    layer.register_forward_hook(lambda m, args, out: seen.update(inp=args[0].clone(), out=out.clone()))
    with torch.no_grad(), routing(rm.model, "mix", decision_mask=mask, forced=[True, False, True, True]):
        rm.model(input_ids=ids)
    assert torch.equal(seen["inp"], seen["out"])
    # with gradients enabled the block runs and is mixed out with g = 0: still the identity
    with routing(rm.model, "mix", decision_mask=mask, forced=[True, False, True, True]):
        rm.model(input_ids=ids)
    assert torch.equal(seen["inp"], seen["out"])


@pytest.mark.parametrize("shape", TINY_SHAPES)
def test_decision_ignores_target_tokens(shape):
    rm = tiny_routed(shape)
    # make routers input-dependent so that a leak would show
    with torch.no_grad():
        for router in rm.routers():
            router.net.weight.normal_(0, 1.0)
            router.net.bias.zero_()
    ids, mask = random_batch(batch=2, length=12, context=7)
    changed = ids.clone()
    changed[:, 7:] = torch.randint(3, 1000, changed[:, 7:].shape)
    logits = []
    for inp in (ids, changed):
        with torch.no_grad(), routing(rm.model, "mix", decision_mask=mask):
            rm.model(input_ids=inp)
            logits.append(torch.stack([r.logit for r in gate_records(rm.model)]))
    assert torch.allclose(logits[0], logits[1], atol=1e-6)
    # ...whereas changing a context token does move them
    changed_ctx = ids.clone()
    changed_ctx[:, 2] = (changed_ctx[:, 2] + 1) % 1000
    with torch.no_grad(), routing(rm.model, "mix", decision_mask=mask):
        rm.model(input_ids=changed_ctx)
        moved = torch.stack([r.logit for r in gate_records(rm.model)])
    assert not torch.allclose(logits[0], moved, atol=1e-6)


def _count_block_calls(rm):
    calls = [0] * rm.num_layers
    for layer in find_routed_layers(rm.model):
        layer.block.register_forward_pre_hook(lambda m, a, i=layer.index: calls.__setitem__(i, calls[i] + 1))
    return calls


@pytest.mark.parametrize("shape", TINY_SHAPES)
@pytest.mark.parametrize("policy", ["exact", "kv_preserving"])
def test_skipped_block_is_never_called_in_prefill_or_decode(shape, policy):
    rm = tiny_routed(shape)
    calls = _count_block_calls(rm)
    ids, _ = random_batch(batch=1, length=6, context=6)
    pattern = [True, False, True, False]
    cache = RoutedCache()
    with torch.no_grad(), routing(rm.model, "skip", forced=pattern, kv_policy=policy):
        out = rm.model(input_ids=ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(3):  # decode reuses the step's decision
            out = rm.model(input_ids=nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
    assert calls == [4, 0, 4, 0]
    lengths = [cache.layers[i].get_seq_length() if i < len(cache.layers) else 0 for i in range(4)]
    if policy == "kv_preserving":
        assert lengths == [9, 9, 9, 9]  # skipped blocks still wrote K/V for every processed token
    else:
        assert lengths[0] == 9 and lengths[2] == 9 and lengths[1] == 0 and lengths[3] == 0


@pytest.mark.parametrize("shape", TINY_SHAPES)
def test_skip_block_zero_with_exact_cache(shape):
    """Block 0 skipped under the exact policy: its cache layer stays empty and positions still advance."""
    rm = tiny_routed(shape)
    ids, _ = random_batch(batch=1, length=6, context=6)
    pattern = [False, True, True, True]
    with torch.no_grad(), routing(rm.model, "skip", forced=pattern):
        cache = RoutedCache()
        out = rm.model(input_ids=ids[:, :5], past_key_values=cache, use_cache=True)
        step = rm.model(input_ids=ids[:, 5:], past_key_values=cache, use_cache=True).logits[:, -1]
    with torch.no_grad(), routing(rm.model, "mix", forced=pattern):
        full = rm.model(input_ids=ids).logits[:, -1]
    assert out.logits.shape[1] == 5
    assert torch.allclose(step, full, atol=1e-5)


def test_only_router_and_lora_receive_gradients():
    rm = tiny_routed()
    ids, mask = random_batch()
    rm.model.train()
    with routing(rm.model, "mix", decision_mask=mask):
        out = rm.model(input_ids=ids, labels=ids)
        probs = torch.stack([r.prob for r in gate_records(rm.model)])
        (out.loss + probs.mean()).backward()
    for name, p in rm.model.named_parameters():
        trainable = "lora_" in name or ".router." in name
        assert p.requires_grad == trainable, name
        if trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
        else:
            assert p.grad is None, name


def test_straight_through_gradient_reaches_router_weights():
    """The LM loss alone moves the router through the straight-through gate (no regulariser needed)."""
    rm = tiny_routed()
    ids, mask = random_batch()
    with routing(rm.model, "mix", decision_mask=mask):
        rm.model(input_ids=ids, labels=ids).loss.backward()
    grads = [r.net.weight.grad for r in rm.routers()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_per_row_forced_patterns_in_one_batch():
    rm = tiny_routed()
    ids, mask = random_batch(batch=2)
    patterns = torch.tensor([[True, False, True, True], [True, True, False, True]])
    with torch.no_grad(), routing(rm.model, "mix", decision_mask=mask, forced=patterns):
        both = rm.model(input_ids=ids).logits
    for row in range(2):
        with torch.no_grad(), routing(rm.model, "mix", decision_mask=mask[row : row + 1], forced=patterns[row]):
            alone = rm.model(input_ids=ids[row : row + 1]).logits
        assert torch.allclose(both[row], alone[0], atol=1e-5)


def test_decision_mask_shape_is_checked():
    rm = tiny_routed()
    ids, _ = random_batch(length=12)
    with pytest.raises(ValueError, match="decision_mask"), routing(rm.model, "mix", decision_mask=torch.ones(2, 5)):
        rm.model(input_ids=ids)


def test_decoder_layers_error_names_the_class():
    from layerroute.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="Linear"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_last_turn_mask_keeps_the_last_message_and_the_assistant_header():
    from layerroute.nn.router import last_turn_mask

    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0, 0],    # system, user, assistant header; then targets
                         [0, 1, 1, 1, 1, 1, 0, 0, 0],    # left padding: a marker under padding does not count
                         [1, 1, 1, 1, 0, 0, 0, 0, 0]])   # one marker: nothing to cut
    marks = torch.zeros(3, 9, dtype=torch.bool)
    marks[0, [0, 3, 5, 7]] = True  # the marker at 7 is a target token: outside the mask, ignored
    marks[1, [0, 2, 4]] = True
    marks[2, 1] = True
    kept = last_turn_mask(mask.float(), marks)
    assert kept.tolist() == [[0, 0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0, 0]]


def _turn_ids(rm):
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # routers start at weight 0 (logit = bias): give them something to read
        for r in rm.routers():
            r.net.weight.copy_(torch.randn(r.net.weight.shape, generator=gen))
            r.net.bias.fill_(0.0)
    ids, mask = random_batch(batch=2, length=12, context=9)
    ids[ids == TurnTokenizer.TURN] = 8
    ids[0, [0, 3, 6]] = TurnTokenizer.TURN  # row 0: three turns in the context, the last one from position 3
    ids[1, [2, 7]] = TurnTokenizer.TURN
    return ids, mask


def test_last_turn_pooling_is_mean_pooling_over_the_last_turn():
    from layerroute.config import RouterConfig
    from layerroute.nn.router import last_turn_mask

    rm = tiny_routed(router=RouterConfig(pooling="last_turn"), tokenizer=TurnTokenizer())
    ids, mask = _turn_ids(rm)

    def logits(decision_mask):
        with torch.no_grad(), routing(rm.model, "mix", decision_mask=decision_mask):
            rm.model(input_ids=ids)
        return torch.stack([r.logit for r in gate_records(rm.model)])

    last_turn = logits(mask)
    layers = find_routed_layers(rm.model)
    for layer in layers:
        layer.pooling = "mean"
    try:
        same = logits(last_turn_mask(mask, ids == TurnTokenizer.TURN))
        whole = logits(mask)
    finally:
        for layer in layers:
            layer.pooling = "last_turn"
    assert torch.allclose(last_turn, same, atol=1e-6)
    assert not torch.allclose(last_turn, whole, atol=1e-4)  # the cut changes what the routers read


def test_last_turn_generation_decides_as_teacher_forcing_does():
    from layerroute.config import RouterConfig
    from layerroute.infer.generate import routed_generate

    rm = lively(tiny_routed(router=RouterConfig(pooling="last_turn"), tokenizer=TurnTokenizer()))
    ids, mask = _turn_ids(rm)
    prompts = [ids[0, :9].tolist(), ids[1, :9].tolist()]
    with torch.no_grad(), routing(rm.model, "mix", decision_mask=mask[:, :9]):
        rm.model(input_ids=ids[:, :9])
    teacher = torch.stack([r.gate for r in gate_records(rm.model)], dim=1).bool().tolist()
    out = routed_generate(rm, prompts, max_new_tokens=3, eos_token_id=None)
    assert out.gates == teacher
    assert any(not g for row in teacher for g in row) and any(any(row) for row in teacher)  # some run, some skip


def test_last_turn_pooling_needs_the_turn_token_in_the_tokenizer():
    from layerroute.config import RouterConfig
    from layerroute.config.experimental import RouterExperimental
    from layerroute.errors import ConfigError

    router = RouterConfig(pooling="last_turn", experimental=RouterExperimental(turn_token="<|turn|>"))
    with pytest.raises(ConfigError, match=r"router\.experimental\.turn_token"):
        tiny_routed(router=router, tokenizer=TurnTokenizer())
    with pytest.raises(ConfigError, match="router.pooling"):
        RouterConfig(pooling="first_turn")
