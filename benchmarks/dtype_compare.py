"""fp32 vs bf16 on the CPU, in one run: training tokens/s, prefill and decode ms/token, and what bf16 costs in quality.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/dtype_compare.py --model smollm2-135m-instruct \\
        --model /tmp/qwen/qwen.gguf --output benchmarks/results/dtype_compare_cpu_t1.json

For each --model, the same base is loaded twice (model.dtype float32 and bfloat16), each with the config's routers
and a fresh LoRA (peft keeps LoRA fp32 on a bf16 base; its B starts at zero, so both sides are the base model), and
compared on real steps of the config's data rendered with that model's tokenizer (contexts up to --max-context):

- quality (`--quality-steps` eval steps, half tool calls, half planning): the mean target NLL of each step,
  teacher-forced, bf16 - fp32 (the fp32 model is the reference), with a paired 95% interval; the share of target
  positions whose argmax agrees; and greedy generation of `--new-tokens` tokens (routed_generate, LoRA merged,
  every gate open): the fraction of steps whose tokens are identical in both dtypes, and the mean share of tokens
  generated before the first difference.
- inference speed (the first `--timing-steps` of those steps, `--timing-new-tokens` each): routed_generate's time to
  first token per prompt token (prefill ms/token) and its decode ms/token, summed over the steps of a repetition.
- training speed: one optimizer step of LoRA + routers (RoutedStepLoss, mix mode, AdamW, frozen weights in the
  model's dtype) on a micro-batch of `--train-batch` real training steps; tokens/s = real tokens / step time.
- a 512x896 @ 896x4864 matmul (Qwen2.5-0.5B's MLP up-projection at 512 tokens): GFLOPS per dtype.

Every timed measurement interleaves the two dtypes (the order alternates each repetition) after `--warmup` untimed
rounds; min and median over `--reps`. The machine is shared: compare the ratio within this run, not across runs.
The last line printed is the whole result as one JSON line (also written, atomically, to --output).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time

import torch

DTYPES = ("float32", "bfloat16")
SIZE_ARGS = ("config", "overrides", "quality_steps", "new_tokens", "timing_steps", "timing_new_tokens", "max_context",
             "train_batch", "reps", "train_reps", "warmup", "threads")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _stats(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "n": len(values)}


def _order(rep: int) -> tuple[str, ...]:
    return DTYPES if rep % 2 == 0 else DTYPES[::-1]


def matmul_gflops(reps: int) -> dict:
    """GFLOPS of a 512x896 @ 896x4864 matmul per dtype, best of `reps` (interleaved)."""
    gen = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(512, 896, generator=gen), torch.randn(896, 4864, generator=gen)
    pairs = {"float32": (a32, b32), "bfloat16": (a32.bfloat16(), b32.bfloat16())}
    best = {d: math.inf for d in DTYPES}
    for rep in range(reps + 1):
        for d in _order(rep):
            a, b = pairs[d]
            t0 = time.perf_counter()
            for _ in range(5):
                a @ b
            if rep:
                best[d] = min(best[d], (time.perf_counter() - t0) / 5)
    flop = 2 * 512 * 896 * 4864
    out = {d: flop / best[d] / 1e9 for d in DTYPES}
    out["speedup"] = out["bfloat16"] / out["float32"]
    return out


def pick_steps(steps, n: int, max_context: int, seed_offset: int = 0) -> list:
    """Up to n steps with contexts <= max_context, half tool calls and half planning (in data order)."""
    out = []
    for kind, k in (("tool_call", (n + 1) // 2), ("planning", n // 2)):
        pool = [s for s in steps if s.step_type == kind and s.context_length <= max_context]
        out += pool[seed_offset : seed_offset + k]
    return out


@torch.no_grad()
def step_nll(rm, step) -> tuple[float, float, torch.Tensor]:
    """(mean target NLL, number of targets, argmax ids [N]) of one step, teacher-forced at full depth."""
    from layerroute.nn.losses import target_logits
    from layerroute.nn.routed import routing

    ids = torch.tensor([step.input_ids])
    labels = torch.tensor([step.labels])
    with routing(rm.model, "off"):
        logits, targets, _ = target_logits(rm.model, ids, torch.ones_like(ids), labels)
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="mean")
    return float(nll), int(targets.numel()), logits.argmax(-1)


def quality(rms: dict, steps: list, new_tokens: int) -> dict:
    from layerroute.infer.generate import routed_generate

    diffs, agree, total, identical, prefix = [], 0, 0, [], []
    per_type: dict[str, list[float]] = {}
    nll = {d: [] for d in DTYPES}
    for i, step in enumerate(steps):
        res, gen = {}, {}
        for d in _order(i):
            res[d] = step_nll(rms[d], step)
            gen[d] = routed_generate(rms[d], [step.input_ids[: step.context_length]], max_new_tokens=new_tokens,
                                     eos_token_id=None).tokens[0]
        for d in DTYPES:
            nll[d].append(res[d][0])
        diff = res["bfloat16"][0] - res["float32"][0]
        diffs.append(diff)
        per_type.setdefault(step.step_type, []).append(diff)
        agree += int((res["bfloat16"][2] == res["float32"][2]).sum())
        total += res["float32"][1]
        a, b = gen["float32"], gen["bfloat16"]
        same = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        identical.append(a == b)
        prefix.append(same / max(len(a), 1))
        log(f"  quality {i + 1}/{len(steps)} {step.step_type}: NLL fp32 {res['float32'][0]:.4f} bf16 "
            f"{res['bfloat16'][0]:.4f}; greedy identical {a == b} (first {same} of {len(a)} tokens)")
    n = len(diffs)
    mean = statistics.fmean(diffs)
    half = 1.96 * statistics.stdev(diffs) / math.sqrt(n) if n > 1 else float("nan")
    return {
        "steps": n, "new_tokens": new_tokens, "target_tokens": total,
        "nll_mean": {d: statistics.fmean(nll[d]) for d in DTYPES},
        "nll_diff_bf16_minus_fp32": {"mean": mean, "ci95": [mean - half, mean + half],
                                     "max_abs": max(abs(x) for x in diffs)},
        "nll_diff_by_type": {k: statistics.fmean(v) for k, v in per_type.items()},
        "teacher_forced_argmax_agreement": agree / max(total, 1),
        "greedy_identical_fraction": sum(identical) / n,
        "greedy_identical_prefix_fraction_mean": statistics.fmean(prefix),
    }


def inference_speed(rms: dict, steps: list, new_tokens: int, reps: int, warmup: int) -> dict:
    """Prefill ms/token (TTFT / prompt tokens) and decode ms/token of routed_generate, summed over `steps`."""
    from layerroute.infer.generate import routed_generate

    # wall time, and process CPU time (cpu_*): on a shared machine the CPU time is what the work itself cost (other
    # processes still compete for caches and memory bandwidth, which it does not remove)
    parts = ("prefill", "decode", "cpu_prefill", "cpu_decode")
    runs = {d: {p: [] for p in parts} for d in DTYPES}
    prompt_tokens = sum(s.context_length for s in steps)
    decode_tokens = len(steps) * (new_tokens - 1)
    for rep in range(warmup + reps):
        acc = {d: {p: 0.0 for p in parts} for d in DTYPES}
        for i, step in enumerate(steps):
            for d in _order(rep + i):
                r = routed_generate(rms[d], [step.input_ids[: step.context_length]], max_new_tokens=new_tokens,
                                    eos_token_id=None)
                for prefix in ("", "cpu_"):
                    acc[d][f"{prefix}prefill"] += getattr(r, f"{prefix}ttft_s") / prompt_tokens
                    acc[d][f"{prefix}decode"] += getattr(r, f"{prefix}decode_s_per_token") * (new_tokens - 1) / decode_tokens
        if rep >= warmup:
            for d in DTYPES:
                for p in parts:
                    runs[d][p].append(1e3 * acc[d][p])
        log(f"  inference rep {rep + 1}/{warmup + reps}: " + " ".join(
            f"{d} prefill {1e3 * acc[d]['prefill']:.2f} (cpu {1e3 * acc[d]['cpu_prefill']:.2f}) decode "
            f"{1e3 * acc[d]['decode']:.1f} (cpu {1e3 * acc[d]['cpu_decode']:.1f}) ms/token" for d in DTYPES))
    out = {"steps": len(steps), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens}
    for part in parts:
        out[f"{part}_ms_per_token"] = {d: _stats(runs[d][part]) for d in DTYPES}
        out[f"{part}_speedup_median"] = (out[f"{part}_ms_per_token"]["float32"]["median"]
                                         / out[f"{part}_ms_per_token"]["bfloat16"]["median"])
        out[f"{part}_speedup_min"] = (out[f"{part}_ms_per_token"]["float32"]["min"]
                                      / out[f"{part}_ms_per_token"]["bfloat16"]["min"])
    return out


def training_speed(rms: dict, batch: dict, reps: int, warmup: int) -> dict:
    """Tokens/s of one LoRA + router optimizer step (forward, backward, AdamW) per dtype, on the same batch."""
    from layerroute.config import TrainConfig
    from layerroute.train import RoutedStepLoss, loss_parts

    tc = TrainConfig()  # soft_mean penalty: the LM loss and a router term, the step every recipe pays
    tokens = int(batch["attention_mask"].sum())
    targets = int((batch["labels"][:, 1:] != -100).sum())
    setup = {}
    for d in DTYPES:
        model = rms[d].model
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        setup[d] = (RoutedStepLoss(model, tc), torch.optim.AdamW(params, lr=1e-5), params)
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"], batch["decision_mask"])
    times = {d: [] for d in DTYPES}
    cpu_times = {d: [] for d in DTYPES}  # process CPU time (see inference_speed)
    first_loss = {}
    for rep in range(warmup + reps):
        for d in _order(rep):
            step_module, opt, _ = setup[d]
            t0, c0 = time.perf_counter(), time.process_time()
            row_sum, _, prob, gate, _ = step_module(*args, batch["is_tool_call"])
            parts = loss_parts(tc, row_sum, prob, gate, batch["is_tool_call"], tokens_total=targets,
                               rows_total=row_sum.shape[0], micro_total=1)
            parts.total.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
            first_loss.setdefault(d, float(parts.lm.detach()))
            if rep >= warmup:
                times[d].append(elapsed)
                cpu_times[d].append(cpu)
        log(f"  training rep {rep + 1}/{warmup + reps}: "
            + " ".join(f"{d} {tokens / times[d][-1]:.0f} (cpu {tokens / cpu_times[d][-1]:.0f}) tokens/s"
                       for d in DTYPES if times[d]))
    state_dtypes = sorted({str(s["exp_avg"].dtype) for d in DTYPES for s in setup[d][1].state.values()})
    for d in DTYPES:
        rms[d].model.eval()
    out = {"rows": int(batch["input_ids"].shape[0]), "tokens_per_step": tokens, "target_tokens": targets,
           "tokens_per_s": {d: {"best": tokens / min(times[d]), "median": tokens / statistics.median(times[d])}
                            for d in DTYPES},
           "cpu_tokens_per_s": {d: {"best": tokens / min(cpu_times[d]),
                                    "median": tokens / statistics.median(cpu_times[d])} for d in DTYPES},
           "first_step_lm_loss": first_loss, "optimizer_state_dtypes": state_dtypes,
           "trainable_dtypes": sorted({str(p.dtype) for d in DTYPES for p in setup[d][2]})}
    out["speedup_median"] = out["tokens_per_s"]["bfloat16"]["median"] / out["tokens_per_s"]["float32"]["median"]
    out["speedup_best"] = out["tokens_per_s"]["bfloat16"]["best"] / out["tokens_per_s"]["float32"]["best"]
    for stat in ("median", "best"):
        out[f"cpu_speedup_{stat}"] = (out["cpu_tokens_per_s"]["bfloat16"][stat]
                                      / out["cpu_tokens_per_s"]["float32"][stat])
    return out


def compare_model(name: str, args, run_cfg) -> dict:
    from layerroute.adapters import build_routed_model
    from layerroute.data.build import load_steps
    from layerroute.data.collate import collate_steps
    from layerroute.model import load_base

    t0 = time.perf_counter()
    rms = {}
    for d in DTYPES:
        cfg = dataclasses.replace(run_cfg.model, name=name, dtype=d, device="cpu", tokenizer=None)
        torch.manual_seed(0)  # the same LoRA A init on both sides
        rms[d] = build_routed_model(cfg, run_cfg.router, run_cfg.lora, loaded=load_base(cfg))
        rms[d].model.eval()
    tok = rms["float32"].tokenizer
    data = load_steps(dataclasses.replace(run_cfg.data, progress=False), tok)
    steps = pick_steps(list(data.eval), args.quality_steps, args.max_context)
    train_steps = pick_steps(list(data.train), args.train_batch, args.max_context)
    log(f"[{name}] {rms['float32'].num_layers} blocks; {len(steps)} eval steps, {len(train_steps)} train steps "
        f"(loaded in {time.perf_counter() - t0:.0f} s)")
    out = {"model": name, "num_layers": rms["float32"].num_layers, "hidden_size": rms["float32"].config.hidden_size,
           "command": " ".join(sys.argv), "sizes": {k: getattr(args, k) for k in SIZE_ARGS}}
    out["quality"] = quality(rms, steps, args.new_tokens)
    out["inference"] = inference_speed(rms, steps[: args.timing_steps], args.timing_new_tokens, args.reps,
                                       args.warmup)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out["training"] = training_speed(rms, collate_steps(train_steps, pad), args.train_reps, args.warmup)
    out["wall_s"] = time.perf_counter() - t0
    q, inf, tr = out["quality"], out["inference"], out["training"]
    log(f"[{name}] bf16/fp32 (process CPU time): training {tr['cpu_speedup_median']:.2f}x, prefill "
        f"{inf['cpu_prefill_speedup_median']:.2f}x, decode {inf['cpu_decode_speedup_median']:.2f}x; NLL {q['nll_diff_bf16_minus_fp32']['mean']:+.4f}, greedy "
        f"identical {q['greedy_identical_fraction']:.0%} ({out['wall_s']:.0f} s)")
    return out


def main(argv: list[str] | None = None) -> int:
    from layerroute.config import add_config_arguments, add_model_argument, raw_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_argument(parser, repeat=True)
    add_config_arguments(parser, required=False, default="configs/offline-smollm2.yaml")
    parser.add_argument("--quality-steps", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per quality step")
    parser.add_argument("--timing-steps", type=int, default=4)
    parser.add_argument("--timing-new-tokens", type=int, default=16)
    parser.add_argument("--max-context", type=int, default=384, help="longest context of a chosen step (tokens)")
    parser.add_argument("--train-batch", type=int, default=2, help="real training steps per timed micro-batch")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--train-reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None, help="also write the JSON line here (atomically)")
    parser.add_argument("--append-to", default=None, metavar="JSON",
                        help="start from this earlier result and add this run's models to it (each model keeps its "
                             "own command and sizes), e.g. to add a model measured in a later run")
    args = parser.parse_args(argv)
    if args.timing_new_tokens < 2 or args.quality_steps < 2 or args.reps < 1 or args.train_reps < 1:
        parser.error("--timing-new-tokens and --quality-steps must be >= 2, --reps and --train-reps >= 1")
    torch.set_num_threads(args.threads)

    from layerroute.config import RunConfig
    from layerroute.eval.bench import emit_json_line
    from layerroute.model import machine

    t0 = time.perf_counter()
    run_cfg = RunConfig.from_dict(raw_config(args))
    result = {
        "benchmark": "dtype_compare", "command": " ".join(sys.argv), "config": args.config,
        "threads": torch.get_num_threads(), "cpu": machine()["cpu"],
        "torch": torch.__version__, "matmul_512x896x4864_gflops": matmul_gflops(args.reps),
        "models": [],
    }
    if args.append_to:
        earlier = json.loads(open(args.append_to).read())
        result["models"] = earlier["models"]
        result["earlier_runs"] = earlier.get("earlier_runs", []) + [
            {k: v for k, v in earlier.items() if k not in ("models", "earlier_runs")}]
    log(f"matmul GFLOPS: {result['matmul_512x896x4864_gflops']}")
    for name in args.model or ["smollm2-135m-instruct"]:
        result["models"].append(compare_model(name, args, run_cfg))
        result["wall_s"] = time.perf_counter() - t0
        if args.output:  # a partial result survives a kill between models
            from layerroute.atomic import write_text_atomic

            write_text_atomic(args.output, json.dumps(result) + "\n")
    result["wall_s"] = time.perf_counter() - t0
    emit_json_line(result, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
