"""Router targets and setup-time calibration (`layerroute.calibrate.setup`, `layerroute.calibrate.influence`): the oracle and
influence targets, the static oracles (drop_nll, drop_errors, greedy, a fixed block list) and the router bias
spread ordered by block influence."""

from __future__ import annotations

import math

import pytest
import torch

from layerroute.config import TrainExperimental
from layerroute.errors import ConfigError
from layerroute.train import Trainer

# `name as name` imports: the smoke-config fixtures shared by the test_train*.py files (pytest registers an imported
# fixture as this module's own; `as` marks a re-export, so a `smoke_data` parameter does not read as shadowing).
from tests.helpers import in_repo_root as in_repo_root  # autouse: the smoke config's paths are repo-relative
from tests.helpers import one_thread as one_thread  # autouse, module: torch on one thread
from tests.helpers import random_batch, smoke_cfg, tiny_routed
from tests.helpers import smoke_data as smoke_data  # module: the smoke config's steps, loaded once


def test_oracle_router_targets_run_and_supervise_the_routers(tmp_path, smoke_data):
    from layerroute.config import TrainConfig
    from layerroute.train import RoutedStepLoss
    from tests.helpers import random_batch, tiny_routed

    rm = tiny_routed()
    module = RoutedStepLoss(rm.model, TrainConfig(router_loss="oracle", experimental=TrainExperimental(oracle_epsilon=0.0)))
    module.train()
    ids, mask = random_batch(batch=3, length=12, context=8)
    labels = ids.clone()
    labels[:, :8] = -100
    *_, extras = module(ids, torch.ones_like(ids), labels, mask)
    target = extras["oracle_target"]
    assert target.shape == (rm.num_layers, 3) and set(target.unique().tolist()) <= {0.0, 1.0}
    # a huge epsilon makes every block a skip target
    module.cfg = TrainConfig(router_loss="oracle", experimental=TrainExperimental(oracle_epsilon=1e9))
    *_, extras = module(ids, torch.ones_like(ids), labels, mask)
    assert extras["oracle_target"].sum() == 0
    # and the trainer runs with it, the router loss being the BCE against these targets
    cfg = smoke_cfg("train.steps=1", "train.grad_accum=1", "train.checkpoint_every=0", "train.eval_every=0",
                    "train.warmup_steps=0", "train.router_loss=oracle")
    trainer = Trainer(cfg, tmp_path, data=smoke_data)
    trainer.setup()
    metrics = trainer.fit()
    assert metrics["bce"] > 0 and math.isfinite(metrics["loss"])


def test_influence_router_targets_skip_a_fraction_per_step_type(tmp_path, smoke_data):
    from layerroute.config import TrainConfig
    from layerroute.train import RoutedStepLoss

    rm = tiny_routed()
    L = rm.num_layers
    module = RoutedStepLoss(rm.model, TrainConfig(router_loss="influence", oracle_skip_tool=0.5,
                                                  oracle_skip_planning=0.0))
    module.train()
    ids, mask = random_batch(batch=3, length=12, context=8)
    labels = ids.clone()
    labels[:, :8] = -100
    is_tool = torch.tensor([True, False, True])
    *_, extras = module(ids, torch.ones_like(ids), labels, mask, is_tool_call=is_tool)
    target = extras["oracle_target"]  # [L, B], 1 = run
    assert (L - target.sum(0)).tolist() == [round(0.5 * L), 0, round(0.5 * L)]
    module.eval()  # validation: no targets (and no probe hooks)
    assert module(ids, torch.ones_like(ids), labels, mask, is_tool_call=is_tool)[-1]["oracle_target"] is None
    cfg = smoke_cfg("train.steps=1", "train.grad_accum=1", "train.checkpoint_every=0", "train.eval_every=0",
                    "train.warmup_steps=0", "train.router_loss=influence", "train.regularizer=none")
    trainer = Trainer(cfg, tmp_path, data=smoke_data)
    trainer.setup()
    metrics = trainer.fit()
    assert metrics["bce"] > 0 and math.isfinite(metrics["loss"])
    with pytest.raises(ConfigError, match="train.oracle_skip_tool"):
        smoke_cfg("train.oracle_skip_tool=1.5")
    with pytest.raises(ConfigError, match="train.experimental.oracle_greedy_candidates"):
        smoke_cfg("train.experimental.oracle_greedy_candidates=-1")
    with pytest.raises(ConfigError, match="train.oracle_source"):
        smoke_cfg("train.oracle_source=greedy")


def _static_oracle_trainer(tmp_path, smoke_data, source: str) -> Trainer:
    """A set-up one-step trainer whose routers learn static targets (half the blocks skipped on tool calls)."""
    cfg = smoke_cfg("train.steps=1", "train.grad_accum=1", "train.checkpoint_every=0", "train.eval_every=0",
                    "train.warmup_steps=0", "train.router_loss=influence", "train.regularizer=none",
                    f"train.oracle_source={source}", "train.oracle_calibration_steps=4", "train.oracle_skip_tool=0.5")
    trainer = Trainer(cfg, tmp_path, data=smoke_data)
    trainer.setup()
    return trainer


