"""What a batch of rows costs a single linear layer on this machine, float32 against bf16 (one JSON line).

Why it matters: batched decode is one row per sequence, so each linear is an [rows, in] x [in, out] product. Where
bf16 is native (AVX-512 BF16, AMX) a few rows cost about what one does (memory-bound, as decode should be); float32
small-batch products on the same CPU cost 2-4x (docs/results/serving_concurrency.md). Shapes default to SmolLM2-135M's
MLP and LM head.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/linear_batch.py --output benchmarks/results/linear_batch_cpu_t1.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from layerroute.eval.bench import emit_json_line
from layerroute.model import native_bf16


def median_ms(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["576x1536", "1536x576", "576x576", "576x49152"],
                   help="IN x OUT of each weight")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    results = []
    for shape in args.shapes:
        n_in, n_out = (int(v) for v in shape.lower().split("x"))
        weight = torch.randn(n_out, n_in, generator=gen)
        for dtype in (torch.float32, torch.bfloat16):
            w = weight.to(dtype)
            row = {"shape": shape, "dtype": str(dtype).removeprefix("torch."), "ms": {}}
            for rows in args.rows:  # [rows, 1, in]: the layout a decode step hands to each linear
                x = torch.randn(rows, 1, n_in, generator=gen).to(dtype)
                row["ms"][str(rows)] = median_ms(lambda x=x, w=w: F.linear(x, w), args.reps)
            base = row["ms"][str(args.rows[0])]
            row["vs_first"] = {k: v / base for k, v in row["ms"].items()}
            results.append(row)
            print(f"{shape} {row['dtype']}: " + ", ".join(f"{k} rows {v:.3f} ms" for k, v in row["ms"].items()),
                  flush=True)
    emit_json_line({"benchmark": "linear_batch", "threads": args.threads, "reps": args.reps, "torch": torch.__version__,
                    "native_bf16": native_bf16(torch.device("cpu")), "results": results}, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
