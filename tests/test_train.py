"""Training: the smoke config trains, only routers + LoRA move, resume is bit-identical, guards stop bad runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import layerroute.train as train_mod
import layerroute.train.objective as objective_mod
from layerroute.adapters import load_adapter
from layerroute.config import ModelConfig, RunConfig
from layerroute.errors import ConfigError, TrainingError
from layerroute.routed import find_routed_layers, routing
from layerroute.train import Trainer, list_checkpoints, sliced_lm_loss
from tests.helpers import random_batch, tiny_routed

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


def smoke_cfg(*overrides: str) -> RunConfig:
    return RunConfig.from_yaml(SMOKE, list(overrides))


@pytest.fixture(scope="module")
def smoke_data():
    """The smoke config's step data, loaded once (the tests that load it themselves exercise that path)."""
    from transformers import AutoTokenizer

    from layerroute.data.build import load_steps

    cfg = smoke_cfg()
    return load_steps(cfg.data, AutoTokenizer.from_pretrained(str(ROOT / cfg.model.tokenizer)))


def trainable_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.rm.model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread, and two threads on a shared 2-core machine thrash (10x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the smoke config's tokenizer path is relative to the repository root


# ------------------------------------------------------------------------------------------------------------


def test_smoke_config_trains_and_only_routers_and_lora_move(tmp_path):
    trainer = Trainer(smoke_cfg(), tmp_path / "run")  # loads the data through the config (fixture tokenizer)
    trainer.setup()
    before = {n: p.detach().clone() for n, p in trainer.rm.model.named_parameters()}
    result = trainer.run()

    after = dict(trainer.rm.model.named_parameters())
    trainable = {n for n, p in after.items() if p.requires_grad}
    assert any(".router." in n for n in trainable) and any("lora_A" in n for n in trainable)
    for name, value in before.items():
        moved = not torch.equal(value, after[name].detach())
        if name in trainable:
            assert moved, f"trainable parameter {name} did not change"
        else:
            assert not moved, f"frozen parameter {name} changed"

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    for key in ("loss", "lm_loss", "reg", "run_rate/tool_call", "run_rate/planning", "tokens_per_s",
                "layer_run_rate/tool_call", "layer_run_rate/planning"):
        assert key in train_records[-1], key
    assert len(train_records[-1]["layer_run_rate/tool_call"]) == trainer.rm.num_layers
    assert any("val/lm_loss" in r for r in records)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-000002", "step-000004"]

    meta = json.loads((result.adapter_dir / "layerroute.json").read_text())
    assert meta["training"]["steps"] == 4 and "final_val" in meta["training"]
    loaded = load_adapter(result.adapter_dir, ModelConfig(name="shape:tiny-qwen2"))
    saved = dict(loaded.model.named_parameters())
    for name in trainable:
        assert torch.equal(saved[name].detach(), after[name].detach()), name


class Interrupted(Exception):
    pass


def _die_after_checkpoint(monkeypatch, at_step: int):
    """Make Trainer.save_checkpoint raise Interrupted right after writing step `at_step` (the machine went away);
    returns the original method, to put back before resuming."""
    original = Trainer.save_checkpoint

    def save_then_die(self, step):
        path = original(self, step)
        if step == at_step:
            raise Interrupted
        return path

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_die)
    return original


def test_resume_gives_identical_parameters(tmp_path, smoke_data, monkeypatch):
    overrides = ("train.steps=6", "train.checkpoint_every=3", "train.eval_every=0")
    straight = Trainer(smoke_cfg(*overrides), tmp_path / "straight", data=smoke_data)
    straight.run()
    expected = trainable_state(straight)

    original = _die_after_checkpoint(monkeypatch, 3)
    with pytest.raises(Interrupted):
        Trainer(smoke_cfg(*overrides), tmp_path / "split", data=smoke_data).run()
    monkeypatch.setattr(Trainer, "save_checkpoint", original)
    with pytest.raises(ConfigError, match="--resume"):  # a run folder with checkpoints needs --resume
        Trainer(smoke_cfg(*overrides), tmp_path / "split", data=smoke_data).setup()
    resumed = Trainer(smoke_cfg(*overrides), tmp_path / "split", data=smoke_data, resume=True)
    resumed.run()
    assert resumed.start_step == 3
    got = trainable_state(resumed)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), f"{name} differs after resume"
    steps = [json.loads(x)["step"] for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 6]  # training records, then the final val record; no duplicates


