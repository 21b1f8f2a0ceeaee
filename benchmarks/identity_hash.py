"""What an adapter's stable identities cost: hashing a base model file (once, then cached) and a tokenizer.

    PYTHONPATH=. python benchmarks/identity_hash.py --file /tmp/qwen/qwen.gguf \
        --tokenizer tests/fixtures/tokenizers/smollm2 --tokenizer ~/.cache/layerroute/qwen-<key> --output out.json

* `file_sha256_s`: SHA-256 of the whole file with an empty digest cache (each repetition in a fresh cache
  folder). The OS page cache is warm after the first read (the figure is the hash, not the disk); the first
  repetition is reported apart as `file_sha256_first_s`.
* `file_cached_s`: the same call once the digest is cached (a stat, a small JSON read): what every later load
  of the model pays.
* `tokenizer_identity_s`: `layerroute.identity.tokenizer_identity` (serialise the backend, hash it), per
  tokenizer; paid on every adapter load (the saved tokenizer is checked against the recorded identity).

min/median over --reps repetitions; the last line is the JSON result.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _stats(xs: list[float]) -> dict:
    return {"min": round(min(xs), 6), "median": round(statistics.median(xs), 6)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--file", required=True, help="a local model file (.gguf)")
    p.add_argument("--tokenizer", action="append", default=[], help="tokenizer folder (repeat)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from layerroute.eval.bench import emit_json_line
    from layerroute.identity import file_digest, tokenizer_identity

    torch.set_num_threads(1)
    path = Path(args.file)
    cold, cached = [], []
    for _ in range(args.reps):
        with tempfile.TemporaryDirectory() as cache:
            os.environ["LAYERROUTE_CACHE"] = cache
            t0 = time.perf_counter()
            digest = file_digest(path)
            cold.append(time.perf_counter() - t0)
            for _ in range(5):
                t0 = time.perf_counter()
                assert file_digest(path) == digest
                cached.append(time.perf_counter() - t0)
    toks = {}
    for name in args.tokenizer:
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(name))
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            ident = tokenizer_identity(tok)
            times.append(time.perf_counter() - t0)
        toks[Path(name).name] = {"vocab_size": ident["vocab_size"], **_stats(times)}
    result = {
        "file": path.name, "size_bytes": path.stat().st_size, "reps": args.reps,
        "file_sha256_first_s": round(cold[0], 3), "file_sha256_s": _stats(cold[1:] or cold),
        "file_cached_s": _stats(cached), "tokenizer_identity_s": toks,
        "cpu": "1 thread", "command": " ".join(sys.argv),
    }
    emit_json_line(result, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
