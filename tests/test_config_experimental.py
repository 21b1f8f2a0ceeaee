"""The rejected recipes' options live in train.experimental / router.experimental (issue 37), and every file written
before the move still loads: the committed configs and overlays, an old adapter's layerroute.json and stored
training config, `--set` with an old name, a checkpoint's stored config. No model is loaded: milliseconds."""

from __future__ import annotations

from pathlib import Path

import pytest

from layerroute.adapters import read_adapter_meta, training_config
from layerroute.config import RouterConfig, RunConfig, TrainConfig, from_dict, load_yaml, resolve_raw
from layerroute.config.run import current_key
from layerroute.errors import ConfigError
from layerroute.train.checkpoint import _current_layout

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = ROOT / "configs" / "offline-smollm2.yaml"
OLD_ADAPTER = ROOT / "benchmarks" / "results" / "adapters" / "smollm2_lora_only_s0"  # written before the move


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_committed_config_loads(path):
    if path.name.endswith(".overlay.yaml"):  # an eval overlay: over a run config, its eval: section only
        cfg = RunConfig.from_dict(resolve_raw(OFFLINE, [], [path], eval_only=True))
    else:
        cfg = RunConfig.from_yaml(path)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_experiment_overlay_loads_and_names_the_experimental_keys_by_their_place_now(path):
    cfg = RunConfig.from_yaml(OFFLINE, [], [path])
    raw = load_yaml(path)
    for section, cls in (("train", TrainConfig), ("router", RouterConfig)):
        old = set(raw.get(section) or {}) & set(cls.RENAMED_KEYS)
        assert not old, f"{path.name} uses the old names {sorted(old)}: write them under {section}.experimental"
        for key, value in ((raw.get(section) or {}).get("experimental") or {}).items():
            assert getattr(getattr(cfg, section).experimental, key) == value


def test_an_old_key_maps_to_its_new_place():
    old = RunConfig.from_dict({"train": {"distill_weight": 0.5, "block_drop_on": "tool_call", "lr": 1e-3},
                               "router": {"kind": "mlp", "bottleneck": 16}})
    new = RunConfig.from_dict({"train": {"experimental": {"distill_weight": 0.5, "block_drop_on": "tool_call"},
                                         "lr": 1e-3},
                               "router": {"kind": "mlp", "experimental": {"bottleneck": 16}}})
    assert old == new and old.train.experimental.distill_weight == 0.5 and old.router.experimental.bottleneck == 16
    assert "distill_weight" not in old.to_dict()["train"]  # written under the new name
    with pytest.raises(ConfigError, match=r"train.distill_weight is the old name of train.experimental.distill_weight"):
        from_dict(TrainConfig, {"distill_weight": 0.5, "experimental": {"distill_weight": 1.0}}, "train")
    with pytest.raises(ConfigError, match="unknown key train.experimental.distil_weight"):
        from_dict(TrainConfig, {"experimental": {"distil_weight": 0.5}}, "train")


def test_set_and_overlays_read_old_names_and_the_later_layer_wins(tmp_path):
    assert current_key("train.init_lora=runs/x") == "train.experimental.init_lora=runs/x"
    assert current_key("train.lr=1e-3") == "train.lr=1e-3" and current_key("eval.prompt_full_depth=true") == \
        "eval.prompt_full_depth=true"
    new_style = tmp_path / "new.yaml"
    new_style.write_text("train:\n  experimental:\n    distill_weight: 1.0\n    block_drop_rate: 0.2\n")
    old_style = tmp_path / "old.yaml"
    old_style.write_text("train:\n  distill_weight: 0.3\n")
    cfg = RunConfig.from_yaml(OFFLINE, ["train.block_drop_rate=0.4"], [new_style, old_style])
    exp = cfg.train.experimental
    assert (exp.distill_weight, exp.block_drop_rate) == (0.3, 0.4)  # the group merges key by key; later layers win
    cfg = RunConfig.from_yaml(OFFLINE, ["train.experimental.distill_weight=0.7"], [old_style])
    assert cfg.train.experimental.distill_weight == 0.7


def test_an_adapter_written_before_the_move_still_loads_its_settings():
    meta = read_adapter_meta(OLD_ADAPTER)
    assert "bottleneck" in meta["router"] and "distill_weight" in meta["training"]["config"]["train"]  # old layout
    router = from_dict(RouterConfig, meta["router"], "router")  # what load_adapter does
    assert router.experimental.turn_token == meta["router"]["turn_token"]
    cfg = RunConfig.from_dict(resolve_raw(training_config(OLD_ADAPTER)))  # what eval, oracle and curve read
    assert cfg.train.experimental.distill_weight == meta["training"]["config"]["train"]["distill_weight"]


def test_a_checkpoint_written_before_the_move_resumes_under_the_same_config():
    """read_state compares the stored config with this run's: the old layout is read in the new one first."""
    current = RunConfig.from_yaml(ROOT / "configs" / "smoke.yaml").to_dict()
    old = {**current, "train": {k: v for k, v in current["train"].items() if k != "experimental"},
           "router": {k: v for k, v in current["router"].items() if k != "experimental"}}
    old["train"].update(current["train"]["experimental"])
    old["router"].update(current["router"]["experimental"])
    assert _current_layout(old) == current
