"""Router kinds are classes (`layerroute.nn.router.RouterSpec`) that know their parameter and FLOP counts, and
every FLOP count (evaluation, bench, engine) asks the model's spec: an mlp router is counted as one (issue 37)."""

from __future__ import annotations

import pytest
import torch

from layerroute import flops
from layerroute.config import RouterConfig, RouterExperimental, choices
from layerroute.config.sections import RouterKind
from layerroute.eval.baselines import flop_summary, model_flop_summary
from layerroute.nn.router import ROUTER_KINDS, LinearRouterSpec, MlpRouterSpec, Router, router_spec
from tests.helpers import synthetic_step, tiny_routed


def test_the_kinds_are_the_settings_choices():
    assert set(ROUTER_KINDS) == set(choices(RouterKind))


@pytest.mark.parametrize("kind", sorted(ROUTER_KINDS))
def test_each_kind_counts_its_own_parameters(kind):
    spec = router_spec(RouterConfig(kind=kind, experimental=RouterExperimental(bottleneck=16)))
    router = Router(64, spec)
    assert router.kind == kind and router.spec == spec
    assert sum(p.numel() for p in router.parameters()) == spec.num_parameters(64)
    # built by name, as tests and old code do: the same module
    named = Router(64, kind=kind, bottleneck=16)
    assert {k: v.shape for k, v in named.state_dict().items()} == {k: v.shape for k, v in router.state_dict().items()}
    assert float(router.output_bias.detach()) == 2.0 and router(torch.randn(3, 64)).shape == (3,)


def test_each_kind_counts_its_own_flops():
    shape = tiny_routed().config  # hidden 64
    linear, mlp = LinearRouterSpec(), MlpRouterSpec(bottleneck=16)
    pooling = 64 * 10 + 64
    assert linear.flops(shape, 10) == pooling + 2 * 64
    assert mlp.flops(shape, 10) == pooling + 2 * 64 * 16 + 2 * 16
    assert mlp.flops(shape, 10) == flops.router_flops(shape, 10, router_hidden=mlp.flop_width)


def test_the_routed_model_knows_its_spec():
    assert tiny_routed().router_spec == LinearRouterSpec()
    rm = tiny_routed(router=RouterConfig(kind="mlp", experimental=RouterExperimental(bottleneck=8)))
    assert rm.router_spec == MlpRouterSpec(bottleneck=8)
    n_router = sum(p.numel() for n, p in rm.model.named_parameters() if ".router." in n)
    assert n_router == rm.num_layers * rm.router_spec.num_parameters(rm.config.hidden_size)


def test_evaluation_counts_an_mlp_router_as_one():
    """eval/adapter.py's FLOP summary used to count a linear router whatever router.kind said."""
    from layerroute.config import EvalConfig

    steps = [synthetic_step(i, 30, 5, "tool_call") for i in range(3)]
    gates = [[True, False, True, True]] * 3
    cfg = EvalConfig()
    rm = tiny_routed(router=RouterConfig(kind="mlp", experimental=RouterExperimental(bottleneck=32)))
    got = model_flop_summary(rm, steps, cfg)(gates, [0, 1, 2])
    as_linear = flop_summary(rm.config, steps, gates, [0, 1, 2], cfg.kv_policy)
    as_mlp = flop_summary(rm.config, steps, gates, [0, 1, 2], cfg.kv_policy, router_hidden=32)
    assert got == as_mlp
    assert got["total_flops_skipped"] < as_linear["total_flops_skipped"]  # the mlp router costs more
    assert got["block_flops_skipped"] == as_linear["block_flops_skipped"]
    linear_rm = tiny_routed()
    assert model_flop_summary(linear_rm, steps, cfg)(gates, [0, 1, 2]) == as_linear
