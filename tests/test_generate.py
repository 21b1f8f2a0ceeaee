"""Routed generation invariants: open gates = plain model, a forced pattern = the model with those blocks
deleted, cache policies agree on one step, a mixed batch = its rows one by one, skipped blocks are never called."""

from __future__ import annotations

import pytest
import torch

from layerroute.infer.generate import (
    inference_weights,
    pad_left,
    plain_blocks,
    routed_generate,
    run_generate,
    skip_pattern,
)
from layerroute.nn.routed import find_routed_layers
from tests.helpers import TINY_SHAPES, delete_blocks, lively, tiny_routed

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [100, 200, 300], [42, 43, 44, 45, 46]]
NEW = 10


@pytest.fixture(scope="module", params=TINY_SHAPES)
def rm(request):
    return lively(tiny_routed(request.param))


def _plain_greedy(model, prompts, new=NEW):
    ids, mask = pad_left(prompts, 0)
    out, _ = run_generate(model, ids, mask, max_new_tokens=new, eos_token_id=None, pad_token_id=0)
    return out[:, ids.shape[1] :].tolist()


def test_open_gates_equal_plain_model_greedy(rm):
    routed = routed_generate(rm, PROMPTS, max_new_tokens=NEW, eos_token_id=None)  # routers at init: all open
    assert all(all(row) for row in routed.gates)
    forced_open = routed_generate(rm, PROMPTS, max_new_tokens=NEW, eos_token_id=None, forced="open")
    with torch.no_grad(), inference_weights(rm) as model, plain_blocks(model):
        plain = _plain_greedy(model, PROMPTS)
    assert routed.tokens == plain
    assert forced_open.tokens == plain
    assert len(set(map(tuple, plain))) == len(PROMPTS) and len(set(plain[0])) > 3, "outputs too uniform to test"


@pytest.mark.parametrize("policy", ["exact", "kv_preserving"])
@pytest.mark.parametrize("pattern", [[True, False, True, True], [False, True, True, False], [True, True, False, False]])
def test_forced_pattern_equals_model_with_blocks_deleted(rm, pattern, policy):
    routed = routed_generate(rm, PROMPTS, max_new_tokens=NEW, eos_token_id=None, forced=pattern, kv_policy=policy)
    with torch.no_grad(), inference_weights(rm) as model, plain_blocks(model):
        reference = delete_blocks(model, pattern)
        expected = _plain_greedy(reference, PROMPTS)
    assert routed.tokens == expected
    assert routed.gates == [pattern] * len(PROMPTS)


def test_policies_agree_on_a_single_step(rm):
    pattern = [True, False, True, False]
    exact = routed_generate(rm, PROMPTS, max_new_tokens=NEW, eos_token_id=None, forced=pattern)
    kvp = routed_generate(rm, PROMPTS, max_new_tokens=NEW, eos_token_id=None, forced=pattern,
                          kv_policy="kv_preserving")
    assert exact.tokens == kvp.tokens


def _input_dependent_routers(rm, seed=3):
    """Routers with random weights and zero bias: decisions depend on the prompt (and differ across rows)."""
    gen = torch.Generator().manual_seed(seed)
    saved = [(r.net.weight.clone(), r.net.bias.clone()) for r in rm.routers()]
    with torch.no_grad():
        for r in rm.routers():
            r.net.weight.copy_(torch.randn(r.net.weight.shape, generator=gen))
            r.net.bias.zero_()
    return saved


def _restore_routers(rm, saved):
    with torch.no_grad():
        for r, (w, b) in zip(rm.routers(), saved, strict=True):
            r.net.weight.copy_(w)
            r.net.bias.copy_(b)


@pytest.mark.parametrize("policy", ["exact", "kv_preserving"])
def test_mixed_batch_equals_rows_one_by_one(rm, policy):
    patterns = [[True, False, True, True], [True, True, True, True], [False, True, False, True]]
    batch = routed_generate(rm, PROMPTS, max_new_tokens=NEW, eos_token_id=None, forced=patterns, kv_policy=policy)
    assert batch.gates == patterns
    for row, prompt in enumerate(PROMPTS):
        alone = routed_generate(rm, [prompt], max_new_tokens=NEW, eos_token_id=None, forced=patterns[row],
                                kv_policy=policy)
        assert batch.tokens[row] == alone.tokens[0], f"row {row}"


