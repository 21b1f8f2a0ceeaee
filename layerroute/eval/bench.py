"""Wall-clock latency of routed vs dense generation, with the analytic ideal next to each measured speedup.

    layerroute bench --model smollm2-135m-instruct --skip-fraction 0.25 0.5 --batch 1 8 --output bench.json

(the command line: `layerroute.cli.bench`; this module measures and tabulates)

For each scenario (tool-call-like: short prompt, short output; planning-like: longer prompt and output) and
batch size, one repetition runs every configuration once, interleaved, so that load from other processes hits
them alike (these machines are shared; compare within a run, never across runs):

- ``dense``: the plain transformers model (routed layers swapped out for their blocks), LoRA merged, KV cache:
  the best dense baseline.
- ``open``: the routed model with every gate forced open (routers evaluated, every block runs): its cost over
  ``dense`` is the router overhead.
- ``skip<F>``: a forced pattern skipping round(F * L) blocks spread evenly over the middle (never the first two
  nor the last), or ``routed`` with ``--adapter``: the adapter's routers decide per prompt.
- ``mixed<F>`` (batch > 1): half the rows skip the pattern, half run dense, served in one call (each block runs on
  the rows that run it); ``grouped<F>`` serves the same rows as two sequential calls, one per pattern (the
  alternative design), for comparison.

Reported per configuration: time to first token, decode ms/token, tokens/s and whole-step latency (min and
median over repetitions after warm-up). Per skip configuration: measured speedup over dense for decode and for
the whole step, ``ideal_speedup = 1 / (1 - total FLOPs skipped)`` from `layerroute.flops` (LM head and routers
included), and ``efficiency = measured / ideal``. The terminal gets a short table (medians); the whole result is one
JSON line written to ``--output`` (``--json``: printed instead of the table, as the last line).
"""

from __future__ import annotations

import json
import statistics

import torch

from .. import flops
from ..atomic import write_text_atomic
from ..infer.generate import (
    inference_weights,
    pad_left,
    plain_blocks,
    routed_generate,
    run_generate,
    skip_pattern,
)

TIMING_KEYS = ("ttft_s", "decode_s_per_token", "total_s", "cpu_ttft_s", "cpu_decode_s_per_token", "cpu_total_s")
DEFAULT_SCENARIOS = {"tool": (64, 16), "planning": (256, 64)}  # name -> (prompt tokens, new tokens)