def test_resume_refuses_a_changed_config(tmp_path, smoke_data):
    Trainer(smoke_cfg("train.steps=2", "train.checkpoint_every=1"), tmp_path, data=smoke_data).run()
    with pytest.raises(TrainingError, match="train.lr"):
        Trainer(smoke_cfg("train.steps=2", "train.lr=0.5"), tmp_path, data=smoke_data, resume=True).setup()


def test_poisoned_loss_stops_naming_step_and_checkpoint(tmp_path, smoke_data, monkeypatch):
    calls = {"n": 0}
    real = objective_mod.sliced_lm_loss  # looked up by RoutedStepLoss.forward in its own module

    def poisoned(*args, **kwargs):
        row_sum, *rest = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= 3:  # grad_accum 2: the first micro-batch of optimizer step 2
            row_sum = row_sum * float("nan")
        return (row_sum, *rest)

    monkeypatch.setattr(objective_mod, "sliced_lm_loss", poisoned)
    trainer = Trainer(smoke_cfg("train.checkpoint_every=1", "train.eval_every=0"), tmp_path, data=smoke_data)
    trainer.setup()
    with pytest.raises(TrainingError) as err:
        trainer.fit()
    message = str(err.value)
    assert "non-finite loss at step 2" in message
    assert str(tmp_path / "checkpoints" / "step-000001") in message
    # the poisoned step did not reach the parameters
    saved = load_file(str(tmp_path / "checkpoints" / "step-000001" / "trainable.safetensors"))
    now = trainable_state(trainer)
    assert all(torch.equal(now[n], saved[n]) for n in saved)


@pytest.mark.parametrize(
    "text, key",
    [
        ("train:\n  lrr: 0.1\n", "train.lrr"),
        ("train:\n  steps: ten\n", "train.steps"),
        ("train:\n  lr: 0\n", "train.lr"),
        ("train:\n  regularizer: l1\n", "train.regularizer"),
        ("train:\n  router_loss: mse\n", "train.router_loss"),
        ("model:\n  nme: x\n", "model.nme"),
        ("data:\n  max_lenght: 10\n", "max_lenght"),
        ("trian:\n  steps: 1\n", "trian"),
    ],
)
def test_bad_config_is_rejected_naming_the_key_before_model_load(tmp_path, monkeypatch, capsys, text, key):
    import layerroute.model

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the config was validated")

    monkeypatch.setattr(layerroute.model, "load_base", no_load)
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=key):
        RunConfig.from_yaml(path)
    assert train_mod.main(["--config", str(path), "--output-dir", str(tmp_path / "out")]) == 2
    assert key in capsys.readouterr().err
    # and through --set
    with pytest.raises(ConfigError, match="train.reg_weight"):
        RunConfig.from_yaml(SMOKE, ["train.reg_weight=-1"])


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


def test_lr_schedule_warmup_then_cosine():
    cfg = smoke_cfg("train.steps=10", "train.warmup_steps=2", "train.min_lr_ratio=0.1").train
    factors = [train_mod.lr_factor(s, cfg) for s in range(10)]
    assert factors[0] == pytest.approx(1 / 3) and factors[1] == pytest.approx(2 / 3)
    assert factors[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[2:], factors[3:], strict=False))
    assert factors[-1] > 0.1