def test_router_decided_mixed_batch_equals_rows_one_by_one(rm):
    saved = _input_dependent_routers(rm)
    try:
        batch = routed_generate(rm, PROMPTS, max_new_tokens=NEW, eos_token_id=None)
        assert len({tuple(g) for g in batch.gates}) > 1, "routers should disagree across rows for this test"
        for row, prompt in enumerate(PROMPTS):
            alone = routed_generate(rm, [prompt], max_new_tokens=NEW, eos_token_id=None)
            assert alone.gates[0] == batch.gates[row], "decisions must not depend on the other rows or padding"
            assert batch.tokens[row] == alone.tokens[0]
    finally:
        _restore_routers(rm, saved)


def _count_rows(rm):
    """Per block: number of forward calls and total batch rows processed (forward pre-hooks on the blocks)."""
    calls, rows, handles = [0] * rm.num_layers, [0] * rm.num_layers, []
    for layer in find_routed_layers(rm.model):
        def hook(module, args, kwargs, i=layer.index):
            hidden = args[0] if args else kwargs["hidden_states"]
            calls[i] += 1
            rows[i] += hidden.shape[0]
        handles.append(layer.block.register_forward_pre_hook(hook, with_kwargs=True))
    return calls, rows, handles


@pytest.mark.parametrize("policy", ["exact", "kv_preserving"])
def test_skipped_block_never_called(rm, policy):
    calls, rows, handles = _count_rows(rm)
    try:
        routed_generate(rm, PROMPTS, max_new_tokens=NEW, eos_token_id=None, forced=[True, False, True, False],
                        kv_policy=policy)
        assert calls == [NEW, 0, NEW, 0]  # one prefill + NEW - 1 decode forwards
        for i in range(rm.num_layers):
            calls[i] = rows[i] = 0
        # mixed batch: each block processes only the rows that run it, in prefill and decode
        patterns = [[True, False, True, True], [True, True, False, True], [True, False, False, True]]
        routed_generate(rm, PROMPTS, max_new_tokens=NEW, eos_token_id=None, forced=patterns, kv_policy=policy)
        assert rows == [3 * NEW, 1 * NEW, 1 * NEW, 3 * NEW]
    finally:
        for h in handles:
            h.remove()


def test_sampling_with_a_seed_is_reproducible(rm):
    kwargs = dict(max_new_tokens=NEW, eos_token_id=None, do_sample=True, temperature=1.0, top_p=0.95,
                  forced=[True, False, True, True])
    a = routed_generate(rm, PROMPTS, seed=7, **kwargs)
    b = routed_generate(rm, PROMPTS, seed=7, **kwargs)
    c = routed_generate(rm, PROMPTS, seed=8, **kwargs)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


def test_eos_stops_and_is_kept(rm):
    free = routed_generate(rm, PROMPTS[:1], max_new_tokens=NEW, eos_token_id=None)
    eos = free.tokens[0][3]
    res = routed_generate(rm, PROMPTS[:1], max_new_tokens=NEW, eos_token_id=eos)
    assert res.tokens[0] == free.tokens[0][: free.tokens[0].index(eos) + 1]


def test_inference_weights_restore_the_lora_model(rm):
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        before = rm.model(input_ids=ids).logits
        with inference_weights(rm) as model:
            merged = model(input_ids=ids).logits
            assert not any("lora_" in n for n, _ in model.named_parameters())
        after = rm.model(input_ids=ids).logits
    assert torch.allclose(before, merged, atol=1e-4)
    assert torch.equal(before, after)  # the frozen weights come back bit for bit, not W + BA - BA
    assert any("lora_" in n for n, _ in rm.model.named_parameters())


@pytest.mark.parametrize("layers,fraction,n_skip", [(24, 0.25, 6), (24, 0.5, 12), (30, 0.25, 8), (30, 0.5, 15),
                                                     (4, 0.25, 1)])
