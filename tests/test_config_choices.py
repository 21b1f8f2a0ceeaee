"""Choices typed with Literal: one check names the key and the allowed values, from YAML or built in code."""

import re
import typing
from pathlib import Path

import pytest

from layerroute.config import (
    EvalConfig,
    ModelConfig,
    RouterConfig,
    RunConfig,
    TrainConfig,
    choices,
    describe,
    from_dict,
)
from layerroute.config.experimental import TrainExperimental
from layerroute.config.sections import Pooling
from layerroute.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

CASES = [  # (section class, section, key, a bad value, its allowed values)
    (ModelConfig, "model", "dtype", "fp8", ["auto", "float32", "bfloat16", "float16"]),
    (ModelConfig, "model", "attn_implementation", "flash", ["sdpa", "eager"]),
    (RouterConfig, "router", "kind", "conv", ["linear", "mlp"]),
    (RouterConfig, "router", "pooling", "first_turn", ["mean", "last", "last_turn"]),
    (TrainConfig, "train", "schedule", "linear", ["cosine", "constant"]),
    (TrainConfig, "train", "regularizer", "l1", ["soft_mean", "hard_ste", "budget", "none"]),
    (TrainConfig, "train", "router_loss", "mse", ["none", "bce", "oracle", "targets"]),
    (TrainConfig, "train", "oracle_source", "greedy",
     ["influence", "drop_nll", "drop_errors", "greedy_nll", "greedy_errors", "fixed"]),
    (TrainConfig, "train", "precision", "fp16", ["fp32", "bf16"]),
    (TrainExperimental, "train.experimental", "block_drop_on", "planning", ["all", "tool_call"]),
    (EvalConfig, "eval", "kv_policy", "paged", ["exact", "kv_preserving"]),
]


@pytest.mark.parametrize("cls, section, key, bad, allowed", CASES, ids=lambda c: c if isinstance(c, str) else None)
def test_a_bad_choice_names_the_key_and_the_allowed_values(cls, section, key, bad, allowed):
    want = re.escape(f"{section}.{key} must be one of {allowed}, got {bad!r}")
    with pytest.raises(ConfigError, match=want):  # read from YAML
        from_dict(cls, {key: bad}, section)
    with pytest.raises(ConfigError, match=want):  # built in code
        cls(**{key: bad})
    with pytest.raises(ConfigError, match=want):  # through a whole run config and --set
        RunConfig.from_yaml(ROOT / "configs" / "smoke.yaml", [f"{section}.{key}={bad}"])
    assert list(choices(typing.get_type_hints(cls)[key])) == allowed


def test_a_list_of_choices_checks_each_item():
    allowed = ["base", "lora_full_depth", "routed", "routed_no_lora", "shortgpt", "random"]
    for make in (lambda v: EvalConfig(accuracy_configs=v), lambda v: from_dict(EvalConfig, {"accuracy_configs": v}, "eval")):
        with pytest.raises(ConfigError, match=re.escape(f"eval.accuracy_configs must be one of {allowed}, got 'lora'")):
            make(["routed", "lora"])
    with pytest.raises(ConfigError, match="eval.accuracy_configs must be of type list, got str 'routed'"):
        from_dict(EvalConfig, {"accuracy_configs": "routed"}, "eval")
    assert EvalConfig(accuracy_configs=["routed", "random"]).accuracy_configs == ["routed", "random"]


def test_a_choice_is_still_a_typed_value():
    with pytest.raises(ConfigError, match=r"router.pooling must be one of \['mean', 'last', 'last_turn'\], got 3"):
        from_dict(RouterConfig, {"pooling": 3}, "router")
    assert choices(Pooling) == ("mean", "last", "last_turn") and choices(int) is None


def test_describe_lists_the_choices_and_leaves_the_rejected_options_to_their_group():
    rows = {key: (default, help_text) for key, default, help_text in describe(TrainConfig, "train")}
    assert rows["train.schedule"][0] == "cosine" and "[choices: cosine, constant]" in rows["train.schedule"][1]
    assert "train.distill_weight" not in rows and "train.experimental" not in rows  # a group is not a setting
    group = [key for key, _, _ in describe(TrainExperimental, "train.experimental")]
    assert group == ["train.experimental.target_run_rate", "train.experimental.oracle_epsilon",
                     "train.experimental.block_drop_rate", "train.experimental.block_drop_on",
                     "train.experimental.distill_weight", "train.experimental.distill_temperature",
                     "train.experimental.oracle_greedy_candidates", "train.experimental.prompt_full_depth",
                     "train.experimental.init_lora"]
    router = [key for key, _, _ in describe(RouterConfig, "router")]
    assert "router.bottleneck" not in router and "router.turn_token" not in router


def test_a_stored_config_with_every_rejected_option_still_loads():
    """An old adapter's config (every key, the rejected recipes' ones set, directly in their sections as before
    they moved into the experimental groups) validates as before, and is written back under the new names."""
    raw = RunConfig().to_dict()
    for section in ("router", "train"):
        raw[section] = {k: v for k, v in raw[section].items() if k != "experimental"}
    raw["router"].update(kind="mlp", bottleneck=32, pooling="last_turn", turn_token="<|im_start|>")
    raw["train"].update(regularizer="budget", target_run_rate=0.7, block_drop_rate=0.3, block_drop_on="tool_call",
                        distill_weight=1.0, distill_temperature=2.0, router_loss="oracle", oracle_epsilon=0.02,
                        oracle_greedy_candidates=4, prompt_full_depth=True, init_lora="runs/x/adapter")
    raw["data"] = {"sources": [{"name": "bfcl", "limit": 4}]}
    cfg = RunConfig.from_dict(raw)
    assert cfg.router.kind == "mlp" and cfg.router.experimental.bottleneck == 32
    assert cfg.train.experimental.block_drop_on == "tool_call" and cfg.train.experimental.init_lora == "runs/x/adapter"
    assert cfg.train.experimental.target_run_rate == 0.7 and cfg.train.experimental.oracle_greedy_candidates == 4
    written = cfg.to_dict()
    assert "distill_weight" not in written["train"] and written["train"]["experimental"]["distill_weight"] == 1.0
    assert RunConfig.from_dict(written) == cfg


def test_a_renamed_choice_is_read_under_its_old_name_and_written_under_the_new():
    """router_loss=influence (the name before session 16, in old configs and adapters) means router_loss=targets."""
    from layerroute.config import RunConfig

    old = RunConfig.from_dict({"train": {"router_loss": "influence", "oracle_source": "drop_nll"}})
    assert old.train.router_loss == "targets" and old.train.oracle_source == "drop_nll"  # oracle_source keeps its name
    assert old.to_dict()["train"]["router_loss"] == "targets"
    assert TrainConfig(router_loss="influence").router_loss == "targets"  # built in code too
    assert RunConfig.from_dict(old.to_dict()).train == old.train