@pytest.mark.slow
def test_smoke_config_under_accelerate_launch_two_processes_gloo(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        # `--cpu --num_processes 2` starts ONE process in accelerate 1.15 (its CPU multi-process path needs
        # mpirun); `--multi_gpu` starts two through torch.distributed.run, and the trainer's Accelerator(cpu=True)
        # turns them into MULTI_CPU over gloo. The assertion on "processes" below catches a silent single run.
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "layerroute.train",
        "--config", str(SMOKE), "--output-dir", str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    meta = json.loads((out / "adapter" / "layerroute.json").read_text())
    assert meta["training"]["processes"] == 2
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # one writer: rank 0
    rm = load_adapter(out / "adapter", ModelConfig(name="shape:tiny-qwen2", tokenizer=str(ROOT / "tests/fixtures/tokenizers/smollm2")))
    ids, mask = random_batch()
    with torch.no_grad(), routing(rm.model, "mix", decision_mask=mask):
        logits = rm.model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    assert any(bool((p != 0).any()) for n, p in rm.model.named_parameters() if "lora_B" in n)


# ------------------------------------------------------------------------------------------------------------
# Options that train the shallow path (issue 8): block dropping and self-distillation


def test_block_drop_mask_rises_with_depth_and_spares_planning():
    from layerroute.config import TrainConfig
    from layerroute.train import RoutedStepLoss

    module = RoutedStepLoss(torch.nn.Linear(1, 1), TrainConfig(block_drop_rate=0.8))
    module.train()
    torch.manual_seed(0)
    keep = module.drop_mask(4000, 5, None, "cpu")
    dropped = 1 - keep.float().mean(dim=0)  # per block
    assert dropped[0] == 0  # the first block is never dropped
    assert torch.allclose(dropped, torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8]), atol=0.03)
    tool_only = RoutedStepLoss(torch.nn.Linear(1, 1), TrainConfig(block_drop_rate=0.8, block_drop_on="tool_call"))
    tool_only.train()
    is_tool = torch.tensor([True, False] * 500)
    keep = tool_only.drop_mask(1000, 5, is_tool, "cpu")
    assert keep[~is_tool].all() and not keep[is_tool].all()
    module.eval()
    assert module.drop_mask(10, 5, None, "cpu") is None  # never at evaluation


def test_block_dropping_closes_gates_in_training(tmp_path, smoke_data):
    cfg = smoke_cfg("train.steps=2", "train.grad_accum=1", "train.checkpoint_every=0", "train.eval_every=0",
                    "train.block_drop_rate=1.0", "train.warmup_steps=0")
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
    dropping = Trainer(smoke_cfg(*base, "train.block_drop_rate=1.0", "train.distill_weight=1.0"), tmp_path / "a",
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
                    "train.distill_weight=1.0", "train.block_drop_rate=0.9", "train.warmup_steps=0")
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


def test_oracle_router_targets_run_and_supervise_the_routers(tmp_path, smoke_data):
    from layerroute.config import TrainConfig
    from layerroute.train import RoutedStepLoss
    from tests.helpers import random_batch, tiny_routed

    rm = tiny_routed()
    module = RoutedStepLoss(rm.model, TrainConfig(router_loss="oracle", oracle_epsilon=0.0))
    module.train()
    ids, mask = random_batch(batch=3, length=12, context=8)
    labels = ids.clone()
    labels[:, :8] = -100
    *_, extras = module(ids, torch.ones_like(ids), labels, mask)
    target = extras["oracle_target"]
    assert target.shape == (rm.num_layers, 3) and set(target.unique().tolist()) <= {0.0, 1.0}
    # a huge epsilon makes every block a skip target
    module.cfg = TrainConfig(router_loss="oracle", oracle_epsilon=1e9)
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
    with pytest.raises(ConfigError, match="train.oracle_greedy_candidates"):
        smoke_cfg("train.oracle_greedy_candidates=-1")
    with pytest.raises(ConfigError, match="train.oracle_source"):
        smoke_cfg("train.oracle_source=greedy")


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


def _static_oracle_trainer(tmp_path, smoke_data, source: str) -> Trainer:
    """A set-up one-step trainer whose routers learn static targets (half the blocks skipped on tool calls)."""
    cfg = smoke_cfg("train.steps=1", "train.grad_accum=1", "train.checkpoint_every=0", "train.eval_every=0",
                    "train.warmup_steps=0", "train.router_loss=influence", "train.regularizer=none",
                    f"train.oracle_source={source}", "train.oracle_calibration_steps=4", "train.oracle_skip_tool=0.5")
    trainer = Trainer(cfg, tmp_path, data=smoke_data)
    trainer.setup()
    return trainer


