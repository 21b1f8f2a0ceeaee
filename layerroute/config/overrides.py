"""Raw config dicts: reading YAML, the one `--set key=value` parser, and overlay files.

Everything here works on plain dicts, before any section is built, so that every command (`train`, `eval`,
`data`, `curve`, `config`, the demo) reads a value the same way:

- YAML is read with YAML 1.2's numbers: `2e-4` is a float (PyYAML's YAML 1.1 needs a dot and a signed exponent,
  `2.0e-4`, and would read `2e-4` as a string).
- `--set a.b=value` parses `value` as YAML; list items are addressed by index, `data.sources[0].limit=50` (or
  `data.sources.0.limit=50`); the index one past the end appends. Errors name the key.
- An overlay is a YAML file with some of the run config's sections, holding only the keys it changes; its keys
  replace the config's key by key (a setting's value, a list or a mapping, is replaced whole, as `--set` does).
  A group of settings inside a section (`GROUPS`: `train.experimental`) is not a setting: it merges key by key too.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml

from ..errors import ConfigError

#: the groups of settings nested in a section (config/experimental.py), merged key by key by an overlay
GROUPS = ("experimental",)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: `1e-3`, `2E5` (no dot, unsigned exponent) are numbers."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str):
    """One YAML document (a file's text or a `--set` value) with the loader every config reader shares."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


def load_yaml(path: str | Path) -> dict:
    """A YAML config file as a dict of sections; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


_KEY_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _key_parts(key: str, item: str) -> list[str | int]:
    """`data.sources[0].limit` -> ['data', 'sources', 0, 'limit'] (`sources.0` -> 0 too)."""
    parts: list[str | int] = [int(idx) if idx else (int(name) if name.isdigit() else name)
                              for name, idx in _KEY_PART.findall(key)]
    if not parts:
        raise ConfigError(f"--set {item!r}: empty key")
    return parts


def apply_override(raw: dict, item: str) -> None:
    """Apply one `section.key=value` string (value parsed as YAML) to a raw config dict, in place."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, text = item.split("=", 1)
    key = key.strip()
    parts = _key_parts(key, item)
    node = raw
    for part, nxt in zip(parts[:-1], parts[1:], strict=True):
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise ConfigError(f"--set {key}: index [{part}] does not exist")
            node = node[part]
        else:
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part} is not a section")
            if node.get(part) is None:
                node[part] = [] if isinstance(nxt, int) else {}
            node = node[part]
    last = parts[-1]
    try:
        value = parse_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: the value is not valid YAML ({err})") from None
    if isinstance(last, int):
        if not isinstance(node, list) or last > len(node):
            raise ConfigError(f"--set {key}: index [{last}] does not exist")
        if last == len(node):
            node.append(value)  # one past the end: a new list item, e.g. a new data source
        else:
            node[last] = value
    else:
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: the parent of {last} is not a section")
        node[last] = value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """A copy of `raw` with `section.key=value` strings applied in order (see `apply_override`)."""
    raw = copy.deepcopy(raw)
    for item in overrides or []:
        apply_override(raw, item)
    return raw


def apply_overlay(raw: dict, overlay: dict, path: str, sections: tuple[str, ...]) -> dict:
    """`raw` with each section of `overlay` merged in key by key (its keys win; a key's value is replaced whole).

    `sections` are the sections an overlay may hold (a run config's: `run.RUN_SECTIONS`); any other is an error
    naming the file."""
    allowed = tuple(sections)
    if not isinstance(overlay, dict):
        raise ConfigError(f"{path}: an overlay is a mapping of sections ({', '.join(allowed)})")
    unknown = sorted(set(overlay) - set(allowed))
    if unknown:
        raise ConfigError(f"{path}: unknown section {unknown[0]!r} in an overlay (known: {', '.join(allowed)})")
    out = dict(raw)
    for name, section in overlay.items():
        if section is None:
            continue
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: {name}: must be a mapping of keys")
        merged = {**(raw.get(name) or {}), **copy.deepcopy(section)}
        for group in GROUPS:
            old, new = (raw.get(name) or {}).get(group), section.get(group)
            if isinstance(old, dict) and isinstance(new, dict):
                merged[group] = {**old, **copy.deepcopy(new)}
        out[name] = merged
    return out


def apply_eval_overlay(raw: dict, overlay: dict, path: str = "overlay") -> dict:
    """`raw` with the overlay's eval: keys replacing its own (an evaluation setting kept apart from the run config
    an adapter was trained with: what is evaluated, never what was trained)."""
    unknown = sorted(set(overlay) - {"eval"})
    if unknown:
        raise ConfigError(f"{path}: an eval overlay holds an eval: section only, not {unknown[0]!r}")
    return apply_overlay(raw, overlay, path, sections=("eval",))
