"""The training objective (`layerroute.train.objective`): the sliced LM loss, every regulariser and router loss for
one step, per-type penalty weights, the straight-through gradient, `router_lm_grad`, the prompt at full depth, and
the shallow-path options (block dropping, self-distillation)."""

from __future__ import annotations

import pytest
import torch

from layerroute.config import TrainExperimental
from layerroute.errors import ConfigError
from layerroute.nn.routed import routing
from layerroute.train import Trainer, sliced_lm_loss

# `name as name` imports: the smoke-config fixtures shared by the test_train*.py files (pytest registers an imported
# fixture as this module's own; `as` marks a re-export, so a `smoke_data` parameter does not read as shadowing).
from tests.helpers import in_repo_root as in_repo_root  # autouse: the smoke config's paths are repo-relative
from tests.helpers import one_thread as one_thread  # autouse, module: torch on one thread
from tests.helpers import random_batch, smoke_cfg, tiny_routed, trainable_state
from tests.helpers import smoke_data as smoke_data  # module: the smoke config's steps, loaded once


@pytest.mark.parametrize("shape", ["shape:tiny-qwen2", "shape:tiny-llama"])
def test_sliced_lm_loss_equals_full_labels_loss(shape):
    rm = tiny_routed(shape)
    ids, mask = random_batch(batch=3, length=16, context=9, seed=3)
    attention = torch.ones_like(ids)
    attention[1, 13:] = 0  # a padded row
    labels = ids.clone()
    labels[:, :9] = -100  # context
    labels[attention == 0] = -100
    labels[2, 9:11] = -100  # a row with fewer targets
    with routing(rm.model, "mix", decision_mask=mask):
        full = rm.model(input_ids=ids, attention_mask=attention, labels=labels).loss
    full.backward()
    full_grads = {n: p.grad.clone() for n, p in rm.model.named_parameters() if p.requires_grad}
    rm.model.zero_grad(set_to_none=True)
    with routing(rm.model, "mix", decision_mask=mask):
        row_sum, row_count = sliced_lm_loss(rm.model, ids, attention, labels)
    assert row_count.tolist() == [7, 4, 5]
    sliced = row_sum.sum() / row_count.sum()
    assert sliced.item() == pytest.approx(full.item(), abs=1e-5)
    sliced.backward()
    for name, grad in full_grads.items():
        torch.testing.assert_close(dict(rm.model.named_parameters())[name].grad, grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(
    "regularizer, router_loss, expected_reg",
    [
        ("soft_mean", "none", torch.sigmoid(torch.tensor(2.0)).item()),  # every gate starts at prob 0.881
        ("hard_ste", "none", 1.0),  # ...and open
        ("budget", "none", (1.0 - 0.8) ** 2),  # run-rate 1 vs target 0.8
        ("none", "none", 0.0),
        ("soft_mean", "bce", torch.sigmoid(torch.tensor(2.0)).item()),
    ],
)
def test_every_regularizer_and_bce_run_one_step(tmp_path, smoke_data, regularizer, router_loss, expected_reg):
    cfg = smoke_cfg(
        "train.steps=1", "train.warmup_steps=0", "train.grad_accum=1", "train.checkpoint_every=0",
        "train.eval_every=0", f"train.regularizer={regularizer}", f"train.router_loss={router_loss}",
    )
    trainer = Trainer(cfg, tmp_path, data=smoke_data)
    trainer.setup()
    routers_before = {n: p.clone() for n, p in trainable_state(trainer).items() if ".router." in n}
    metrics = trainer.fit()
    assert metrics["reg"] == pytest.approx(expected_reg, abs=1e-5)
    if router_loss == "bce":
        # tool calls are pushed to skip (-log(1 - 0.881) = 2.13), planning to run (-log 0.881 = 0.13)
        assert 0.12 < metrics["bce"] < 2.2
    else:
        assert metrics["bce"] == 0.0
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    after = trainable_state(trainer)
    assert any(not torch.equal(after[n], v) for n, v in routers_before.items())


def test_per_type_penalty_weights_only_the_rows_of_each_type():
    from layerroute.config import TrainConfig
    from layerroute.train import loss_parts

    gate = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], requires_grad=True)  # [L=2, B=3]
    prob = gate.detach().clone().requires_grad_(True)
    is_tool = torch.tensor([True, False, True])
    cfg = TrainConfig(regularizer="hard_ste", reg_weight=0.5, reg_weight_planning=0.0)
    parts = loss_parts(cfg, torch.zeros(3), prob, gate, is_tool, tokens_total=10, rows_total=3, micro_total=1)
    # run-rates per row: 1.0, 0.5, 0.0; reported reg is the plain mean, the loss weighs tool rows only
    assert parts.reg.item() == pytest.approx(0.5)
    assert parts.total.item() == pytest.approx(0.5 * (1.0 + 0.0) / 3)
    parts.total.backward()
    assert torch.all(gate.grad[:, 1] == 0) and torch.all(gate.grad[:, [0, 2]] > 0)
    same = loss_parts(TrainConfig(regularizer="hard_ste", reg_weight=0.5, reg_weight_planning=0.5),
                      torch.zeros(3), prob, gate, is_tool, tokens_total=10, rows_total=3, micro_total=1)
    plain = loss_parts(TrainConfig(regularizer="hard_ste", reg_weight=0.5),
                       torch.zeros(3), prob, gate, is_tool, tokens_total=10, rows_total=3, micro_total=1)
    assert same.total.item() == pytest.approx(plain.total.item())
    with pytest.raises(ConfigError, match="reg_weight_planning"):
        TrainConfig(regularizer="budget", reg_weight_planning=0.0)
    # negative: planning rows are rewarded for running blocks (their gates pushed open)
    neg = loss_parts(TrainConfig(regularizer="hard_ste", reg_weight=0.5, reg_weight_planning=-1.0),
                     torch.zeros(3), prob, gate, is_tool, tokens_total=10, rows_total=3, micro_total=1)
    assert neg.total.item() == pytest.approx((0.5 * 1.0 - 1.0 * 0.5 + 0.5 * 0.0) / 3)