def test_drop_nll_oracle_skips_the_blocks_whose_removal_costs_least(tmp_path, smoke_data):
    from layerroute.config import EvalConfig
    from layerroute.eval_teacher_forced import teacher_forced
    from layerroute.influence import drop_costs, static_skip_targets

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
    from layerroute.influence import greedy_skip_set

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
    from layerroute.config import EvalConfig
    from layerroute.influence import skip_set_cost

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
    from layerroute.router import hard_gate
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


@pytest.mark.parametrize("per_group", [False, True])
def test_clip_gradients_jointly_or_per_group(per_group):
    from accelerate import Accelerator

    from layerroute.train import clip_gradients

    big, small = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(3))
    big.grad = torch.tensor([60.0, 80.0, 0.0, 0.0])  # norm 100 (the routers once gates close)
    small.grad = torch.tensor([0.6, 0.8, 0.0])  # norm 1 (LoRA)
    norm = clip_gradients(Accelerator(cpu=True), [[small], [big]], 1.0, per_group=per_group)
    assert norm == pytest.approx(math.sqrt(100**2 + 1), rel=1e-5)  # the global norm before clipping, either way
    assert big.grad.norm().item() == pytest.approx(1.0, rel=1e-4)
    # jointly, LoRA's gradient shrinks with the routers' (x 1/100); per group it is left as it was
    assert small.grad.norm().item() == pytest.approx(1.0 if per_group else 1 / math.sqrt(100**2 + 1), rel=1e-3)


def test_init_bias_spread_orders_router_biases_by_block_influence(tmp_path, smoke_data):
    from layerroute.evaluate import EvalConfig, block_influence

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


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    """A config with a typo'd key or an out-of-range value fails here, not minutes into a run."""
    if path.name.endswith(".example.yaml"):
        pytest.skip("a data-section example, not a run config")
    if path.name.endswith(".overlay.yaml"):  # an eval: overlay (layerroute eval --overlay): valid over a run config
        from layerroute.config import apply_eval_overlay, load_yaml

        raw = apply_eval_overlay(load_yaml(ROOT / "configs" / "offline-smollm2.yaml"), load_yaml(path), str(path))
        RunConfig.from_dict(raw)
        return
    cfg = RunConfig.from_yaml(path, [])
    assert cfg.train.steps > 0 and cfg.data.sources


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
        module = RoutedStepLoss(rm.model, TrainConfig(prompt_full_depth=full))
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
    module = RoutedStepLoss(rm.model, TrainConfig(prompt_full_depth=True)).eval()
    with torch.no_grad():
        first, *_ = module(ids, torch.ones_like(ids), one_token, mask)
    assert torch.allclose(first, plain, atol=1e-5) and not torch.allclose(plain, skipped, atol=1e-3)
    assert not torch.allclose(losses[False], losses[True])


def _logits_open(rm, ids):
    from layerroute.routed import routing

    with routing(rm.model, "mix", forced="open"):
        return rm.model(input_ids=ids).logits


def _logits_closed(rm, ids):
    from layerroute.routed import routing

    with routing(rm.model, "mix", forced="closed"):
        return rm.model(input_ids=ids).logits


