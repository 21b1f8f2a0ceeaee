"""eval.json on disk: read a JSON file with a clear error, read the per-adapter results of finished evaluations,
write JSON atomically (NaN as null, numpy scalars as numbers)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..atomic import write_text_atomic
from ..errors import ConfigError


def read_json(path: str, *, missing: str, invalid: str):
    """A JSON file's content, or a ConfigError saying `missing` (no file) or `invalid` (and why it is not JSON)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(missing) from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{invalid} (invalid JSON: {err})") from None


def read_per_adapter(paths: list[str]) -> list[dict]:
    """Per-adapter results from finished eval.json files (a multi-seed file contributes each of its seeds)."""
    per_adapter = []
    for path in paths:
        doc = read_json(path, missing=f"no such evaluation: {path}", invalid=f"{path} is not an eval.json")
        if "splits" not in doc:
            raise ConfigError(f"{path} is not an eval.json (no 'splits')")
        for one in doc.get("seeds") or [doc]:
            one = {k: v for k, v in one.items() if k not in ("seeds", "aggregate", "adapters")}
            one.setdefault("adapter", (doc.get("adapters") or [path])[0])
            per_adapter.append(one)
    return per_adapter


def write_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=_json_default))


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, float) and math.isnan(o):
        return None
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