def test_drop_nll_oracle_skips_the_blocks_whose_removal_costs_least(tmp_path, smoke_data):
    from layerroute.calibrate.influence import drop_costs, static_skip_targets
    from layerroute.config import EvalConfig
    from layerroute.eval.teacher_forced import teacher_forced

    assert static_skip_targets([0.3, -0.1, 0.2, 0.05], 2).tolist() == [1.0, 0.0, 1.0, 0.0]
    # token errors are counts: equal costs go to the tie-break (the NLL), then to the lower block index
    assert static_skip_targets([0.0, 0.0, 0.1, 0.0], 2, tiebreak=[0.5, 0.2, 0.0, 0.1]).tolist() == [1, 0, 1, 0]
    assert static_skip_targets([0.0, 0.0, 0.0], 1).tolist() == [0.0, 1.0, 1.0]
    trainer = _static_oracle_trainer(tmp_path, smoke_data, "drop_nll")
    L = trainer.rm.num_layers
    targets = trainer.step_module.static_targets  # [2, L]: planning runs everything, tool calls skip half
    assert targets[0].tolist() == [1.0] * L and int(L - targets[1].sum()) == round(0.5 * L)
    costs = trainer.oracle_record["tool_call"]["costs"]
    assert trainer.oracle_record["tool_call"]["skip"] == sorted(sorted(range(L), key=lambda i: costs[i])[: L // 2])
    # a cost is what it says: the NLL per token with that block alone skipped, minus the full-depth NLL
    tool = [s for s in trainer.train_steps if s.step_type == "tool_call"][:4]
    ecfg = EvalConfig(batch_size=4, seed=0)
    trainer.rm.model.eval()

    def nll(res):
        return sum(r["nll"] for r in res) / sum(r["tokens"] for r in res)

    pattern = torch.tensor([[j != 1 for j in range(L)]] * len(tool))
    pad = trainer.pad_id
    expect = nll(teacher_forced(trainer.rm, tool, "shortgpt", ecfg, patterns=pattern, pad_id=pad)) - nll(
        teacher_forced(trainer.rm, tool, "lora_full_depth", ecfg, pad_id=pad))
    assert costs[1] == pytest.approx(expect, abs=1e-5)
    measured = drop_costs(trainer.rm, tool, ecfg, pad)
    assert measured["nll"] == pytest.approx(costs, abs=1e-5)
    # the token-error cost: the rise in the fraction of target tokens that are not the argmax given the gold prefix
    def err(res):
        return sum(r["errors"] for r in res) / sum(r["tokens"] for r in res)

    expect_err = err(teacher_forced(trainer.rm, tool, "shortgpt", ecfg, patterns=pattern, pad_id=pad)) - err(
        teacher_forced(trainer.rm, tool, "lora_full_depth", ecfg, pad_id=pad))
    assert measured["token_errors"][1] == pytest.approx(expect_err, abs=1e-9)
    assert trainer.oracle_record["tool_call"]["token_error_costs"] == pytest.approx(measured["token_errors"], abs=1e-9)
    trainer.rm.model.train()
    metrics = trainer.fit()
    assert metrics["bce"] > 0 and math.isfinite(metrics["loss"])


def test_drop_errors_oracle_ranks_blocks_by_added_greedy_token_errors(tmp_path, smoke_data):
    trainer = _static_oracle_trainer(tmp_path, smoke_data, "drop_errors")
    L = trainer.rm.num_layers
    record = trainer.oracle_record["tool_call"]
    errors, nll = record["token_error_costs"], record["costs"]
    ranked = sorted(range(L), key=lambda i: (errors[i], nll[i], i))
    assert record["skip"] == sorted(ranked[: round(0.5 * L)])
    assert trainer.step_module.static_targets[1].tolist() == [0.0 if i in record["skip"] else 1.0 for i in range(L)]


def test_greedy_skip_set_sees_interactions_that_single_costs_miss():
    from layerroute.calibrate.influence import greedy_skip_set

    # blocks 0 and 1 are each the cheapest alone but redundant copies of each other: removing both is expensive
    single = {0: 1.0, 1: 1.1, 2: 2.0, 3: 3.0}

    def cost(blocks):
        return sum(single[b] for b in blocks) + (10.0 if {0, 1} <= set(blocks) else 0.0)

    assert sorted(single, key=single.get)[:2] == [0, 1]  # what ranking single removals would skip
    assert greedy_skip_set(cost, [0, 1, 2, 3], 2) == [0, 2]
    assert greedy_skip_set(cost, [0, 1, 3], 2) == [0, 3]  # only the candidates are tried
    assert greedy_skip_set(cost, [2, 3], 5) == [2, 3]  # never more blocks than candidates
    assert greedy_skip_set(lambda b: 0.0, [3, 1, 2], 2) == [1, 2]  # ties go to the lower block index


@pytest.mark.parametrize("source", ["greedy_errors", "greedy_nll"])
def test_greedy_oracle_grows_the_set_by_the_cheapest_joint_removal(tmp_path, smoke_data, source):
    from layerroute.calibrate.influence import skip_set_cost
    from layerroute.config import EvalConfig

    trainer = _static_oracle_trainer(tmp_path, smoke_data, source)
    L = trainer.rm.num_layers
    record = trainer.oracle_record["tool_call"]
    path = record["greedy_path"]
    assert len(path) == round(0.5 * L) and sorted(p["block"] for p in path) == record["skip"]
    assert trainer.step_module.static_targets[1].tolist() == [0.0 if i in record["skip"] else 1.0 for i in range(L)]
    # round one is the single-removal ranking; each path entry is the joint cost of the set so far, as measured now
    errors, nll = record["token_error_costs"], record["costs"]
    key = (lambda j: (errors[j], nll[j], j)) if source == "greedy_errors" else (lambda j: (nll[j], j))
    assert path[0]["block"] == min(range(L), key=key)
    tool = [s for s in trainer.train_steps if s.step_type == "tool_call"][:4]
    ecfg = EvalConfig(batch_size=trainer.cfg.train.batch_size, seed=trainer.cfg.train.seed)  # the trainer's batching
    trainer.rm.model.eval()
    full = skip_set_cost(trainer.rm, tool, ecfg, (), trainer.pad_id)
    both = skip_set_cost(trainer.rm, tool, ecfg, [p["block"] for p in path], trainer.pad_id)
    assert path[-1]["nll"] == pytest.approx(both[0] - full[0], abs=1e-5)
    assert path[-1]["token_errors"] == pytest.approx(both[1] - full[1], abs=1e-9)
    # and the second block was the cheapest given the first (every block is a candidate at the default 12 > L)
    first = path[0]["block"]
    joint = {j: skip_set_cost(trainer.rm, tool, ecfg, (first, j), trainer.pad_id) for j in range(L) if j != first}
    jkey = (lambda j: (joint[j][1], joint[j][0], j)) if source == "greedy_errors" else (lambda j: (joint[j][0], j))
    assert path[1]["block"] == min(joint, key=jkey)


def test_fixed_oracle_teaches_the_listed_blocks_and_rejects_bad_lists(tmp_path, smoke_data):
    cfg = smoke_cfg("train.steps=1", "train.grad_accum=1", "train.checkpoint_every=0", "train.warmup_steps=0",
                    "train.router_loss=influence", "train.regularizer=none", "train.oracle_source=fixed",
                    "train.oracle_skip_blocks=[2, 0]")
    trainer = Trainer(cfg, tmp_path, data=smoke_data)
    trainer.setup()
    assert trainer.step_module.static_targets.tolist() == [[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0]]
    assert trainer.oracle_record["tool_call"]["skip"] == [0, 2]
    for bad in ("train.oracle_skip_blocks=[]", "train.oracle_skip_blocks=[-1]", "train.oracle_skip_blocks=[a]"):
        with pytest.raises(ConfigError, match="train.oracle_skip_blocks"):
            smoke_cfg("train.router_loss=influence", "train.oracle_source=fixed", bad)
    with pytest.raises(ConfigError, match="train.oracle_skip_blocks is read only with train.oracle_source=fixed"):
        smoke_cfg("train.oracle_skip_blocks=[1]")
    with pytest.raises(ConfigError, match="block 9 does not exist"):
        Trainer(smoke_cfg("train.router_loss=influence", "train.oracle_source=fixed", "train.oracle_skip_blocks=[9]"),
                tmp_path / "b", data=smoke_data).setup()


def test_init_bias_spread_orders_router_biases_by_block_influence(tmp_path, smoke_data):
    from layerroute.calibrate.influence import block_influence
    from layerroute.config import EvalConfig

    cfg = smoke_cfg("train.steps=1", "train.warmup_steps=0", "router.init_bias=1.0", "router.init_bias_spread=2.0")
    trainer = Trainer(cfg, tmp_path, data=smoke_data)
    trainer.setup()
    biases = [r.output_bias.item() for r in trainer.rm.routers()]
    L = len(biases)
    assert sorted(biases) == pytest.approx([1.0 + 2.0 * i / (L - 1) for i in range(L)])
    trainer.rm.model.eval()
    with torch.no_grad():
        influence = block_influence(trainer.rm, trainer.train_steps[:16], EvalConfig(batch_size=4, seed=0),
                                    trainer.pad_id)
    assert sorted(range(L), key=lambda i: biases[i]) == sorted(range(L), key=lambda i: influence[i])
    with pytest.raises(ConfigError, match="router.init_bias_spread"):
        smoke_cfg("router.init_bias_spread=-1")