def test_exact_match_all_pairs_every_side_with_the_first(tmp_path, smoke_data, capsys):
    """benchmarks/exact_match_all.py: teacher-forced exact match of adapters on the eval split's tool-call steps."""
    import importlib.util

    from layerroute.config import EvalConfig
    from layerroute.eval_teacher_forced import teacher_forced

    spec = importlib.util.spec_from_file_location("exact_match_all", ROOT / "benchmarks" / "exact_match_all.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    trainer = Trainer(smoke_cfg("train.steps=1", "train.grad_accum=1", "train.checkpoint_every=0",
                                "train.warmup_steps=0"), tmp_path / "run", data=smoke_data)
    trainer.run()
    adapter = tmp_path / "run" / "adapter"
    out = tmp_path / "em.json"
    assert bench.main(["--config", str(SMOKE), "--side", f"{adapter}:lora_full_depth", "--side", f"{adapter}:routed",
                       "--side", f"{adapter}:lora_full_depth", "--max-steps", "4", "--output", str(out)]) == 0
    doc = json.loads(out.read_text())
    first, routed, again = doc["sides"]
    assert doc["steps"] == 4 and doc["step_ids"] == [s["conversation_id"] for s in first["samples"]]
    # the same side twice pairs to a zero difference; each verdict is "no greedy token error on this step"
    assert again["paired_vs_first"]["diff_points"] == 0 and again["errors"] == first["errors"]
    steps = [s for s in smoke_data.eval if s.step_type == "tool_call"][:4]
    trainer.rm.model.eval()
    expect = teacher_forced(trainer.rm, steps, "routed", EvalConfig(), pad_id=trainer.pad_id)
    assert routed["errors"] == [r["errors"] for r in expect]
    assert [s["correct"] for s in routed["samples"]] == [r["errors"] == 0 for r in expect]
    assert routed["paired_vs_first"]["n"] == 4
    with pytest.raises(SystemExit, match="ADAPTER_DIR:CONFIG"):
        bench.main(["--side", f"{adapter}:shortgpt"])
    # skip=BLOCKS: LoRA on, those blocks removed from every step (forced gates)
    assert bench.main(["--config", str(SMOKE), "--side", f"{adapter}:skip=0,2", "--max-steps", "4",
                       "--output", str(out)]) == 0
    forced = json.loads(out.read_text())["sides"][0]
    pattern = torch.tensor([[j not in (0, 2) for j in range(trainer.rm.num_layers)]] * 4)
    expect = teacher_forced(trainer.rm, steps, "shortgpt", EvalConfig(), patterns=pattern, pad_id=trainer.pad_id)
    assert forced["errors"] == [r["errors"] for r in expect] and forced["block_skip"] == 0.5
    with pytest.raises(SystemExit, match="skip= takes"):
        bench.main(["--side", f"{adapter}:skip=a,b"])
    # +bridge: skip bridges fitted in closed form on tool-call training steps first; --reference pairs with the
    # first side of an earlier result instead of scoring it again
    first_out = tmp_path / "em_first.json"
    assert bench.main(["--config", str(SMOKE), "--side", f"{adapter}:lora_full_depth", "--max-steps", "4",
                       "--output", str(first_out)]) == 0
    assert bench.main(["--config", str(SMOKE), "--side", f"{adapter}:skip=0,2+bridge", "--bridge-rank", "2",
                       "--bridge-steps", "3", "--max-steps", "4", "--reference", str(first_out),
                       "--output", str(out)]) == 0
    ref, bridged = json.loads(out.read_text())["sides"]
    assert ref["from"] == str(first_out) and ref["errors"] == first["errors"]
    assert bridged["bridge_rank"] == 2 and bridged["bridge_steps"] == 3 and len(bridged["bridge_explained"]) == 4
    assert bridged["paired_vs_first"]["n"] == 4 and bridged["block_skip"] == 0.5
    with pytest.raises(SystemExit, match="optionally"):
        bench.main(["--side", f"{adapter}:lora_full_depth+bridge"])
    with pytest.raises(SystemExit, match="other steps"):
        bench.main(["--config", str(SMOKE), "--side", f"{adapter}:routed", "--max-steps", "3",
                    "--reference", str(first_out)])
    # RESULT.json:N pairs with its N-th side (here the bridged one); an index it lacks fails before any scoring
    again = tmp_path / "em_again.json"
    assert bench.main(["--config", str(SMOKE), "--side", f"{adapter}:lora_full_depth", "--max-steps", "4",
                       "--reference", f"{out}:1", "--output", str(again)]) == 0
    ref_again, full = json.loads(again.read_text())["sides"]
    assert ref_again["config"] == "skip=0,2+bridge" and ref_again["errors"] == bridged["errors"]
    assert full["paired_vs_first"]["n"] == 4 and "paired_vs_first" not in ref_again
    with pytest.raises(SystemExit, match="with a side 5"):
        bench.main(["--side", "no/such/adapter:routed", "--reference", f"{out}:5"])


