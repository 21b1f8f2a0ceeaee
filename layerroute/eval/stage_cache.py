"""Finished stages of a long job kept on disk, so that an interrupted run resumes where it stopped.

`layerroute eval` spends most of its time in free-running generation (on 2 CPU cores about 6 minutes per
configuration and step type, 40 minutes for issue 8's four configurations); before this cache an interruption lost
all of it, because eval.json is written once at the end. Each stage's result is written atomically as JSON under a
key that names everything it depends on (the adapter's files, the evaluation config, the steps), so a stage is
reused only by a run that would compute the same thing; anything else computes it again and overwrites it.

What it costs: one JSON file per stage (a few hundred KB for a generation stage, which keeps each step's text) and
one pass over the adapter's files to hash them (a few MB).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic


def fingerprint(obj: Any) -> str:
    """A stable hash of a JSON-able object (dict keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def directory_digest(path: str | Path) -> str:
    """Hash of a directory's files (names and contents): an adapter saved again, even at the same path, differs."""
    h = hashlib.sha256()
    root = Path(path)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


class StageCache:
    """Results of named stages under `directory`, each valid only for the key it was computed under.

    `run(name, key, fn)` returns the stored result when `directory/name.json` holds one for this cache's identity
    and `key`, and otherwise calls `fn()`, stores its result atomically and returns it. Results must survive a JSON
    round trip unchanged (lists, dicts, str, int, float, bool: Python writes floats exactly). `clear()` removes the
    directory once the job's own output is safely written."""

    def __init__(self, directory: str | Path, identity: Any, log: Callable[[str], None] | None = None):
        self.directory = Path(directory)
        self.identity = fingerprint(identity)
        # stderr by default: commands print their JSON summary on stdout
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.reused: list[str] = []

    def _path(self, name: str) -> Path:
        if not name or any(c in name for c in "/\\") or name.startswith("."):
            raise ValueError(f"stage name must be a plain file name, got {name!r}")
        return self.directory / f"{name}.json"

    def run(self, name: str, key: Any, fn: Callable[[], Any]) -> Any:
        path, want = self._path(name), fingerprint([self.identity, key])
        if path.is_file():
            try:
                stored = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                stored = None  # a damaged file is computed again, not trusted
            if isinstance(stored, dict) and stored.get("key") == want:
                self.reused.append(name)
                self.log(f"[resume] {name}: reused from {path}")
                return stored["result"]
        text = json.dumps({"key": want, "result": fn()})
        write_text_atomic(path, text)
        return json.loads(text)["result"]  # what a resumed run would get back: the same either way

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
