"""What is settled before the first training step: a bad config is rejected naming its key (file, --set, the CLI's
exit code) before the model loads, every shipped config is valid, the lr schedule, gradient clipping."""

from __future__ import annotations

import math

import pytest
import torch

import layerroute.train as train_mod
from layerroute.config import RunConfig
from layerroute.errors import ConfigError
from tests.helpers import ROOT, SMOKE, smoke_cfg

# `name as name` imports: the smoke-config fixtures shared by the test_train*.py files (pytest registers an imported
# fixture as this module's own; `as` marks a re-export, so a `smoke_data` parameter does not read as shadowing).
from tests.helpers import in_repo_root as in_repo_root  # autouse: the smoke config's paths are repo-relative
from tests.helpers import one_thread as one_thread  # autouse, module: torch on one thread
from tests.helpers import smoke_data as smoke_data  # module: the smoke config's steps, loaded once


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


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    """A config with a typo'd key or an out-of-range value fails here, not minutes into a run."""
    if path.name.endswith(".example.yaml"):  # a data-section example (layerroute data --config): its data is valid
        from layerroute.config import load_yaml
        from layerroute.data.config import DataConfig

        assert DataConfig.from_dict(load_yaml(path)["data"]).sources
        return
    if path.name.endswith(".overlay.yaml"):  # an eval: overlay (layerroute eval --overlay): valid over a run config
        from layerroute.config import apply_eval_overlay, load_yaml

        raw = apply_eval_overlay(load_yaml(ROOT / "configs" / "offline-smollm2.yaml"), load_yaml(path), str(path))
        RunConfig.from_dict(raw)
        return
    cfg = RunConfig.from_yaml(path, [])
    assert cfg.train.steps > 0 and cfg.data.sources


def test_lr_schedule_warmup_then_cosine():
    cfg = smoke_cfg("train.steps=10", "train.warmup_steps=2", "train.min_lr_ratio=0.1").train
    factors = [train_mod.lr_factor(s, cfg) for s in range(10)]
    assert factors[0] == pytest.approx(1 / 3) and factors[1] == pytest.approx(2 / 3)
    assert factors[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[2:], factors[3:], strict=False))
    assert factors[-1] > 0.1


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


@pytest.mark.parametrize("native, used", [(True, "bfloat16"), (False, "float32")])
def test_training_records_the_dtype_auto_resolved_to(tmp_path, monkeypatch, smoke_data, native, used):
    """model.dtype auto is resolved once at setup; the run's config.json (and so its checkpoints and its adapter's
    training config) records float32 or bfloat16, never auto."""
    import json

    import layerroute.model as model_mod
    from layerroute.train import Trainer

    monkeypatch.setattr(model_mod, "native_bf16", lambda device: native)
    trainer = Trainer(smoke_cfg("model.dtype=auto", "train.steps=2"), tmp_path / "run", data=smoke_data)
    trainer.setup()
    assert trainer.cfg.model.dtype == trainer.rm.dtype == used
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["dtype"] == used
