"""Stable identities an adapter records of what it was trained with: the base model's file and the tokenizer.

* A local model file (a .gguf) is known by its name, size and SHA-256, so an adapter still finds it after the
  file moves (`--model NEW_PATH`) and refuses another file under the old name. Hashing reads the whole file
  (491 MB: a few seconds), so the digest is cached under the layerroute cache, keyed by path, size and mtime:
  a later load costs a stat and a small read.
* A tokenizer is known by its size (`len(tokenizer)`, added tokens included) and a SHA-256 of what maps text to
  ids: the `tokenizers` backend's serialisation from its added tokens on (normalizer, pre-tokenizer, model
  vocabulary and merges, post-processor, decoder). The padding and truncation settings before that are left out:
  transformers changes them on every padded call, and they change no id. About 0.1 s for a 150k vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .atomic import write_text_atomic

_CHUNK = 1 << 22


def _cache_dir() -> Path:
    # the same root as the dequantised model cache (layerroute.model._cache_root)
    return Path(os.environ.get("LAYERROUTE_CACHE", Path.home() / ".cache" / "layerroute")) / "digests"


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, cached by (resolved path, size, mtime): computed once per file version."""
    path = Path(path)
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    entry = _cache_dir() / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
    try:
        cached = json.loads(entry.read_text())
        if cached.get("key") == key:
            return cached["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(entry, json.dumps({"key": key, "sha256": digest}))
    except OSError:
        pass  # a read-only cache only costs the hash again next time
    return digest


def file_identity(name: str) -> dict:
    """{file, size, sha256} when `name` is a local model file (not a folder, hub id or packaged name), else {}."""
    path = Path(name).expanduser()
    if not path.is_file():
        return {}
    return {"file": path.name, "size": path.stat().st_size, "sha256": file_digest(path)}


def tokenizer_identity(tokenizer) -> dict | None:
    """{vocab_size, sha256, source} of a transformers tokenizer; None for objects that are not one (test stubs)."""
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
        start = text.find('"added_tokens":')  # a key: token strings inside padding settings have escaped quotes
        payload = text[start:] if start >= 0 else text
    else:  # a tokenizer without a `tokenizers` backend (sentencepiece): its vocabulary and added tokens
        added = {str(k): str(v) for k, v in getattr(tokenizer, "added_tokens_decoder", {}).items()}
        payload = json.dumps([sorted(tokenizer.get_vocab().items()), sorted(added.items())], ensure_ascii=False)
    return {
        "vocab_size": len(tokenizer),
        "sha256": hashlib.sha256(payload.encode("utf-8")).hexdigest(),
        "source": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
    }


def same_tokenizer(a: dict, b: dict) -> bool:
    return a.get("vocab_size") == b.get("vocab_size") and a.get("sha256") == b.get("sha256")


def describe_tokenizer(ident: dict) -> str:
    return f"{ident.get('source')!r} ({ident.get('vocab_size')} tokens, sha256 {str(ident.get('sha256'))[:12]})"


def describe_base(ident: dict) -> str:
    """'name' plus the file's name, size and digest when it was a local file."""
    out = repr(ident.get("name"))
    if ident.get("sha256"):
        out += f" ({ident.get('file')}, {ident.get('size'):,} bytes, sha256 {ident['sha256'][:12]})"
    return out


__all__ = ["describe_base", "describe_tokenizer", "file_digest", "file_identity", "same_tokenizer",
           "tokenizer_identity"]
