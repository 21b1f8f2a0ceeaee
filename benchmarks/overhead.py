"""Router overhead, measured in pairs: what the routers cost when they skip nothing.

    PYTHONPATH=. python benchmarks/overhead.py --model smollm2-135m-instruct --threads 1 --output overhead.json

1. Training step (forward + backward + AdamW step on the trainable parameters), same batch:
   routed + LoRA (mode 'mix', routers deciding, straight-through gates) vs LoRA only (the routed layers swapped
   out for their plain blocks). Target: < 3%.
2. Inference, LoRA merged: a prefill forward, and decode forwards with a KV cache (plain and routed alternating
   token by token on their own caches), all gates open (mode 'skip', routers deciding at the prefill; every
   block runs) vs the plain model. Target: < 1%.
3. The parts alone, free of memory-bandwidth noise: one RoutedLayer call around an identity block vs calling
   the block directly (the per-block, per-forward Python cost), scaled to a decode token; and every block's
   decision at the prefill (pool, router, gate), timed without the blocks, as a fraction of the prefill.

The two sides of each comparison alternate in ABBA order (A B, then B A) so slow drift from other processes on
a shared machine hits both alike; the overhead is the median over pairs of (B / A - 1), with min/median of
each side. Wall clock and process CPU time are both reported. The last line is the JSON result.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from layerroute.config import add_model_argument
from layerroute.config.flags import OFFLINE_MODEL
from layerroute.eval.bench import emit_json_line
from layerroute.infer.generate import inference_weights, load_for_inference, plain_blocks
from layerroute.nn.kv_cache import RoutedCache
from layerroute.nn.routed import RoutedLayer, find_routed_layers, routing
from layerroute.nn.state import RoutingState


def _timed(fn) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def paired(base, other, reps: int, warmup: int = 1) -> dict:
    """ABBA-interleaved timings of two callables; overhead = other / base - 1 per pair."""
    for _ in range(warmup):
        base()
        other()
    a_w, a_c, b_w, b_c = [], [], [], []
    for rep in range(reps):
        order = (("a", base), ("b", other)) if rep % 2 == 0 else (("b", other), ("a", base))
        for name, fn in order:
            w, c = _timed(fn)
            (a_w if name == "a" else b_w).append(w)
            (a_c if name == "a" else b_c).append(c)

    def side(w, c):
        return {"wall_ms_min": 1e3 * min(w), "wall_ms_median": 1e3 * statistics.median(w),
                "cpu_ms_min": 1e3 * min(c), "cpu_ms_median": 1e3 * statistics.median(c)}

    return {
        "base": side(a_w, a_c),
        "routed": side(b_w, b_c),
        "overhead_wall_median_of_pairs": statistics.median(b / a - 1 for a, b in zip(a_w, b_w, strict=True)),
        "overhead_cpu_median_of_pairs": statistics.median(b / a - 1 for a, b in zip(a_c, b_c, strict=True)),
        "overhead_wall_min": min(b_w) / min(a_w) - 1,
        "overhead_cpu_min": min(b_c) / min(a_c) - 1,
        "reps": reps,
    }


def training_overhead(rm, batch: int, seq: int, reps: int) -> dict:
    from layerroute.nn.routed import gate_records

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 30000, (batch, seq), generator=gen)
    mask = torch.zeros(batch, seq)
    mask[:, : seq // 2] = 1  # the first half is context, the second the step's targets
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    params = [p for p in rm.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)  # a tiny lr: the weights barely move between timed steps
    rm.model.train()

    def lora_only():
        with plain_blocks(rm.model):
            loss = rm.model(input_ids=ids, labels=labels).loss
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def routed():
        with routing(rm.model, "mix", decision_mask=mask):
            out = rm.model(input_ids=ids, labels=labels)
            probs = torch.stack([r.prob for r in gate_records(rm.model)])  # the skip regulariser's input
            (out.loss + 1e-3 * probs.mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        return {"batch": batch, "seq": seq, **paired(lora_only, routed, reps)}
    finally:
        rm.model.eval()


def inference_overhead(rm, prompt: int, decode: int, reps: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(100, 30000, (1, prompt), generator=gen)
    token = torch.tensor([[1234]])
    out = {}
    with torch.no_grad(), inference_weights(rm) as model:
        def prefill_plain():
            with plain_blocks(model):
                model(input_ids=ids, use_cache=True, logits_to_keep=1)

        def prefill_routed():
            with routing(rm.model, "skip"):
                model(input_ids=ids, past_key_values=RoutedCache(), use_cache=True, logits_to_keep=1)

        out["prefill"] = {"tokens": prompt, **paired(prefill_plain, prefill_routed, reps)}

        # Decode: two caches prefilled once (plain and routed), then single decode forwards alternate between them
        # token by token (ABBA), so both see the same context lengths and the same load; one ratio per pair.
        with plain_blocks(model):
            plain_cache = model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
        routed_cache = RoutedCache()
        with routing(rm.model, "skip") as state:  # the step's decision (all open) is taken here and kept for decode
            model(input_ids=ids, past_key_values=routed_cache, use_cache=True, logits_to_keep=1)
            decided = state.decisions()
            decided.plans  # noqa: B018 - derived once here, as the prefill does, not inside the timed decode

        def plain_token():
            with plain_blocks(model):
                return _timed(lambda: model(input_ids=token, past_key_values=plain_cache, use_cache=True))

        def routed_token():
            with routing(rm.model, "skip") as state:
                state.impose(decided)  # continue the prefilled step
                return _timed(lambda: model(input_ids=token, past_key_values=routed_cache, use_cache=True))

        for _ in range(2):  # warm-up
            plain_token(), routed_token()
        a, b = [], []
        for rep in range(decode):
            if rep % 2 == 0:
                a.append(plain_token()), b.append(routed_token())
            else:
                b.append(routed_token()), a.append(plain_token())
        a_w, a_c = [x[0] for x in a], [x[1] for x in a]
        b_w, b_c = [x[0] for x in b], [x[1] for x in b]
        out["decode"] = {
            "context_start": prompt, "tokens": decode,
            "base": {"wall_ms_per_token_min": 1e3 * min(a_w), "wall_ms_per_token_median": 1e3 * statistics.median(a_w),
                     "cpu_ms_per_token_min": 1e3 * min(a_c), "cpu_ms_per_token_median": 1e3 * statistics.median(a_c)},
            "routed": {"wall_ms_per_token_min": 1e3 * min(b_w),
                       "wall_ms_per_token_median": 1e3 * statistics.median(b_w), "cpu_ms_per_token_min": 1e3 * min(b_c),
                       "cpu_ms_per_token_median": 1e3 * statistics.median(b_c)},
            "overhead_wall_median_of_pairs": statistics.median(y / x - 1 for x, y in zip(a_w, b_w, strict=True)),
            "overhead_cpu_median_of_pairs": statistics.median(y / x - 1 for x, y in zip(a_c, b_c, strict=True)),
            "overhead_wall_min": min(b_w) / min(a_w) - 1,
            "overhead_cpu_min": min(b_c) / min(a_c) - 1,
            "overhead_cpu_median": statistics.median(b_c) / statistics.median(a_c) - 1,
        }
    return out


def wrapper_cost(num_layers: int, calls: int = 20000) -> dict:
    """Per-call cost of RoutedLayer (skip mode, decision taken, gate open) around an identity block."""

    class Identity(torch.nn.Module):
        def forward(self, hidden_states, **kwargs):
            return hidden_states

    from layerroute.nn.router import Router

    state = RoutingState(num_layers=1, mode="skip")
    block = Identity()
    layer = RoutedLayer(block, Router(8), 0, state)
    state.layers.append(layer)
    h = torch.zeros(1, 1, 8)
    with torch.no_grad():
        layer(h)  # decides (open)
        t0 = time.perf_counter()
        for _ in range(calls):
            block(h, attention_mask=None, position_embeddings=None)
        direct = (time.perf_counter() - t0) / calls
        t0 = time.perf_counter()
        for _ in range(calls):
            layer(h, attention_mask=None, position_embeddings=None)
        wrapped = (time.perf_counter() - t0) / calls
    return {"direct_us": 1e6 * direct, "wrapped_us": 1e6 * wrapped, "added_us_per_block": 1e6 * (wrapped - direct),
            "added_us_per_token": 1e6 * (wrapped - direct) * num_layers}


def decision_cost(rm, prompt: int, iters: int = 50) -> dict:
    """What the routers add to a prefill: every block's decision (pool, router, gate, row plan) on a
    [1, prompt, H] input, timed alone (no block runs), so memory-bandwidth noise from other processes barely
    touches it."""
    from layerroute.nn.state import row_plan

    layers = find_routed_layers(rm.model)
    hidden = torch.randn(1, prompt, rm.config.hidden_size)
    with torch.no_grad(), routing(rm.model, "skip"):
        for layer in layers:  # warm-up
            row_plan(layer.decide(hidden))
        times = []
        for _ in range(iters):
            c0 = time.process_time()
            for layer in layers:
                row_plan(layer.decide(hidden))
            times.append(time.process_time() - c0)
    return {"prompt": prompt, "cpu_ms_all_blocks_min": 1e3 * min(times),
            "cpu_ms_all_blocks_median": 1e3 * statistics.median(times)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_argument(p)
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--train-seq", type=int, default=128)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--decode", type=int, default=200, help="decode tokens, alternating plain/routed one by one")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--train-reps", type=int, default=6)
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    args.model = args.model or OFFLINE_MODEL  # the packaged offline default
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rm = load_for_inference(args.model, None)  # routers at init (every gate open) + LoRA
    from layerroute.model import configure_trainable

    configure_trainable(rm.model)
    result = {"model": args.model, "dtype": rm.dtype, "threads": torch.get_num_threads(), "device": str(rm.device),
              "command": " ".join(sys.argv)}
    result["inference"] = inference_overhead(rm, args.prompt, args.decode, args.reps)
    print(f"inference: {json.dumps(result['inference'])}", file=sys.stderr)
    if not args.skip_training:
        result["training"] = training_overhead(rm, args.train_batch, args.train_seq, args.train_reps)
        print(f"training: {json.dumps(result['training'])}", file=sys.stderr)
    wc = wrapper_cost(rm.num_layers)
    base_decode_ms = result["inference"]["decode"]["base"]["cpu_ms_per_token_min"]
    wc["fraction_of_decode_token"] = wc["added_us_per_token"] / (1e3 * base_decode_ms)
    result["wrapper"] = wc
    dc = decision_cost(rm, args.prompt)
    dc["fraction_of_prefill"] = dc["cpu_ms_all_blocks_median"] / result["inference"]["prefill"]["base"]["cpu_ms_min"]
    result["decisions"] = dc
    result["targets"] = {
        "training_overhead_lt_3pct": result.get("training", {}).get("overhead_cpu_median_of_pairs"),
        "inference_prefill_overhead_lt_1pct": result["inference"]["prefill"]["overhead_cpu_median_of_pairs"],
        "inference_decode_overhead_lt_1pct": result["inference"]["decode"]["overhead_cpu_median_of_pairs"],
        "decisions_fraction_of_prefill": dc["fraction_of_prefill"],
        "wrapper_fraction_of_decode_token": wc["fraction_of_decode_token"],
    }
    result["wall_s"] = time.perf_counter() - t0
    emit_json_line(result, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
