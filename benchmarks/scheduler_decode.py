"""The serving scheduler's batched decode step against a batch of one, per dtype (one JSON line).

Submits B requests at once to a `Scheduler` (dense model, no sessions), so all of them are prefilled before they
decode together, and times each `Scheduler._decode` call (one forward of every running row plus token choice) while
all B rows run. Alternates batch 1 and batch B, `--reps` times each, per dtype. Where a batch-B step costs about a
batch-1 step, batching multiplies throughput by about B (docs/results/serving_concurrency.md).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/scheduler_decode.py --output benchmarks/results/scheduler_decode_cpu_t1.json
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from layerroute.config import add_model_argument
from layerroute.config.flags import OFFLINE_MODEL
from layerroute.eval.bench import emit_json_line
from layerroute.infer.generate import load_for_inference
from layerroute.serve.engine import Engine, SamplingParams
from layerroute.serve.scheduler import Job, Scheduler


def step_ms(engine: Engine, batch: int, prompt_tokens: int, new_tokens: int, rng: random.Random) -> float:
    """Median ms of the decode steps during which all `batch` rows ran."""
    sched = Scheduler(engine, max_batch=max(batch, 2))  # max_batch 1 would take the lone path (no _decode)
    times: list[float] = []
    decode = sched._decode

    def timed() -> None:
        t = time.perf_counter()
        decode()
        if len(sched.rows) == batch:
            times.append(time.perf_counter() - t)

    sched._decode = timed
    vocab = len(engine.tokenizer)
    jobs = [Job(prompt=[rng.randrange(100, vocab) for _ in range(prompt_tokens)],
                params=SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)) for _ in range(batch)]
    with engine.lock:  # all submitted before the loop's first turn: prefilled first, then decoded together
        for job in jobs:
            sched.submit(job)
    try:
        for job in jobs:
            job.future.result()
    finally:
        sched.close()
    return 1e3 * statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_argument(p)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=264, help="per request (BFCL tool-call prompts average 264)")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default=None)
    args = p.parse_args()
    args.model = args.model or OFFLINE_MODEL  # the packaged offline default
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    out = {"benchmark": "scheduler_decode", "model": args.model, "batch": args.batch,
           "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "threads": args.threads,
           "torch": torch.__version__, "results": {}}
    for dtype in args.dtypes:
        rm = load_for_inference(args.model, None, dtype)
        engine = Engine(rm, dense=True, cache_sessions=0)
        try:
            runs = {"1": [], str(args.batch): []}
            for _ in range(args.reps):
                for b in (1, args.batch):
                    runs[str(b)].append(step_ms(engine, b, args.prompt_tokens, args.new_tokens, rng))
                    print(f"{dtype} batch {b}: {runs[str(b)][-1]:.1f} ms per decode step", flush=True)
        finally:
            engine.close()
        one, many = statistics.median(runs["1"]), statistics.median(runs[str(args.batch)])
        out["results"][dtype] = {"step_ms": runs, "batch_step_vs_one": many / one,
                                 "tokens_per_s_gain": args.batch * one / many}
    emit_json_line(out, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
