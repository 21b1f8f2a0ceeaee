"""Would prefilling on a second core, beside the batch's decode, pay on this CPU? (one JSON line)

The server's scheduler prefills a newcomer while the running batch waits (`layerroute/serve/scheduler.py`); on a 2-core
machine with one thread per server the other core is nearly idle. This times, in one process with one intra-op thread
per Python thread (torch releases the GIL inside kernels), a batch-`--batch` decode step of the plain model and a
batch-1 prefill of `--prompt-tokens` tokens, each alone and then both at once (prefills looping in a second thread
while the decode steps run). The projected server throughput per request, sequential vs overlapped, follows the
scheduler's arithmetic in docs/results/serving_concurrency.md: sequential = P + n * d_B / B, overlapped =
max(P_overlapped, n * d_B_overlapped / B) for n decode steps per request.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/prefill_decode_overlap.py --output benchmarks/results/prefill_decode_overlap_bf16_t1.json
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from layerroute.config import add_dtype_argument, add_model_argument
from layerroute.config.flags import OFFLINE_MODEL
from layerroute.eval.bench import emit_json_line
from layerroute.infer.generate import load_for_inference
from layerroute.nn.kv_cache import RoutedCache


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_argument(p)
    add_dtype_argument(p)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=264)
    p.add_argument("--decode-steps", type=int, default=31, help="decode steps per request in the projection")
    p.add_argument("--reps", type=int, default=3, help="alone / overlapped rounds, alternating")
    p.add_argument("--output", default=None)
    args = p.parse_args()
    args.model = args.model or OFFLINE_MODEL  # the packaged offline default
    torch.set_num_threads(1)
    rm = load_for_inference(args.model, None, args.dtype)
    model = rm.model
    vocab = int(rm.config.vocab_size)
    gen = torch.Generator().manual_seed(0)

    def prefill(rows: int) -> RoutedCache:
        cache = RoutedCache()
        ids = torch.randint(100, vocab, (rows, args.prompt_tokens), generator=gen)
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return cache

    def decode(cache: RoutedCache, steps: int) -> list[float]:
        tok, times = torch.randint(100, vocab, (args.batch, 1), generator=gen), []
        for _ in range(steps):
            t = time.perf_counter()
            model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - t)
        return times

    def prefills(n: int, out: list[float]) -> None:
        torch.set_num_threads(1)  # each Python thread its own intra-op setting
        with torch.no_grad():
            for _ in range(n):
                t = time.perf_counter()
                prefill(1)
                out.append(time.perf_counter() - t)

    res = {"decode_alone": [], "prefill_alone": [], "decode_overlapped": [], "prefill_overlapped": []}
    with torch.no_grad():
        for _ in range(args.reps):
            res["decode_alone"] += decode(prefill(args.batch), 20)
            prefills(4, res["prefill_alone"])
            cache, side = prefill(args.batch), []
            worker = threading.Thread(target=prefills, args=(8, side))
            worker.start()
            while worker.is_alive():  # decode only while the prefills run beside it
                res["decode_overlapped"] += decode(cache, 1)
            worker.join()
            res["prefill_overlapped"] += side
    ms = {k: 1e3 * statistics.median(v) for k, v in res.items()}
    n, b = args.decode_steps, args.batch
    sequential = ms["prefill_alone"] + n * ms["decode_alone"] / b
    overlapped = max(ms["prefill_overlapped"], n * ms["decode_overlapped"] / b)
    emit_json_line({
        "benchmark": "prefill_decode_overlap", "model": args.model, "dtype": rm.dtype, "batch": b,
        "prompt_tokens": args.prompt_tokens, "torch": torch.__version__, "median_ms": ms,
        "samples": {k: len(v) for k, v in res.items()},
        "server_ms_per_request": {"sequential": sequential, "overlapped": overlapped},
        "projected_throughput_gain": sequential / overlapped,
    }, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
