"""The one `--set` parser (run config and `layerroute data`), YAML numbers, and overlays (`train --overlay`,
experiments/*.yaml)."""

import os
from pathlib import Path

import pytest
import yaml

from layerroute.config import (
    RUN_SECTIONS,
    RunConfig,
    apply_eval_overlay,
    apply_overlay,
    apply_overrides,
    load_yaml,
)
from layerroute.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
OFFLINE = ROOT / "configs" / "offline-smollm2.yaml"
FIX = os.path.join(os.path.dirname(__file__), "fixtures", "data")
TOK = os.path.join(os.path.dirname(__file__), "fixtures", "tokenizers", "smollm2")


def test_set_addresses_list_items_appends_and_reads_yaml_values():
    raw = {"data": {"sources": [{"name": "bfcl"}]}}
    out = apply_overrides(raw, ["data.sources[0].limit=50", "data.sources.0.role=train",
                                "data.sources[1]={name: gsm_symbolic, limit: 4}", "eval.thresholds=[]",
                                "eval.accuracy_steps_per_type={tool_call: 48, planning: 4}", "train.lr=2e-4",
                                "train.router_lr=1E-3", "model.name=1e5x"])
    assert raw == {"data": {"sources": [{"name": "bfcl"}]}}  # the input is not touched
    assert out["data"]["sources"] == [{"name": "bfcl", "limit": 50, "role": "train"}, {"name": "gsm_symbolic", "limit": 4}]
    assert out["eval"] == {"thresholds": [], "accuracy_steps_per_type": {"tool_call": 48, "planning": 4}}
    assert out["train"] == {"lr": 2e-4, "router_lr": 1e-3}  # YAML 1.2 floats: no dot, unsigned exponent
    assert out["model"]["name"] == "1e5x"


@pytest.mark.parametrize("item, message", [
    ("train.lr", "--set expects key=value, got 'train.lr'"),
    ("data.sources[3].limit=1", r"--set data.sources\[3\].limit: index \[3\] does not exist"),
    ("data.sources[2]=x", r"--set data.sources\[2\]: index \[2\] does not exist"),
    ("train.lr.x=1", "--set train.lr.x: the parent of x is not a section"),
    ("train.lr=[1", "--set train.lr: the value is not valid YAML"),
])
def test_set_errors_name_the_key(item, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides({"data": {"sources": [{"name": "bfcl"}]}, "train": {"lr": 1.0}}, [item])


def test_yaml_files_read_floats_without_a_dot(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 5e-4\n  min_lr_ratio: 1e-1\ndata:\n  eval_fraction: 2.5e-1\n")
    raw = load_yaml(path)
    assert raw["train"] == {"lr": 5e-4, "min_lr_ratio": 0.1} and raw["data"]["eval_fraction"] == 0.25
    path.write_text("train: [1\n")
    with pytest.raises(ConfigError, match="c.yaml: not valid YAML"):
        load_yaml(path)


def test_the_data_cli_reads_set_with_the_run_configs_parser(tmp_path, capsys):
    """`layerroute data --set` has the same rules: list indices, YAML 1.2 floats, errors naming the key."""
    import json

    from layerroute.data import cli

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "unused"}, "data": {
        "progress": False, "bad_row_max_fraction": 1.0,
        "sources": [{"name": "gsm8k_hub", "path": os.path.join(FIX, "gsm8k_main.jsonl")}]}}))
    assert cli.main(["--config", str(path), "--tokenizer", TOK, "--stats", "--json",
                     "--set", "data.sources[0].limit=3", "--set", "data.eval_fraction=5e-1"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["eval_fraction"] == 0.5 and stats["rows"]["gsm8k_hub"]["rows"] == 3
    with pytest.raises(ConfigError, match=r"--set data.sources\[4\].limit: index \[4\] does not exist"):
        cli.main(["--config", str(path), "--tokenizer", TOK, "--stats", "--set", "data.sources[4].limit=1"])
    from layerroute.config import raw_config

    assert cli.raw_config is raw_config  # one reader of --config / --overlay / --set, not a copy


def test_an_overlay_merges_sections_key_by_key_and_names_its_file():
    raw = {"train": {"lr": 1.0, "steps": 5}, "eval": {"accuracy_steps_per_type": {"tool_call": 4, "planning": 2}}}
    out = apply_overlay(raw, {"train": {"lr": 2.0}, "eval": {"accuracy_steps_per_type": {"tool_call": 8}},
                              "router": {"kind": "mlp"}}, "x.yaml", RUN_SECTIONS)
    assert out == {"train": {"lr": 2.0, "steps": 5}, "eval": {"accuracy_steps_per_type": {"tool_call": 8}},
                   "router": {"kind": "mlp"}}  # a setting's value (here a mapping) is replaced whole, as --set does
    assert raw["train"]["lr"] == 1.0
    with pytest.raises(ConfigError, match="x.yaml: unknown section 'trian' in an overlay"):
        apply_overlay(raw, {"trian": {"lr": 2.0}}, "x.yaml", RUN_SECTIONS)
    with pytest.raises(ConfigError, match="x.yaml: train: must be a mapping of keys"):
        apply_overlay(raw, {"train": [1]}, "x.yaml", RUN_SECTIONS)
    with pytest.raises(ConfigError, match="x.yaml: an eval overlay holds an eval: section only, not 'train'"):
        apply_eval_overlay(raw, {"train": {"lr": 2.0}}, "x.yaml")


def test_train_overlay_applies_before_set(tmp_path, monkeypatch):
    import layerroute.train.cli as train_cli

    seen = {}

    def fake_train(cfg, output_dir, resume=False):
        seen["cfg"] = cfg
        raise ConfigError("stop before loading anything")

    monkeypatch.setattr(train_cli, "train", fake_train)
    overlay = tmp_path / "recipe.yaml"
    overlay.write_text("router:\n  kind: mlp\ntrain:\n  lr: 5e-3\n  steps: 3\n")
    assert train_cli.main(["--config", str(SMOKE), "--overlay", str(overlay), "--set", "train.steps=2",
                           "--output-dir", str(tmp_path / "out")]) == 2
    cfg = seen["cfg"]
    assert (cfg.router.kind, cfg.train.lr, cfg.train.steps, cfg.train.batch_size) == ("mlp", 5e-3, 2, 2)
    overlay.write_text("trian:\n  lr: 1.0\n")
    with pytest.raises(ConfigError, match="recipe.yaml: unknown section 'trian'"):
        RunConfig.from_yaml(SMOKE, [], [overlay])


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_experiment_overlay_is_a_valid_recipe(path):
    """Each recipe of experiments/ resolves over the offline config (as benchmarks/ablation_offline.sh runs it)."""
    overrides = ["train.experimental.init_lora=runs/ablation/lora_only-s0/train/adapter"] if path.stem.startswith("warm_") else []
    cfg = RunConfig.from_yaml(OFFLINE, overrides, [path])
    base = RunConfig.from_yaml(OFFLINE)
    changed = {f"{s}.{k}" for s, keys in load_yaml(path).items() for k in keys}
    assert changed and set(load_yaml(path)) <= {"router", "train"}
    assert path.stem in (ROOT / "experiments" / "README.md").read_text()
    if path.stem != "bridge_drop_nll_stopgrad":  # the default's own recipe changes nothing
        assert cfg != base