def test_hard_ste_has_the_same_gradient_as_soft_mean():
    """Under the straight-through estimator d(gate)/d(prob) = 1, so penalising the hard decision pushes the routers
    exactly like the paper's soft penalty: only the reported value differs (measured: bit-identical adapters)."""
    from layerroute.config import TrainConfig
    from layerroute.nn.router import hard_gate
    from layerroute.train import loss_parts

    grads = {}
    for kind in ("soft_mean", "hard_ste"):
        logits = torch.tensor([[2.0, -0.3, 0.1], [0.7, 1.5, -2.0]], requires_grad=True)
        prob = torch.sigmoid(logits)
        parts = loss_parts(TrainConfig(regularizer=kind, reg_weight=0.7), torch.zeros(3), prob, hard_gate(prob),
                           torch.tensor([True, False, True]), tokens_total=5, rows_total=3, micro_total=1)
        parts.total.backward()
        grads[kind] = (logits.grad.clone(), parts.reg.item())
    assert torch.equal(grads["soft_mean"][0], grads["hard_ste"][0])
    assert grads["soft_mean"][1] != grads["hard_ste"][1]  # the value: mean prob vs the run-rate itself


@pytest.mark.parametrize("lm_grad", [True, False])
def test_router_lm_grad_false_stops_the_lm_loss_at_the_gates(lm_grad):
    from layerroute.config import TrainConfig
    from layerroute.train import RoutedStepLoss

    rm = tiny_routed()
    module = RoutedStepLoss(rm.model, TrainConfig(router_lm_grad=lm_grad))
    module.train()
    ids, mask = random_batch(batch=2, length=12, context=8)
    labels = ids.clone()
    labels[:, :8] = -100
    row_sum, _, prob, gate, _ = module(ids, torch.ones_like(ids), labels, mask)
    router_params = [p for r in rm.routers() for p in r.parameters()]
    grads = torch.autograd.grad(row_sum.sum(), router_params, allow_unused=True, retain_graph=True)
    reached = any(g is not None and bool(g.abs().sum() > 0) for g in grads)
    assert reached == lm_grad
    # the probabilities keep their gradient either way: a loss on them (soft_mean, bce, influence) trains the routers
    assert all(g is not None for g in torch.autograd.grad(prob.sum(), router_params, allow_unused=True))
    for bad in ("train.regularizer=hard_ste", "train.router_loss=oracle"):
        with pytest.raises(ConfigError, match="train.router_lm_grad"):
            smoke_cfg("train.router_lm_grad=false", bad)


def test_prompt_full_depth_training_keeps_the_context_at_full_depth():
    from layerroute.config import TrainConfig
    from layerroute.train import RoutedStepLoss

    rm = tiny_routed()
    with torch.no_grad():
        for r in rm.routers():
            r.net.bias.fill_(-20.0)  # every gate closed
    ids, mask = random_batch(batch=2, length=12, context=8)
    labels = ids.clone()
    labels[:, :8] = -100
    losses = {}
    for full in (False, True):
        module = RoutedStepLoss(rm.model, TrainConfig(experimental=TrainExperimental(prompt_full_depth=full)))
        module.eval()
        with torch.no_grad():
            row_sum, *_ = module(ids, torch.ones_like(ids), labels, mask)
        losses[full] = row_sum
    # the first target token is predicted from the last context position, which runs every block when the context
    # keeps full depth: its loss equals the plain model's there, and differs from the all-skipped model's
    with torch.no_grad():
        plain = torch.nn.functional.cross_entropy(
            _logits_open(rm, ids)[:, 7], ids[:, 8], reduction="none")
        skipped = torch.nn.functional.cross_entropy(
            _logits_closed(rm, ids)[:, 7], ids[:, 8], reduction="none")
    one_token = labels.clone()
    one_token[:, 9:] = -100
    module = RoutedStepLoss(rm.model, TrainConfig(experimental=TrainExperimental(prompt_full_depth=True))).eval()
    with torch.no_grad():
        first, *_ = module(ids, torch.ones_like(ids), one_token, mask)
    assert torch.allclose(first, plain, atol=1e-5) and not torch.allclose(plain, skipped, atol=1e-3)
    assert not torch.allclose(losses[False], losses[True])


