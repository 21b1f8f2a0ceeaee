"""`layerroute config`: a config validated and printed resolved, without loading a model; --describe."""

import dataclasses
from pathlib import Path

import yaml

from layerroute.cli import main
from layerroute.config import RunConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")


def test_prints_the_resolved_config_which_reads_back_the_same(capsys, monkeypatch):
    import layerroute.model

    monkeypatch.setattr(layerroute.model, "load_base", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    overlay = str(ROOT / "experiments" / "mlp_router.yaml")
    assert main(["config", "--config", SMOKE, "--overlay", overlay, "--set", "train.lr=2e-4"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("valid (no model loaded)")
    printed = yaml.safe_load(out)
    assert list(printed) == ["model", "router", "lora", "data", "train", "eval"]
    assert set(printed["train"]) == {f.name for f in dataclasses.fields(TrainConfig)}  # every setting, defaults filled in
    assert RunConfig.from_dict(printed) == RunConfig.from_yaml(SMOKE, ["train.lr=2e-4"], [overlay])
    assert printed["router"]["kind"] == "mlp" and printed["train"]["lr"] == 2e-4


def test_a_bad_config_exits_2_naming_the_key(capsys):
    assert main(["config", "--config", SMOKE, "--set", "train.schedule=linear"]) == 2
    err = capsys.readouterr().err
    assert "train.schedule must be one of ['cosine', 'constant'], got 'linear'" in err
    assert main(["config"]) == 2 and "--config" in capsys.readouterr().err


def test_describe_lists_every_setting_with_default_and_help(capsys):
    assert main(["config", "--describe"]) == 0
    lines = capsys.readouterr().out.splitlines()
    settings = [line for line in lines if line and not line.startswith("#")]
    assert "train.lr: 0.0002  # peak learning rate of the LoRA adapters" in settings
    assert any(line.startswith("data.max_length: 1024  # Longest step") for line in settings)
    # the method's settings first; the rejected recipes' options last, apart, under their own heading
    heading = next(i for i, line in enumerate(lines) if line.startswith("# experimental"))
    assert "rejected by the ablation" in lines[heading]
    apart = [line for line in lines[heading + 1:] if line]
    assert apart and all(".experimental." in line for line in apart)
    assert not any(".experimental." in line for line in lines[:heading])
    assert any(line.startswith("train.experimental.block_drop_rate: 0.0  # experiments/block_drop.yaml") for line in apart)
    assert any(line.startswith("router.experimental.bottleneck: 64") for line in apart)
    defaults = RunConfig()
    count = 0
    for s in ("model", "router", "lora", "data", "train", "eval"):
        for f in dataclasses.fields(getattr(defaults, s)):
            group = getattr(getattr(defaults, s), f.name)
            count += len(dataclasses.fields(group)) if f.metadata.get("group") else 1
    assert len(settings) == count
