"""Training runs end to end on the smoke config: only routers + LoRA move, resume is bit-identical (also with skip
bridges), a changed config or a poisoned loss stops the run, a LoRA warm start, DDP under `accelerate launch`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import layerroute.train.objective as objective_mod
from layerroute.adapters import load_adapter
from layerroute.config import ModelConfig
from layerroute.errors import ConfigError, TrainingError
from layerroute.nn.routed import find_routed_layers, routing
from layerroute.train import Trainer, list_checkpoints
from tests.helpers import ROOT, SMOKE, random_batch, smoke_cfg, trainable_state

# `name as name` imports: the smoke-config fixtures shared by the test_train*.py files (pytest registers an imported
# fixture as this module's own; `as` marks a re-export, so a `smoke_data` parameter does not read as shadowing).
from tests.helpers import in_repo_root as in_repo_root  # autouse: the smoke config's paths are repo-relative
from tests.helpers import one_thread as one_thread  # autouse, module: torch on one thread
from tests.helpers import smoke_data as smoke_data  # module: the smoke config's steps, loaded once


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


def test_init_lora_starts_from_a_saved_adapters_lora_and_refuses_a_mismatch(tmp_path, smoke_data):
    """train.experimental.init_lora: routed training warm-started from another run's LoRA (e.g. one trained at full depth)."""
    overrides = ("train.steps=1", "train.grad_accum=1", "train.checkpoint_every=0", "train.warmup_steps=0")
    first = Trainer(smoke_cfg(*overrides), tmp_path / "first", data=smoke_data)
    first.run()
    source = tmp_path / "first" / "adapter"
    lora = {n: p.detach().clone() for n, p in first.rm.model.named_parameters() if "lora_" in n}
    assert any(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)  # trained: B is no longer zero
    warm = Trainer(smoke_cfg(*overrides, f"train.experimental.init_lora={source}", "train.seed=1"), tmp_path / "warm",
                   data=smoke_data)
    warm.setup()
    got = {n: p.detach() for n, p in warm.rm.model.named_parameters() if "lora_" in n}
    assert got.keys() == lora.keys() and all(torch.equal(got[n], lora[n]) for n in lora)
    warm.fit()  # and it trains on from there
    with pytest.raises(ConfigError, match="train.experimental.init_lora: .* has lora.r=4, this run lora.r=8"):
        Trainer(smoke_cfg(*overrides, f"train.experimental.init_lora={source}", "lora.r=8"), tmp_path / "r8",
                data=smoke_data).setup()
    with pytest.raises(ConfigError, match="train.experimental.init_lora: .* is not a directory"):
        Trainer(smoke_cfg(*overrides, f"train.experimental.init_lora={tmp_path / 'nowhere'}"), tmp_path / "none",
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
