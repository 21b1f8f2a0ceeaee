"""Load test of `layerroute serve` (continuous batching): generated tokens/s, p50/p95/p99 latency and time to first
token at 1, 4 and 8 concurrent clients, dense vs routed, in one run.

    PYTHONPATH=. python benchmarks/serve_load.py --model smollm2-135m-instruct --requests-per-client 3 --max-tokens 32

One server process per configuration, all started first and kept running (idle ones cost nothing); then, for
each concurrency level and repetition, every configuration takes a burst in turn (interleaved, so load from other
processes on a shared machine hits them alike; compare within a run only). A burst is `--requests-per-client`
requests from each of `c` client threads, each client sending its next request when the last is answered.
Configurations:

- ``dense``: ``--dense``, the plain model (routed layers swapped out, LoRA merged): the baseline.
- ``routed``: the routers decide (without ``--adapter`` they are at init and run every block, so this measures
  the router overhead; with ``--adapter`` the trained routers decide, and rows of one batch may differ).
- ``skip<F>``: a forced pattern skipping round(F * L) blocks (real skipping; without a trained adapter the text
  is not meaningful, the speed is). Every row skips the same blocks, so the batch skips them too.
- ``dense_serial`` (``--serial``): the dense server with ``--max-batch 1``, one request at a time (the engine
  before continuous batching): what batching buys at the same concurrency.

- ``--dtypes float32 bfloat16``: every configuration in each dtype (the servers' ``--dtype``); names of the
  non-float32 ones end in ``_bf16`` / ``_fp16``. On a CPU with native bf16 (AVX-512 BF16, AMX) a batch-8 linear
  costs about what a batch-1 one does in bf16 and 2-4x in float32, so batching gains far more in bf16.

- ``<config>_pt`` (``--prefill-thread``): the same server with ``--prefill-thread``: newcomers are prefilled on
  a second thread (its own module tree, shared weights) while the batch decodes, instead of stalling it. `serve`
  does that by default; the plain configurations here run ``--no-prefill-thread``.

- ``routed_pattern`` (``--pattern``): the routed server with ``--schedule pattern``: a waiting request whose
  routing decisions match the running batch's is admitted first (bounded wait), so tool-call rows decode with
  tool-call rows and a block they all skip is really not run; against ``routed`` (first come, first served) on a
  mixed workload (``--planning-share``) with a trained ``--adapter``.

Requests are BFCL simple_python questions with their tool specs (a realistic tool-call prompt), and with
``--planning-share F`` that fraction of GSM8K train problems without tools (planning steps), sent with the
official openai client, ``temperature=0``, and ``"layerroute": {"ignore_eos": true, "cache": false}`` so every
configuration generates exactly ``--max-tokens`` tokens per request and re-prefills (no session reuse between
unrelated requests). Time to first token = the server's queue wait + its prefill-to-first-token time (from the
response's ``layerroute.timings``). Per configuration and concurrency: generated tokens/s over the burst's wall
time (median of the repetitions), latency p50/p95/p99 over every request, TTFT p50/p95; and per configuration the
issue's two checks: tokens/s at the highest concurrency over 1 client, and p95 latency there over the median
latency of a lone request (1 client) of the same length.

Prints one JSON line last (also written to ``--output``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bfcl_requests(n: int) -> list[tuple[list[dict], list[dict]]]:
    from layerroute.tasks.bfcl import bfcl_data_dir, bfcl_tool

    path = Path(bfcl_data_dir()) / "BFCL_v4_simple_python.json"
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            messages = [{"role": m["role"], "content": m["content"]} for m in row["question"][0]]
            out.append((messages, [bfcl_tool(fn) for fn in row["function"]]))
            if len(out) == n:
                break
    return out


def gsm8k_requests(n: int) -> list[tuple[list[dict], None]]:
    """Planning requests: GSM8K train problems, no tools (the shared data folder beside the repository)."""
    path = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            out.append(([{"role": "user", "content": json.loads(line)["question"]}], None))
            if len(out) == n:
                break
    return out


def mixed(tool: list, planning: list, share: float) -> list:
    """`tool` with a `share` of its places given to `planning` requests, spread evenly (deterministic)."""
    out, acc = [], 0.0
    t, p = iter(tool), iter(planning)
    for _ in range(len(tool)):
        acc += share
        if acc >= 1.0:
            acc -= 1.0
            out.append(next(p))
        else:
            out.append(next(t))
    return out


DTYPE_SUFFIX = {"auto": "", "float32": "", "bfloat16": "_bf16", "float16": "_fp16"}  # auto: the servers' choice


class ServerProc:
    def __init__(self, name: str, model: str, extra: list[str], adapter: str | None, threads: int):
        self.name, self.port = name, free_port()
        cmd = [sys.executable, "-m", "layerroute.serve", "--model", model, "--served-model-name", "bench",
               "--port", str(self.port), "--cache-sessions", "0", "--log-level", "warning", *extra]
        env_threads = {"OMP_NUM_THREADS": str(threads)}  # torch's intra-op threads in the server
        if adapter:
            cmd += ["--adapter", adapter]
        env = {**os.environ, **env_threads,
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"serve_load_{name}_{self.port}.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def wait(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited ({self.proc.returncode}); see {self.log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if json.loads(r.read())["status"] == "ok":
                        return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"server {self.name} did not come up in {timeout} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def burst(client, reqs, n: int, concurrency: int, max_tokens: int) -> dict:
    """n requests from `concurrency` client threads; per-request latency and server-side figures."""
    lock, next_i = threading.Lock(), [0]
    records, errors = [], []

    def worker():
        while True:
            with lock:
                i = next_i[0]
                next_i[0] += 1
            if i >= n:
                return
            messages, tools = reqs[i % len(reqs)]
            t0 = time.perf_counter()
            try:
                r = client.chat.completions.create(
                    model="bench", messages=messages, max_tokens=max_tokens, temperature=0,
                    extra_body={"layerroute": {"ignore_eos": True, "cache": False}}, **({"tools": tools} if tools else {}))
            except Exception as e:  # noqa: BLE001 - counted
                errors.append(repr(e))
                continue
            ext = r.model_extra["layerroute"]
            with lock:
                records.append({"latency": time.perf_counter() - t0, "kind": "tool_call" if tools else "planning",
                                "ttft": ext["timings"]["queue_s"] + ext["timings"]["ttft_s"],
                                "decode": ext["timings"]["decode_s_per_token"], "queue": ext["timings"]["queue_s"],
                                "tokens": r.usage.completion_tokens, "prompt": r.usage.prompt_tokens,
                                "skipped": len(ext["blocks_skipped"]), "tfs": ext["total_flops_skipped"]})

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"wall": time.perf_counter() - start, "records": records, "errors": errors}


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (with 8-16 samples p95 is close to the maximum)."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


def summarize(bursts: list[dict]) -> dict:
    recs = [r for b in bursts for r in b["records"]]
    lat = [r["latency"] for r in recs]
    ttft = [r["ttft"] for r in recs]
    tps = [sum(r["tokens"] for r in b["records"]) / b["wall"] for b in bursts]
    return {
        "requests": len(recs), "errors": sum(len(b["errors"]) for b in bursts),
        "tokens_per_s_median": statistics.median(tps), "tokens_per_s_per_rep": tps,
        "rps_median": statistics.median(len(b["records"]) / b["wall"] for b in bursts),
        "p50_s": statistics.median(lat), "p95_s": pct(lat, 95), "p99_s": pct(lat, 99),
        "ttft_p50_s": statistics.median(ttft), "ttft_p95_s": pct(ttft, 95),
        "server_decode_ms_per_token_median": 1000 * statistics.median(r["decode"] for r in recs if r["decode"]),
        "queue_s_median": statistics.median(r["queue"] for r in recs),
        "completion_tokens_mean": statistics.fmean(r["tokens"] for r in recs),
        "prompt_tokens_mean": statistics.fmean(r["prompt"] for r in recs),
        "blocks_skipped_mean": statistics.fmean(r["skipped"] for r in recs),
        "total_flops_skipped_mean": statistics.fmean(r["tfs"] for r in recs),
        "by_kind": {k: {"requests": len(rs), "p50_s": statistics.median(r["latency"] for r in rs),
                        "p95_s": pct([r["latency"] for r in rs], 95),
                        "blocks_skipped_mean": statistics.fmean(r["skipped"] for r in rs)}
                    for k in ("tool_call", "planning") if (rs := [r for r in recs if r["kind"] == k])},
    }


def main() -> int:
    from layerroute.config import add_adapter_argument, add_model_argument
    from layerroute.config.flags import OFFLINE_MODEL

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_argument(p)
    add_adapter_argument(p)
    p.add_argument("--skip-fraction", type=float, nargs="*", default=[0.25], help="forced-skip configurations")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--requests-per-client", type=int, default=3, help="requests each client sends per burst")
    p.add_argument("--reps", type=int, default=2, help="bursts per configuration and concurrency")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=8, help="the servers' --max-batch")
    p.add_argument("--serial", action=argparse.BooleanOptionalAction, default=True,
                   help="also run dense_serial: the dense server one request at a time (--max-batch 1)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--planning-share", type=float, default=0.0,
                   help="fraction of requests that are planning steps (GSM8K problems, no tools), spread evenly")
    p.add_argument("--pattern", action="store_true",
                   help="also routed_pattern: the routed server with --schedule pattern (skip-pattern-aware "
                        "admission) beside routed (fcfs); meaningful with a trained --adapter and --planning-share")
    p.add_argument("--prefill-thread", action="store_true",
                   help="also every batched configuration with `serve --prefill-thread` (name suffix _pt): "
                        "newcomers prefilled on a second thread while the batch decodes")
    p.add_argument("--dtypes", nargs="+", default=["auto"], choices=list(DTYPE_SUFFIX),
                   help="run every configuration in each of these dtypes (the servers' --dtype)")
    p.add_argument("--server-threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                   help="torch threads per server (OMP_NUM_THREADS in its environment; default: this process's "
                        "OMP_NUM_THREADS, else 1). One server is busy at a time, so a quiet machine can give it "
                        "every core")
    p.add_argument("--output", default=None)
    args = p.parse_args()
    args.model = args.model or OFFLINE_MODEL  # the packaged offline default
    if args.server_threads < 1:
        p.error("--server-threads must be >= 1")

    import openai

    batch = ["--max-batch", str(args.max_batch)]
    configs = {"dense": ["--dense", *batch], "routed": batch}
    for f in args.skip_fraction:
        configs[f"skip{f:g}"] = ["--skip-fraction", str(f), *batch]
    if args.pattern:
        configs["routed_pattern"] = [*batch, "--schedule", "pattern"]
    # `serve` prefills on a second thread by default; the plain configurations turn it off, the _pt twins on
    batched = list(configs.items())
    configs = {name: [*extra, "--no-prefill-thread"] for name, extra in batched}
    if args.prefill_thread:  # each batched configuration again with its newcomers prefilled on a second thread
        configs.update({f"{name}_pt": [*extra, "--prefill-thread"] for name, extra in batched})
    if args.serial:
        configs["dense_serial"] = ["--dense", "--max-batch", "1"]
    dtype_of = {name + DTYPE_SUFFIX[dt]: dt for dt in args.dtypes for name in configs}
    configs = {name + DTYPE_SUFFIX[dt]: [*extra, "--dtype", dt] for dt in args.dtypes for name, extra in configs.items()}
    n_req = max(args.requests_per_client * max(args.concurrency), 8)
    reqs = bfcl_requests(n_req)
    if not 0.0 <= args.planning_share < 1.0:
        p.error("--planning-share must be in [0, 1)")
    if args.planning_share:
        reqs = mixed(reqs, gsm8k_requests(n_req), args.planning_share)
    servers = {name: ServerProc(name, args.model, extra, args.adapter if name.startswith("routed") else None,
                                 args.server_threads)
               for name, extra in configs.items()}
    try:
        for s in servers.values():
            s.wait()
        clients = {n: openai.OpenAI(base_url=s.base_url, api_key="unused", max_retries=0, timeout=600)
                   for n, s in servers.items()}
        for cl in clients.values():
            burst(cl, reqs, args.warmup, 1, args.max_tokens)
        results: dict = {name: {} for name in configs}
        for c in args.concurrency:
            runs = {name: [] for name in configs}
            for rep in range(args.reps):
                for name, cl in clients.items():
                    b = burst(cl, reqs, args.requests_per_client * c, c, args.max_tokens)
                    runs[name].append(b)
                    tokens = sum(r["tokens"] for r in b["records"])
                    print(f"c={c} rep={rep} {name}: {len(b['records'])} ok, {len(b['errors'])} errors, "
                          f"{tokens / b['wall']:.1f} tokens/s", file=sys.stderr, flush=True)
            for name in configs:
                results[name][f"c{c}"] = summarize(runs[name])
    finally:
        for s in servers.values():
            s.stop()
    ratios = {}
    lo, hi = f"c{min(args.concurrency)}", f"c{max(args.concurrency)}"
    for name in configs:
        r = results[name]
        ratios[f"{name}_{hi}_vs_{lo}"] = {"tokens_per_s": r[hi]["tokens_per_s_median"] / r[lo]["tokens_per_s_median"],
                                         "p95_vs_lone_p50": r[hi]["p95_s"] / r[lo]["p50_s"]}
        if lo == "c1":
            # Little's law for a closed loop (each client sends its next request when answered): mean latency at c
            # clients = c / requests per s, so mean latency / lone latency = c / (tokens/s ratio) at equal lengths.
            # A p95 target of k x the lone latency therefore needs the tokens/s ratio to reach at least c / k.
            ratios[f"{name}_{hi}_vs_{lo}"]["mean_latency_bound_littles_law"] = (
                max(args.concurrency) / ratios[f"{name}_{hi}_vs_{lo}"]["tokens_per_s"])
        base = "dense" + DTYPE_SUFFIX[dtype_of[name]]  # each configuration against dense in its own dtype
        if name == base or base not in results:
            continue
        for c in args.concurrency:
            d, x = results[base][f"c{c}"], r[f"c{c}"]
            ratios[f"{name}_vs_{base}_c{c}"] = {"tokens_per_s": x["tokens_per_s_median"] / d["tokens_per_s_median"],
                                               "p50": x["p50_s"] / d["p50_s"], "p95": x["p95_s"] / d["p95_s"]}
    out = {
        "benchmark": "serve_load", "model": args.model, "adapter": args.adapter, "max_tokens": args.max_tokens,
        "requests_per_client": args.requests_per_client, "reps": args.reps, "concurrency": args.concurrency,
        "max_batch": args.max_batch, "dtypes": args.dtypes,
        "prompts": "BFCL simple_python questions + tools"
                   + (f", {args.planning_share:.0%} GSM8K train problems (no tools)" if args.planning_share else ""), "results": results, "ratios": ratios,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "loadavg_at_end": os.getloadavg()},
        "server_threads": args.server_threads,
        "note": "continuous batching up to max_batch rows per server; one server busy at a time; timings noisy on a "
                "shared machine: compare within a run",
    }
    if args.output:
        from layerroute.atomic import write_text_atomic

        write_text_atomic(args.output, json.dumps(out, indent=2))  # whole or not at all, like every other output
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
