"""A whole run: every section of one YAML file, validated without loading anything."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .fields import from_dict, move_renamed, setting
from .overrides import apply_eval_overlay, apply_overlay, apply_overrides, load_yaml
from .sections import EvalConfig, LoraSettings, ModelConfig, RouterConfig
from .train import TrainConfig

RUN_SECTIONS = ("model", "router", "lora", "data", "train", "eval")


def _data_config_class():
    """The data section's dataclass lives with the data module (layerroute.data.config)."""
    from ..data.config import DataConfig

    return DataConfig


@dataclass
class RunConfig:
    """One training run: model, router, lora, data, train and eval sections of a YAML file."""

    model: ModelConfig = setting(None, "the frozen base model")
    router: RouterConfig = setting(None, "one router per block")
    lora: LoraSettings = setting(None, "LoRA adapters")
    data: Any = setting(None, "step data (layerroute.data.config.DataConfig)")
    train: TrainConfig = setting(None, "the optimisation run")
    eval: EvalConfig = setting(None, "evaluation after training (layerroute eval, make demo)")

    def __post_init__(self):
        self.model = self.model or ModelConfig()
        self.router = self.router or RouterConfig()
        self.lora = self.lora or LoraSettings()
        self.train = self.train or TrainConfig()
        self.eval = self.eval or EvalConfig()
        if self.data is None:
            self.data = _data_config_class()()

    @classmethod
    def from_dict(cls, raw: dict) -> RunConfig:
        """Validate every section (unknown sections/keys and wrong types named) without loading anything."""
        if not isinstance(raw, dict):
            raise ConfigError(f"a run config must be a mapping of sections, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(RUN_SECTIONS))
        if unknown:
            raise ConfigError(f"unknown section {unknown[0]!r} (known: {', '.join(RUN_SECTIONS)})")
        for name in RUN_SECTIONS:
            if raw.get(name) is not None and not isinstance(raw[name], dict):
                raise ConfigError(f"section {name} must be a mapping of keys, got {type(raw[name]).__name__}")
        return cls(
            model=from_dict(ModelConfig, raw.get("model"), "model"),
            router=from_dict(RouterConfig, raw.get("router"), "router"),
            lora=from_dict(LoraSettings, raw.get("lora"), "lora"),
            data=_data_config_class().from_dict(raw.get("data") or {}),
            train=from_dict(TrainConfig, raw.get("train"), "train"),
            eval=from_dict(EvalConfig, raw.get("eval"), "eval"),
        )

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None,
                  overlays: list[str | Path] | None = None) -> RunConfig:
        """Read a YAML run config, merge overlay files into it (in order), then apply `section.key=value`
        overrides; errors name the key (or the file)."""
        return cls.from_dict(resolve_raw(path, overrides, overlays))

    def to_dict(self) -> dict:
        out = {}
        for name in RUN_SECTIONS:
            value = getattr(self, name)
            if dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            out[name] = value
        return out


def resolve_raw(base: str | Path | dict, overrides: list[str] | None = None,
                overlays: list[str | Path] | None = None, eval_only: bool = False) -> dict:
    """The raw dict of `base` (a YAML file, or a config already read, e.g. an adapter's training config) with
    `overlays` merged in and `overrides` applied: what `RunConfig.from_yaml` validates (and what `layerroute config`
    prints, resolved). Each layer is read with its keys where they are now (`current_layout`), so a later one wins
    whichever names it uses. `eval_only`: the overlays hold an eval: section only (`apply_eval_overlay`)."""
    raw = current_layout(base if isinstance(base, dict) else load_yaml(base))
    for overlay in overlays or []:
        layer = current_layout(load_yaml(overlay))
        raw = apply_eval_overlay(raw, layer, str(overlay)) if eval_only else \
            apply_overlay(raw, layer, str(overlay), RUN_SECTIONS)
    return apply_overrides(raw, [current_key(item) for item in overrides or []])


def _section_classes() -> dict:
    return {"model": ModelConfig, "router": RouterConfig, "lora": LoraSettings, "train": TrainConfig,
            "eval": EvalConfig}


def current_layout(raw: dict) -> dict:
    """`raw` (a copy where anything moves) with each key that a section's `RENAMED_KEYS` names by its old name at
    its place now: `train.distill_weight` -> `train.experimental.distill_weight`."""
    out = dict(raw)
    for name, cls in _section_classes().items():
        if isinstance(out.get(name), dict):
            out[name] = move_renamed(cls, out[name], name)
    return out


def current_key(item: str) -> str:
    """A `--set` item with its key where it is now: `train.distill_weight=1` -> `train.experimental.distill_weight=1`."""
    key, sep, value = item.partition("=")
    section, dot, rest = key.strip().partition(".")
    renamed = getattr(_section_classes().get(section), "RENAMED_KEYS", {})
    head, _, tail = rest.partition(".")
    if not dot or head not in renamed:
        return item
    return f"{section}.{renamed[head]}" + (f".{tail}" if tail else "") + sep + value