def _prompts(vocab: int, batch: int, length: int, seed: int) -> list[list[int]]:
    """Fixed random token ids (speed does not depend on the text; every row has the same length, no padding)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, min(vocab, 30000), (batch, length), generator=gen).tolist()


def _stats(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def _summarise(runs: list[dict], batch: int, new_tokens: int) -> dict:
    out = {}
    for prefix in ("", "cpu_"):
        out[f"{prefix}ttft_ms"] = _stats([1e3 * r[f"{prefix}ttft_s"] for r in runs])
        out[f"{prefix}decode_ms_per_token"] = _stats([1e3 * r[f"{prefix}decode_s_per_token"] for r in runs])
        out[f"{prefix}step_ms"] = _stats([1e3 * r[f"{prefix}total_s"] for r in runs])
    out["tokens_per_s"] = _stats([batch * new_tokens / r["total_s"] for r in runs])
    return out


def _ideal(cfg, prompt: int, new: int, masks: list[list[bool]], router_hidden: int | None) -> dict:
    """Ideal speedups from FLOPs, summed over the batch rows (each row with its own gate pattern).

    step: the prefill of `prompt` tokens plus `new` generated ones through the blocks that run, LM head at the
    `new` positions generate() projects (the prefill keeps only the last position's logits), routers included.
    decode: the `new - 1` decode forwards only (routers decide at the prefill)."""
    steps = [flops.step_flops(cfg, prompt, new, m, router_hidden=router_hidden) for m in masks]
    step = flops.aggregate(steps)
    # the prefill alone: `prompt` tokens, the LM head at the last position only
    prefill = flops.aggregate([
        flops.step_flops(cfg, 0, prompt, m, lm_head_positions=1, router_hidden=router_hidden) for m in masks
    ])
    shape = flops.from_model_config(cfg)
    one_block = flops.block_flops(shape, new - 1, n_past=prompt + 1)
    head = flops.lm_head_flops(shape, new - 1)
    dense = sum(shape.num_hidden_layers * one_block + head for _ in masks)
    routed = sum(sum(m) * one_block + head for m in masks)
    return {
        "step": {
            "total_skipped_fraction": step["total_skipped_fraction"],
            "block_skipped_fraction": step["block_skipped_fraction"],
            "ideal_speedup": 1.0 / (1.0 - step["total_skipped_fraction"]),
        },
        "prefill": {"total_skipped_fraction": prefill["total_skipped_fraction"]},
        "decode": {
            "total_skipped_fraction": 1.0 - routed / dense,
            "ideal_speedup": dense / routed,
        },
    }


def _phase_weighted_ideal(dense: dict, ideal: dict, prefix: str, stat: str) -> float:
    """The step's ideal speedup if each phase shrank by its own FLOP fraction: dense prefill time (TTFT) x the
    prefill's FLOP ratio + dense decode time x the decode's. Unlike the FLOP-weighted `ideal_speedup` it weighs
    each FLOP by what it costs on this machine (a decode FLOP, memory-bound, costs far more than a prefill one)."""
    ttft, step = dense[f"{prefix}ttft_ms"][stat], dense[f"{prefix}step_ms"][stat]
    routed = ttft * (1 - ideal["prefill"]["total_skipped_fraction"]) + (step - ttft) * (
        1 - ideal["decode"]["total_skipped_fraction"]
    )
    return step / routed


def _speedup(dense: dict, routed: dict, ideal: dict) -> dict:
    out = {}
    for prefix in ("", "cpu_"):
        for part, key in (("decode", "decode_ms_per_token"), ("step", "step_ms")):
            key = prefix + key
            ideal_speedup = ideal[part]["ideal_speedup"]
            entry = out.setdefault(prefix + part, {
                "ideal_speedup": ideal_speedup, "total_skipped_fraction": ideal[part]["total_skipped_fraction"],
            })
            for stat in ("min", "median"):
                measured = dense[key][stat] / routed[key][stat]
                entry[f"measured_speedup_{stat}"] = measured
                entry[f"efficiency_{stat}"] = measured / ideal_speedup
                if part == "step":
                    phase = _phase_weighted_ideal(dense, ideal, prefix, stat)
                    entry[f"phase_weighted_ideal_{stat}"] = phase
                    entry[f"efficiency_vs_phase_weighted_{stat}"] = measured / phase
        out[prefix + "ttft_speedup_median"] = dense[prefix + "ttft_ms"]["median"] / routed[prefix + "ttft_ms"]["median"]
    return out


def _overhead(dense: dict, open_: dict) -> dict:
    out = {}
    for prefix in ("", "cpu_"):
        for key in ("step_ms", "decode_ms_per_token", "ttft_ms"):
            out[prefix + key] = {
                stat: open_[prefix + key][stat] / dense[prefix + key][stat] - 1.0 for stat in ("min", "median")
            }
    return out


def bench_scenario(rm, model, *, name, prompt_len, new_tokens, batch, configs, reps, warmup, seed, log) -> dict:
    """Time every configuration `reps` times (after `warmup` untimed rounds), interleaved round-robin with the
    order rotated each round."""
    prompts = _prompts(rm.config.vocab_size, batch, prompt_len, seed)
    ids, mask = pad_left(prompts, 0)
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    gates: dict[str, list[list[bool]]] = {}

    def once(config: str, spec) -> dict:
        kind, pattern = spec
        if kind == "dense":
            with plain_blocks(model):
                _, t = run_generate(model, ids, mask, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
            gates[config] = [[True] * rm.num_layers] * batch
            return t
        if kind == "grouped":  # one call per distinct pattern, sequentially
            total = {k: 0.0 for k in TIMING_KEYS}
            rows_by_pattern: dict[tuple, list[int]] = {}
            for row, p in enumerate(pattern):
                rows_by_pattern.setdefault(tuple(p), []).append(row)
            for p, rows in rows_by_pattern.items():
                r = routed_generate(rm, [prompts[i] for i in rows], max_new_tokens=new_tokens, eos_token_id=None,
                                    forced=list(p))
                for prefix in ("", "cpu_"):
                    # the last group's rows wait for every earlier group before their first token
                    total[f"{prefix}ttft_s"] = total[f"{prefix}total_s"] + getattr(r, f"{prefix}ttft_s")
                    total[f"{prefix}total_s"] += getattr(r, f"{prefix}total_s")
                    total[f"{prefix}decode_s_per_token"] += getattr(r, f"{prefix}decode_s_per_token")
            gates[config] = [list(p) for p in pattern]
            return total
        r = routed_generate(rm, prompts, max_new_tokens=new_tokens, eos_token_id=None, forced=pattern)
        gates[config] = r.gates
        return {k: getattr(r, k) for k in TIMING_KEYS}

    names = list(configs)
    for rep in range(warmup + reps):
        # rotate the order every repetition so no configuration always runs first (or right after another)
        for config in names[rep % len(names):] + names[: rep % len(names)]:
            t = once(config, configs[config])
            if rep >= warmup:
                runs[config].append(t)
        log(f"  {name} b{batch} rep {rep + 1}/{warmup + reps}: "
            + " ".join(f"{c}={1e3 * runs[c][-1]['total_s']:.0f}ms" for c in configs if runs[c]))
    summary = {c: _summarise(runs[c], batch, new_tokens) for c in configs}
    router_hidden = rm.router_spec.flop_width
    result = {
        "scenario": name, "batch": batch, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
        "configs": summary, "speedups": {},
    }
    if "open" in summary:
        result["router_overhead"] = _overhead(summary["dense"], summary["open"])
    for config in configs:
        if config in ("dense", "open"):
            continue
        ideal = _ideal(rm.config, prompt_len, new_tokens, gates[config], router_hidden)
        result["speedups"][config] = _speedup(summary["dense"], summary[config], ideal)
        result["speedups"][config]["skipped_blocks_per_row"] = [g.count(False) for g in gates[config]]
    return result


def run_bench(
    rm,
    *,
    skip_fractions: list[float] | None,
    batches: list[int],
    scenarios: dict[str, tuple[int, int]],
    reps: int,
    warmup: int,
    seed: int = 0,
    mixed: bool = True,
    log=print,
) -> dict:
    L = rm.num_layers
    patterns = {f: skip_pattern(L, f) for f in (skip_fractions or [])}
    results = []
    with torch.no_grad(), inference_weights(rm) as model:
        for name, (prompt_len, new_tokens) in scenarios.items():
            for batch in batches:
                configs: dict[str, tuple] = {"dense": ("dense", None), "open": ("routed", "open")}
                if not patterns:
                    configs["routed"] = ("routed", None)  # the adapter's routers decide
                for f, pattern in patterns.items():
                    configs[f"skip{f:g}"] = ("routed", pattern)
                    if batch > 1 and mixed:
                        per_row = [pattern if row % 2 == 0 else [True] * L for row in range(batch)]
                        configs[f"mixed{f:g}"] = ("routed", per_row)
                        configs[f"grouped{f:g}"] = ("grouped", per_row)
                results.append(bench_scenario(
                    rm, model, name=name, prompt_len=prompt_len, new_tokens=new_tokens, batch=batch,
                    configs=configs, reps=reps, warmup=warmup, seed=seed, log=log,
                ))
    return {
        "patterns": {f"{f:g}": "".join("1" if g else "." for g in p) for f, p in patterns.items()},
        "results": results,
    }


def bench_real_steps(rm, steps, *, reps: int, warmup: int, new_tokens: int | None = None, log=print) -> dict:
    """Real agent steps at batch 1: each step's own context, greedy for as many tokens as its gold target (or
    `new_tokens`), the adapter's routers deciding (`routed`) vs the plain LoRA-merged model (`dense`).

    One repetition runs every step through both configurations, the order alternating per step and per
    repetition; a repetition's time is the sum over its steps. The ideal speedup sums the analytic FLOPs of every
    step with the gates the routers actually chose (prefill of the context, `new` tokens, LM head, routers).
    """
    router_hidden = rm.router_spec.flop_width
    runs: dict[str, list[dict]] = {"dense": [], "routed": []}
    gates: list[list[bool]] = []
    plans = [(s.input_ids[: s.context_length], new_tokens or s.length) for s in steps]
    with torch.no_grad(), inference_weights(rm) as model:
        for rep in range(warmup + reps):
            totals = {c: {k: 0.0 for k in TIMING_KEYS} for c in runs}
            for i, (prompt, new) in enumerate(plans):
                ids, mask = pad_left([prompt], 0)
                order = ["dense", "routed"] if (rep + i) % 2 == 0 else ["routed", "dense"]
                for config in order:
                    if config == "dense":
                        with plain_blocks(model):
                            _, t = run_generate(model, ids, mask, max_new_tokens=new, eos_token_id=None,
                                                pad_token_id=0)
                    else:
                        r = routed_generate(rm, [prompt], max_new_tokens=new, eos_token_id=None)
                        t = {k: getattr(r, k) for k in TIMING_KEYS}
                        if rep == 0:
                            gates.append(list(r.gates[0]))
                    for k in TIMING_KEYS:
                        # per-token decode time: weight by the step's decode tokens so the sum stays a time
                        totals[config][k] += t[k] * (max(new - 1, 1) if "decode" in k else 1)
            decode_tokens = sum(max(new - 1, 1) for _, new in plans)
            for c in runs:  # back to a per-token decode time, over every step's decode tokens
                for k in TIMING_KEYS:
                    if "decode" in k:
                        totals[c][k] /= decode_tokens
            if rep >= warmup:
                for c in runs:
                    runs[c].append(totals[c])
            log(f"  real steps rep {rep + 1}/{warmup + reps}: "
                + " ".join(f"{c}={1e3 * totals[c]['total_s']:.0f}ms" for c in runs))
    n_new = sum(new for _, new in plans)
    summary = {c: _summarise(runs[c], 1, n_new) for c in runs}
    fl = flops.aggregate([
        flops.step_flops(rm.config, len(prompt), new, g, router_hidden=router_hidden,
                         bridge_rank=rm.router_cfg.bridge_rank)
        for (prompt, new), g in zip(plans, gates, strict=True)
    ])
    ideal = 1.0 / (1.0 - fl["total_skipped_fraction"])
    speedup = {}
    for prefix in ("", "cpu_"):
        for stat in ("min", "median"):
            measured = summary["dense"][prefix + "step_ms"][stat] / summary["routed"][prefix + "step_ms"][stat]
            speedup[f"{prefix}step_measured_{stat}"] = measured
            speedup[f"{prefix}step_eff_{stat}"] = measured / ideal
    return {
        "steps": len(plans), "context_tokens": sum(len(p) for p, _ in plans), "new_tokens": n_new,
        "block_flops_skipped": fl["block_skipped_fraction"], "total_flops_skipped": fl["total_skipped_fraction"],
        "skipped_blocks_per_step": [g.count(False) for g in gates], "ideal_speedup": ideal,
        "configs": summary, "speedup": speedup,
    }


def headline(report: dict) -> dict:
    """The numbers the issue asks for: worst efficiency (decode / step) and router overhead, per configuration."""
    out: dict = {}
    for res in report["results"]:
        key = f"{res['scenario']}_b{res['batch']}"
        entry = {}
        if "router_overhead" in res:
            for prefix in ("", "cpu_"):
                for stat in ("min", "median"):
                    entry[f"{prefix}router_overhead_step_{stat}"] = res["router_overhead"][f"{prefix}step_ms"][stat]
        for config, sp in res["speedups"].items():
            e = entry[config] = {
                "decode_ideal": sp["decode"]["ideal_speedup"], "step_ideal": sp["step"]["ideal_speedup"],
            }
            for prefix in ("", "cpu_"):
                for stat in ("min", "median"):
                    e[f"{prefix}decode_measured_{stat}"] = sp[prefix + "decode"][f"measured_speedup_{stat}"]
                    e[f"{prefix}decode_eff_{stat}"] = sp[prefix + "decode"][f"efficiency_{stat}"]
                    e[f"{prefix}step_measured_{stat}"] = sp[prefix + "step"][f"measured_speedup_{stat}"]
                    e[f"{prefix}step_eff_{stat}"] = sp[prefix + "step"][f"efficiency_{stat}"]
                    e[f"{prefix}step_eff_vs_phase_{stat}"] = sp[prefix + "step"][f"efficiency_vs_phase_weighted_{stat}"]
        out[key] = entry
    return out


def _ms(stats: dict) -> str:
    return f"{stats['median']:,.1f}"


def bench_table(report: dict) -> str:
    """`run_bench`'s result as one terminal table: per scenario, batch and configuration, the medians of TTFT,
    decode ms/token and whole-step ms, the blocks skipped per row and the measured step speedup over dense next to
    its FLOP ideal (``open`` row: dense / open, the router overhead as a speedup below 1)."""
    from tabulate import tabulate

    rows = []
    for res in report["results"]:
        dense = res["configs"]["dense"]["step_ms"]["median"]
        for config, c in res["configs"].items():
            sp = res["speedups"].get(config)
            skipped = sp["skipped_blocks_per_row"] if sp else [0]
            rows.append([
                res["scenario"], res["batch"], config,
                f"{min(skipped)}-{max(skipped)}" if min(skipped) != max(skipped) else skipped[0],
                _ms(c["ttft_ms"]), _ms(c["decode_ms_per_token"]), _ms(c["step_ms"]),
                f"{dense / c['step_ms']['median']:.2f}x",
                f"{sp['step']['ideal_speedup']:.2f}x" if sp else "",
            ])
    return tabulate(rows, ["scenario", "batch", "config", "blocks skipped", "TTFT ms", "decode ms/token",
                           "step ms", "speedup", "ideal"], colalign=("left", "right", "left") + ("right",) * 6,
                    disable_numparse=True)  # keep the one-decimal milliseconds as written


def real_steps_table(result: dict) -> str:
    """`bench_real_steps`'s result as a two-row table (dense, routed: medians over repetitions of the summed steps)
    and one line saying what was skipped and how the measured speedup compares with the FLOP ideal."""
    from tabulate import tabulate

    dense = result["configs"]["dense"]["step_ms"]["median"]
    skipped = result["skipped_blocks_per_step"]
    rows = []
    for config, c in result["configs"].items():
        routed = config == "routed"
        rows.append([
            config,
            (f"{min(skipped)}-{max(skipped)}" if min(skipped) != max(skipped) else skipped[0]) if routed else 0,
            f"{100 * result['block_flops_skipped']:.1f}%" if routed else "0.0%",
            _ms(c["ttft_ms"]), _ms(c["decode_ms_per_token"]), _ms(c["step_ms"]),
            f"{dense / c['step_ms']['median']:.2f}x", f"{result['ideal_speedup']:.2f}x" if routed else "1.00x",
        ])
    table = tabulate(rows, ["config", "blocks skipped", "block FLOPs skipped", "prefill ms", "decode ms/token",
                            "steps ms", "speedup", "ideal"], colalign=("left",) + ("right",) * 7,
                     disable_numparse=True)
    return (f"{result['steps']} real eval steps ({result['context_tokens']:,} context tokens, "
            f"{result['new_tokens']:,} generated), batch 1, median of the repetitions:\n{table}\n"
            f"efficiency (measured / ideal speedup): {result['speedup']['step_eff_median']:.2f}")


def emit_json_line(result: dict, output: str | None = None) -> None:
    """A benchmark's last act: print its result as one JSON line, and write the same line to `output` if given."""
    line = json.dumps(result)
    if output:
        write_text_atomic(output, line + "\n")  # never half a result on disk
    print(line)
