"""Typed, validated settings for every run, loaded from commented YAML plus `--set key=value` overrides.

Each section is a dataclass; every field carries a one-line description in `metadata["help"]`. Values are
checked at construction (`__post_init__`) and errors name the offending key (`router.kind`, `train.lr`, ...),
so a wrong config stops a run before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


def setting(default, help: str, **kwargs):
    """A dataclass field with a one-line description (shown by `layerroute config --describe`)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


def _check_choice(section: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{section}.{name} must be one of {list(choices)}, got {value!r}")


def _check_range(section: str, name: str, value, low=None, high=None, low_open=False) -> None:
    if low is not None and (value < low or (low_open and value == low)):
        raise ConfigError(f"{section}.{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{section}.{name} must be <= {high}, got {value!r}")


@dataclass
class ModelConfig:
    """Which frozen base model to load."""

    name: str = setting(
        "smollm2-135m-instruct",
        "hub id, local folder, .gguf file, 'smollm2-135m-instruct' (packaged offline default) or 'shape:<preset>'",
    )
    dtype: str = setting("float32", "weights dtype: float32, bfloat16 or float16 (bf16 on GPU for the paper run)")
    device: str = setting("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:N'")
    attn_implementation: str = setting("sdpa", "transformers attention backend: sdpa or eager")
    seed: int = setting(0, "seed for the random weights of shape presets")
    tokenizer: str | None = setting(
        None, "tokenizer folder/name; default: the model's own (shape presets: SmolLM2's when installed)"
    )

    def __post_init__(self):
        _check_choice("model", "dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _check_choice("model", "attn_implementation", self.attn_implementation, ("sdpa", "eager"))
        if not self.name:
            raise ConfigError("model.name must not be empty")


@dataclass
class RouterConfig:
    """One router per decoder block."""

    kind: str = setting("linear", "linear = Linear(hidden, 1) as in the paper; mlp = bottleneck MLP")
    bottleneck: int = setting(64, "hidden width of the mlp router")
    pooling: str = setting("mean", "how context states are pooled: mean (masked) or last (last context token)")
    threshold: float = setting(0.5, "run the block when sigmoid(logit) > threshold")
    init_bias: float = setting(2.0, "initial router bias, the same for every block (sigmoid(2) = 0.88: all run)")
    normalize_input: bool = setting(True, "RMS-normalise the pooled state (no parameters) before the router")

    def __post_init__(self):
        _check_choice("router", "kind", self.kind, ("linear", "mlp"))
        _check_choice("router", "pooling", self.pooling, ("mean", "last"))
        _check_range("router", "threshold", self.threshold, 0.0, 1.0, low_open=True)
        _check_range("router", "bottleneck", self.bottleneck, 1)


@dataclass
class LoraSettings:
    """LoRA adapters through peft on the attention projections."""

    enabled: bool = setting(True, "train LoRA adapters (false = routers only)")
    r: int = setting(8, "LoRA rank")
    alpha: int = setting(16, "LoRA alpha (scale = alpha / r)")
    dropout: float = setting(0.05, "dropout on the LoRA input")
    targets: list = setting(["q_proj", "k_proj", "v_proj", "o_proj"], "module names that get adapters")

    def __post_init__(self):
        _check_range("lora", "r", self.r, 1)
        _check_range("lora", "dropout", self.dropout, 0.0, 1.0)
        if not self.targets or not all(isinstance(t, str) for t in self.targets):
            raise ConfigError(f"lora.targets must be a non-empty list of module names, got {self.targets!r}")


# ------------------------------------------------------------------------------------------------------------
# Generic construction from dicts, with type checks that name the key.


def _type_ok(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        return isinstance(value, origin)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def from_dict(cls, data: dict | None, section: str):
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types (naming `section.key`)."""
    data = dict(data or {})
    if not isinstance(data, dict):
        raise ConfigError(f"{section} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {section}.{unknown[0]} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = from_dict(annotation, value, f"{section}.{name}")
            continue
        if annotation is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not _type_ok(value, annotation):
            raise ConfigError(
                f"{section}.{name} must be of type {getattr(annotation, '__name__', annotation)}, "
                f"got {type(value).__name__} {value!r}"
            )
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{section}: {err}") from err


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings (value parsed as YAML) to a raw config dict."""
    raw = dict(raw)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(text)
    return raw


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    with path.open() as fh:
        raw = yaml.safe_load(fh) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def describe(cls, section: str) -> list[str]:
    """One line per field: `section.name = default  # help`."""
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        lines.append(f"{section}.{f.name} = {default!r}  # {f.metadata.get('help', '')}")
    return lines