def test_skip_pattern_spreads_over_the_middle(layers, fraction, n_skip):
    pattern = skip_pattern(layers, fraction)
    assert len(pattern) == layers and pattern.count(False) == n_skip
    assert pattern[0] and pattern[1] and pattern[-1]


def _mix_greedy(rm, prompt, pattern, new=NEW):
    """Greedy decoding by re-running the whole sequence in mix mode with prompt_full_depth: the prompt's positions
    at full depth, the generated ones through the pattern (the teacher-forced definition)."""
    from layerroute.nn.routed import routing

    seq = list(prompt)
    with torch.no_grad(), inference_weights(rm) as model:
        for _ in range(new):
            ids = torch.tensor([seq])
            mask = torch.tensor([[1.0] * len(prompt) + [0.0] * (len(seq) - len(prompt))])
            with routing(rm.model, "mix", decision_mask=mask, forced=pattern, prompt_full_depth=True):
                logits = model(input_ids=ids).logits
            seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("policy", ["exact", "kv_preserving"])
def test_prompt_full_depth_generation_equals_its_teacher_forced_definition(rm, policy):
    pattern = [True, False, True, False]
    for prompt in PROMPTS:
        out = routed_generate(rm, [prompt], max_new_tokens=NEW, eos_token_id=None, forced=pattern,
                              kv_policy=policy, prompt_full_depth=True)
        assert out.tokens[0] == _mix_greedy(rm, prompt, pattern)
    # the first token comes from the prompt's last position, which ran at full depth: the plain model's token
    full = routed_generate(rm, PROMPTS, max_new_tokens=1, eos_token_id=None, forced="open")
    first = routed_generate(rm, PROMPTS, max_new_tokens=1, eos_token_id=None, forced=pattern, prompt_full_depth=True)
    assert first.tokens == full.tokens
    skipped_everywhere = routed_generate(rm, PROMPTS, max_new_tokens=NEW, eos_token_id=None, forced=pattern)
    with_full_prompt = routed_generate(rm, PROMPTS, max_new_tokens=NEW, eos_token_id=None, forced=pattern,
                                       prompt_full_depth=True)
    assert skipped_everywhere.tokens != with_full_prompt.tokens  # the option changes what the model computes


# -- prompt lookup (issue 23 item 7) ------------------------------------------------------------------------------
def _copying_prompt(rm, forced, seed):
    """A prompt whose end repeats its start after the model's own continuation: lookup drafts get accepted."""
    torch.manual_seed(seed)
    start = torch.randint(100, 900, (12,)).tolist()
    cont = routed_generate(rm, [start], max_new_tokens=16, eos_token_id=None, forced=forced).tokens[0]
    return start + cont + start


@pytest.mark.parametrize("forced", [None, [True, False, True, True], "open"])
def test_prompt_lookup_drafts_are_verified_so_greedy_output_and_gates_do_not_change(forced):
    rm = lively(tiny_routed("shape:tiny-qwen2"), std=0.02)
    prompt = _copying_prompt(rm, forced, seed=1)
    plain = routed_generate(rm, [prompt], max_new_tokens=16, eos_token_id=None, forced=forced)
    drafted = routed_generate(rm, [prompt], max_new_tokens=16, eos_token_id=None, forced=forced, prompt_lookup=4)
    assert drafted.tokens == plain.tokens and drafted.gates == plain.gates
    assert plain.forwards == plain.steps == 16  # one token per forward without drafts
    assert drafted.forwards < drafted.steps  # some drafts were accepted: several tokens per verification forward
    assert drafted.tokens_per_forward > 1


def test_prompt_lookup_refuses_a_batch_and_prompt_full_depth():
    rm = tiny_routed("shape:tiny-qwen2")
    with pytest.raises(ValueError, match="one row"):
        routed_generate(rm, [[5, 6, 7], [8, 9, 10]], max_new_tokens=2, eos_token_id=None, prompt_lookup=3)
    with pytest.raises(ValueError, match="prompt_full_depth"):
        routed_generate(rm, [[5, 6, 7]], max_new_tokens=2, eos_token_id=None, prompt_lookup=3,
                        prompt_full_depth=True)