def test_init_lora_starts_from_a_saved_adapters_lora_and_refuses_a_mismatch(tmp_path, smoke_data):
    """train.init_lora: routed training warm-started from another run's LoRA (e.g. one trained at full depth)."""
    overrides = ("train.steps=1", "train.grad_accum=1", "train.checkpoint_every=0", "train.warmup_steps=0")
    first = Trainer(smoke_cfg(*overrides), tmp_path / "first", data=smoke_data)
    first.run()
    source = tmp_path / "first" / "adapter"
    lora = {n: p.detach().clone() for n, p in first.rm.model.named_parameters() if "lora_" in n}
    assert any(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)  # trained: B is no longer zero
    warm = Trainer(smoke_cfg(*overrides, f"train.init_lora={source}", "train.seed=1"), tmp_path / "warm",
                   data=smoke_data)
    warm.setup()
    got = {n: p.detach() for n, p in warm.rm.model.named_parameters() if "lora_" in n}
    assert got.keys() == lora.keys() and all(torch.equal(got[n], lora[n]) for n in lora)
    warm.fit()  # and it trains on from there
    with pytest.raises(ConfigError, match="train.init_lora: .* has lora.r=4, this run lora.r=8"):
        Trainer(smoke_cfg(*overrides, f"train.init_lora={source}", "lora.r=8"), tmp_path / "r8",
                data=smoke_data).setup()
    with pytest.raises(ConfigError, match="train.init_lora: .* is not a directory"):
        Trainer(smoke_cfg(*overrides, f"train.init_lora={tmp_path / 'nowhere'}"), tmp_path / "none",
                data=smoke_data).setup()


def _close_blocks_1_and_3(trainer: Trainer) -> None:
    with torch.no_grad():
        for i in (1, 3):
            trainer.rm.routers()[i].output_bias.fill_(-6.0)


def test_skip_bridges_are_fitted_before_training_train_where_skipped_and_resume(tmp_path, smoke_data, monkeypatch):
    overrides = ("router.bridge_rank=4", "train.steps=4", "train.checkpoint_every=2", "train.eval_every=0",
                 "train.router_loss=influence", "train.regularizer=none", "train.oracle_source=fixed",
                 "train.oracle_skip_blocks=[1,3]", "train.bridge_calibration_steps=4")
    straight = Trainer(smoke_cfg(*overrides), tmp_path / "straight", data=smoke_data)
    straight.setup()
    bridges = {layer.index: layer.bridge for layer in find_routed_layers(straight.rm.model)}
    fitted = {i: b.up.weight.detach().clone() for i, b in bridges.items()}
    assert all(float(w.abs().sum()) > 0 for w in fitted.values()), "closed-form fit before training"
    assert len(straight.bridge_explained) == straight.rm.num_layers
    _close_blocks_1_and_3(straight)  # the routers would need more than 4 steps to learn their targets
    result = straight.run()
    # blocks 1 and 3 are skipped on tool-call rows: their bridges learn; blocks 0 and 2 always run
    for i, b in bridges.items():
        assert torch.equal(b.up.weight.detach(), fitted[i]) == (i in (0, 2)), f"block {i}"
    meta = json.loads((result.adapter_dir / "layerroute.json").read_text())
    assert meta["router"]["bridge_rank"] == 4 and len(meta["training"]["bridge_explained"]) == 4
    loaded = load_adapter(result.adapter_dir, ModelConfig(name="shape:tiny-qwen2"))
    for layer in find_routed_layers(loaded.model):
        assert torch.equal(layer.bridge.up.weight, bridges[layer.index].up.weight)

    original = _die_after_checkpoint(monkeypatch, 2)
    split = Trainer(smoke_cfg(*overrides), tmp_path / "split", data=smoke_data)
    split.setup()
    _close_blocks_1_and_3(split)
    with pytest.raises(Interrupted):
        split.run()
    monkeypatch.setattr(Trainer, "save_checkpoint", original)
    resumed = Trainer(smoke_cfg(*overrides), tmp_path / "split", data=smoke_data, resume=True)
    resumed.run()  # the checkpoint restores the routers (and the bridges: a resumed setup refits, then overwrites)
    expected, got = trainable_state(straight), trainable_state(resumed)
    assert any(".bridge." in n for n in got)
    for name in expected:
        assert torch.equal(got[name], expected[name]), f"{name} differs after resume"
