"""Typed, validated settings for every run, loaded from commented YAML plus overlays and `--set key=value`.

    fields.py     what a setting is: setting(), range and Literal-choice checks, from_dict's type checks
    overrides.py  raw dicts: YAML reading, the one `--set` parser, overlay files (run and eval)
    sections.py   the model, router, lora and eval sections
    train.py      the train section
    experimental.py  the rejected recipes' options: train.experimental, router.experimental (old names still read)
    run.py        RunConfig: every section of one file (the data section is layerroute.data.config.DataConfig)
    flags.py      the command line's shared flags (--config, --overlay, --set, --model, --adapter, --dtype, ...)
    cli.py        `layerroute config`: validate a config and print it resolved (--describe: every setting)

Every name is importable from here: `from layerroute.config import RunConfig, apply_overrides`.
"""

from .experimental import RouterExperimental, TrainExperimental
from .fields import check_choices, check_range, choices, describe, from_dict, setting
from .flags import (
    add_adapter_argument,
    add_chat_template_argument,
    add_config_arguments,
    add_device_argument,
    add_draft_arguments,
    add_dtype_argument,
    add_json_argument,
    add_model_argument,
    add_output_argument,
    add_output_dir_argument,
    add_threads_argument,
    raw_config,
)
from .overrides import (
    apply_eval_overlay,
    apply_overlay,
    apply_override,
    apply_overrides,
    load_yaml,
    parse_yaml,
)
from .run import RUN_SECTIONS, RunConfig, resolve_raw
from .sections import DTYPES, EvalConfig, LoraSettings, ModelConfig, RouterConfig
from .train import GREEDY_ORACLES, ORACLE_SOURCES, REGULARIZERS, ROUTER_LOSSES, STATIC_ORACLES, TrainConfig

__all__ = [
    "DTYPES", "GREEDY_ORACLES", "ORACLE_SOURCES", "REGULARIZERS", "ROUTER_LOSSES", "RUN_SECTIONS", "STATIC_ORACLES",
    "EvalConfig", "LoraSettings", "ModelConfig", "RouterConfig", "RouterExperimental", "RunConfig", "TrainConfig",
    "TrainExperimental",
    "add_adapter_argument", "add_chat_template_argument", "add_config_arguments", "add_device_argument",
    "add_draft_arguments", "add_dtype_argument", "add_json_argument", "add_model_argument", "add_output_argument", "add_output_dir_argument",
    "add_threads_argument", "raw_config", "apply_eval_overlay", "apply_overlay", "apply_override", "apply_overrides", "check_choices", "check_range",
    "choices", "describe", "from_dict", "load_yaml", "parse_yaml", "resolve_raw", "setting",
]
