"""Files written whole or not at all: write beside the target, then rename over it.

Every single-file output layerroute leaves on disk (eval.json, reports, plots, benchmark lines, training config and
summary, resumable stages) goes through here, so an interrupted or failing job leaves either the previous file or the
new one, never a half-written one that a later step would misread. Folders (training checkpoints, saved adapters, the
converted GGUF model) are built beside their target and renamed whole by their own writers; metrics.jsonl is
append-only, and a resume drops a line cut by a kill (`train._metrics_up_to`).

`os.replace` is atomic on POSIX and Windows when source and target are on the same filesystem, which is why the
temporary file lives in the target's own folder. The name carries the process id, so two processes writing the same
target never share a temporary file (the last rename wins).

What it costs: one extra rename per file. There is no fsync: the guarantee is against a crashed or killed process,
not against the machine losing power.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; once the block finishes, it replaces `path`.

    If the block raises, the temporary file is removed and `path` is left as it was. For writers that take a path
    (matplotlib's savefig); text goes through `write_text_atomic`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # after a successful replace there is nothing left to remove


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically, creating its folder; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
