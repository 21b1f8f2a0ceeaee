"""Routers trained on the per-step oracle's targets (layerroute.train.per_step): the features are exactly what the
routers decide from at inference under prompt_full_depth, the fit learns a per-step target, the exactness check
agrees with the oracle's, and the threshold rule picks the most skipping point within the budget."""

from __future__ import annotations

import pytest
import torch

from layerroute.cli import fit_routers as cli
from layerroute.config import RouterConfig
from layerroute.errors import ConfigError
from layerroute.infer.batched import Request, generate_batched
from layerroute.infer.generate import inference_weights
from layerroute.nn.routed import find_routed_layers, gate_records
from layerroute.nn.router import LinearRouterSpec, MlpRouterSpec
from layerroute.train import per_step as ps
from tests.helpers import TurnTokenizer, lively, synthetic_step, tiny_routed


def _steps(n: int, ctx: int = 9, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [synthetic_step(i, ctx + i % 3, 2, "tool_call",
                           ids=[int(t) for t in torch.randint(3, 200, (ctx + i % 3 + 2,), generator=gen)])
            for i in range(n)]


@pytest.mark.parametrize("pooling", ["mean", "last", "last_turn"])
def test_router_inputs_are_what_the_routers_decide_from_at_prompt_full_depth(pooling):
    tok = TurnTokenizer() if pooling == "last_turn" else None
    rm = lively(tiny_routed(router=RouterConfig(pooling=pooling), tokenizer=tok), std=0.1)
    with torch.no_grad():  # input-dependent routers, so the comparison shows something
        for r in rm.routers():
            r.net.weight.normal_(0, 0.5)
    steps = _steps(3)
    if pooling == "last_turn":  # two turn markers in each context
        for s in steps:
            s.input_ids[1] = s.input_ids[5] = TurnTokenizer.TURN
    with inference_weights(rm) as model:
        x = ps.router_inputs(rm, model, steps, turn_token_id=TurnTokenizer.TURN, progress=False)
    want = ps.run_probabilities(rm.routers(), x)  # [N, L]
    for i, s in enumerate(steps):
        generate_batched(rm, [Request(list(s.input_ids[:s.context_length]), 1)], prompt_full_depth=True,
                         progress=False)
        got = torch.stack([r.prob[0] for r in gate_records(rm.model)])
        assert torch.allclose(got, want[i], atol=1e-5), (pooling, i)
    assert (want.std(dim=0) > 1e-4).any(), "the probabilities should differ between steps"


@pytest.mark.parametrize("spec", [LinearRouterSpec(), MlpRouterSpec(bottleneck=8)])
def test_fit_learns_a_per_step_target_and_leaves_constant_blocks_to_their_bias(spec):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(48, 2, 8, generator=gen)
    run = torch.ones(48, 2)
    run[:, 0] = (x[:, 0, 0] > 0).float()  # block 0: skipped exactly when feature 0 is negative
    routers = ps.fit_routers(x, run, spec, epochs=120, lr=0.05, weight_decay=0.0, seed=0)
    prob = ps.run_probabilities(routers, x)
    assert ((prob[:, 0] > 0.5).float() == run[:, 0]).float().mean() >= 0.95
    assert torch.all(prob[:, 1] > 0.99)  # always run: the bias alone, no fit
    sets = ps.skip_sets(prob, 0.5)
    assert sum(0 in s for s in sets) == pytest.approx(int((run[:, 0] == 0).sum()), abs=3)
    assert all(1 not in s for s in sets)
    again = ps.run_probabilities(ps.fit_routers(x, run, spec, epochs=120, lr=0.05, weight_decay=0.0, seed=0), x)
    assert torch.equal(prob, again)  # deterministic for a seed


def test_targets_are_the_oracle_sets_and_every_block_elsewhere():
    steps = _steps(3)
    recs = [{"step": "c0#0", "oracle": [1, 3]}, {"step": "c2#0", "oracle": []}, {"step": "c1#0", "skipped": "x"}]
    run = ps.run_targets(steps, ps.oracle_sets(recs), 4)
    assert run.tolist() == [[1, 0, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    assert ps.frequency_order({"a": [2, 1], "b": [2]}, 4) == [2, 1, 0, 3]


def test_exactness_table_agrees_with_the_oracles_check():
    from layerroute.calibrate.oracle import CachedStep

    rm = lively(tiny_routed(), std=0.12)
    with torch.no_grad():
        for layer in find_routed_layers(rm.model):
            if layer.index == 1:  # all but silent: removable
                layer.block.self_attn.o_proj.base_layer.weight.mul_(0.01)
                layer.block.self_attn.o_proj.lora_B.default.weight.mul_(0.01)
                layer.block.mlp.down_proj.weight.mul_(0.01)
    prompt = list(range(5, 15))
    target = generate_batched(rm, [Request(prompt, 6)], prompt_full_depth=True, progress=False)[0].tokens
    step = synthetic_step(0, len(prompt), len(target), "tool_call", ids=prompt + target)
    every = tuple(range(rm.num_layers))
    with inference_weights(rm) as model:
        table = ps.exactness_table(rm, model, [step], [target], [[(), (1,), every, (1,)]], rows=2, progress=False)
        full, all_gone = CachedStep(rm, model, prompt, target).costs([(), every])
    assert table == [[True, True, all_gone.errors <= full.errors, True]]
    assert table[0][2] is False, "removing every block should break the output (else the test shows nothing)"
    point = ps.summarize(rm, [step], [target], [(1,)], [True])
    assert point["exact_rate"] == 1.0 and point["decode_fraction"] == 1 / rm.num_layers
    assert 0 < point["block_fraction_prompt_full_depth"] < point["decode_fraction"]  # the context ran every block


def test_threshold_rule_takes_the_most_skipping_point_within_the_budget():
    def point(t, rate, skipped):
        return {"threshold": t, "tool_call": {"exact_rate": rate, "mean_skipped": skipped}}

    points = [point(0.05, 1.0, 0.5), point(0.1, 0.99, 1.2), point(0.3, 0.9, 3.0)]
    assert ps.choose_threshold(points, 0.02)["threshold"] == 0.1
    assert ps.choose_threshold(points, 0.0)["threshold"] == 0.05
    assert ps.choose_threshold([point(0.1, 0.5, 2.0)], 0.02) is None
    train, val = ps.split_train_val(list(range(10)), 0.3, 0)
    assert len(val) == 3 and sorted(train + val) == list(range(10))


@pytest.mark.parametrize("flag,value", [("--thresholds", "0.1,1.5"), ("--thresholds", "x"),
                                        ("--val-fraction", "1.0"), ("--budget", "-0.1")])
def test_bad_command_line_values_are_rejected_before_any_work(tmp_path, flag, value):
    import argparse

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--adapter", str(tmp_path), "--targets", str(tmp_path), "--output-dir",
                              str(tmp_path / "o"), flag, value])
    with pytest.raises(ConfigError, match=flag.lstrip("-").split("-")[0]):
        cli.run(args)
    assert not (tmp_path / "o").exists()