def _logits_open(rm, ids):
    from layerroute.nn.routed import routing

    with routing(rm.model, "mix", forced="open"):
        return rm.model(input_ids=ids).logits


def _logits_closed(rm, ids):
    from layerroute.nn.routed import routing

    with routing(rm.model, "mix", forced="closed"):
        return rm.model(input_ids=ids).logits


# ------------------------------------------------------------------------------------------------------------
# Options that train the shallow path (issue 8): block dropping and self-distillation


def test_block_drop_mask_rises_with_depth_and_spares_planning():
    from layerroute.config import TrainConfig
    from layerroute.train import RoutedStepLoss

    module = RoutedStepLoss(torch.nn.Linear(1, 1), TrainConfig(experimental=TrainExperimental(block_drop_rate=0.8)))
    module.train()
    torch.manual_seed(0)
    keep = module.drop_mask(4000, 5, None, "cpu")
    dropped = 1 - keep.float().mean(dim=0)  # per block
    assert dropped[0] == 0  # the first block is never dropped
    assert torch.allclose(dropped, torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8]), atol=0.03)
    tool_only = RoutedStepLoss(torch.nn.Linear(1, 1), TrainConfig(experimental=TrainExperimental(block_drop_rate=0.8, block_drop_on="tool_call")))
    tool_only.train()
    is_tool = torch.tensor([True, False] * 500)
    keep = tool_only.drop_mask(1000, 5, is_tool, "cpu")
    assert keep[~is_tool].all() and not keep[is_tool].all()
    module.eval()
    assert module.drop_mask(10, 5, None, "cpu") is None  # never at evaluation


def test_block_dropping_closes_gates_in_training(tmp_path, smoke_data):
    cfg = smoke_cfg("train.steps=2", "train.grad_accum=1", "train.checkpoint_every=0", "train.eval_every=0",
                    "train.experimental.block_drop_rate=1.0", "train.warmup_steps=0")
    trainer = Trainer(cfg, tmp_path, data=smoke_data)
    trainer.setup()
    metrics = trainer.fit()
    # routers start open (init bias 2); with rate 1 the last block is always dropped, block 0 never
    rates = metrics["layer_run_rate/tool_call"]
    assert rates[0] == 1.0 and rates[-1] == 0.0
    assert metrics["run_rate/all"] < 1.0


def test_validation_never_drops_blocks(tmp_path, smoke_data):
    """Val measures the routers' own decisions: block dropping (a training-only perturbation) must be off."""
    base = ("train.steps=1", "train.checkpoint_every=0", "train.eval_every=0", "train.warmup_steps=0",
            "train.eval_examples=8")
    dropping = Trainer(smoke_cfg(*base, "train.experimental.block_drop_rate=1.0", "train.experimental.distill_weight=1.0"), tmp_path / "a",
                       data=smoke_data)
    dropping.setup()
    plain = Trainer(smoke_cfg(*base), tmp_path / "b", data=smoke_data)
    plain.setup()
    a, b = dropping.validate(0), plain.validate(0)  # same seed, same initial weights, nothing trained yet
    assert a["val/run_rate/tool_call"] == b["val/run_rate/tool_call"] == 1.0  # routers start open
    assert a["val/lm_loss"] == pytest.approx(b["val/lm_loss"], rel=1e-6)
    assert dropping.step_module.training  # back to training mode afterwards


def test_self_distillation_adds_a_kl_term(tmp_path, smoke_data):
    cfg = smoke_cfg("train.steps=1", "train.grad_accum=1", "train.checkpoint_every=0", "train.eval_every=0",
                    "train.experimental.distill_weight=1.0", "train.experimental.block_drop_rate=0.9", "train.warmup_steps=0")
    trainer = Trainer(cfg, tmp_path, data=smoke_data)
    trainer.setup()
    metrics = trainer.fit()
    # the student skips blocks the full-depth teacher runs: their next-token distributions differ
    assert metrics["distill"] > 0
    assert metrics["loss"] == pytest.approx(metrics["lm_loss"] + 0.1 * metrics["reg"] + metrics["distill"], rel=1e-4)
    no_kd = Trainer(smoke_cfg("train.steps=1", "train.grad_accum=1", "train.checkpoint_every=0",
                              "train.eval_every=0", "train.warmup_steps=0"), tmp_path / "b", data=smoke_data)
    no_kd.setup()
    assert no_kd.fit()["distill"] == 0.0
