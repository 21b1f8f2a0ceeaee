"""Files written whole or not at all: write beside the target, then rename over it.

Every single-file output layerroute leaves on disk (eval.json, reports, plots, benchmark lines, training config and
summary, resumable stages) goes through here, so an interrupted or failing job leaves either the previous file or the
new one, never a half-written one that a later step would misread. Folders (training checkpoints, saved adapters) are
filled beside their target and renamed whole (`write_dir_atomically`; the converted GGUF model has its own writer);
metrics.jsonl is append-only, and a resume drops a line cut by a kill (`train._metrics_up_to`).

Both leave ordinary permissions (0o666 / 0o777 masked by the umask): safetensors >= 0.8 writes through a private
(0600) temporary file of its own and renames it (safetensors/safetensors#782), and `tempfile.mkdtemp` makes a 0700
folder; an output another user or a container cannot read is a lost output.

`os.replace` is atomic on POSIX and Windows when source and target are on the same filesystem, which is why the
temporary file lives in the target's own folder. The name carries the process id, so two processes writing the same
target never share a temporary file (the last rename wins).

What it costs: one extra rename per file. There is no fsync: the guarantee is against a crashed or killed process,
not against the machine losing power.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    """The process umask (read by setting it and setting it back: Python has no getter)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
        if tmp.is_file():
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # after a successful replace there is nothing left to remove


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically, creating its folder; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_dir_atomically(directory: str | Path, fill: Callable[[Path], object]) -> Path:
    """Create (or replace) the folder `directory` by filling a temporary sibling with `fill(tmp)` and renaming it into
    place; if `fill` raises, the temporary folder is removed and `directory` is left as it was. Returns the path."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        fill(tmp)
        mask = _umask()
        os.chmod(tmp, 0o777 & ~mask)
        for f in tmp.rglob("*"):
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~mask)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
