"""`layerroute curve`: tool-call accuracy against the number of blocks a tool call gives up (issue 23, item 5).

For one full-depth reference adapter (the LoRA trained without skipping), the k blocks a static removal takes away
are chosen by each of several rankings, measured on tool-call training steps before any eval step is seen:

- ``shortgpt``: block influence (1 - cos(h_in, h_out)) over every token of a few training steps (ShortGPT);
- ``drop_nll``: the rise in target NLL when the block alone is removed, over all target tokens (the removal-cost
  oracle the default recipe trains its routers on);
- ``arg_errors``: the rise in greedy token errors (NLL breaking ties) when the block alone is removed, counted on
  the argument-value tokens of the calls only (item 6's repair: the 135M model's calls broke on copied values,
  ``-3`` becoming ``3``, while the NLL over all tokens is dominated by the call's fixed syntax).

For every k and ranking, the same eval tool-call steps are generated greedily through the real-skip path with the
k blocks removed on every step, scored with the BFCL AST checker and paired with the reference at full depth (k = 0,
the same steps): the accuracy difference and its 95% bootstrap interval. Adapters trained with routers
(``--routed DIR``, e.g. ``train.oracle_skip_tool`` = k / L) are generated on the same steps and paired with the
same reference, so the trained and the static curve share one axis: blocks skipped per tool call.

A static removal takes the blocks from every step, GSM8K too; ``--planning N`` scores N GSM8K test problems at each
point as well, drawn from eval.accuracy_planning_sources (e.g. ``--set 'eval.accuracy_planning_sources=[gsm8k_test]'``;
the CPU cost is several times a tool call's per problem, so it is off by default).

Finished stages are kept under OUT/partial/ (an interrupted run resumes, and a rerun with another ``--routed``
adapter generates only that adapter's steps); OUT/curve.json, curve.md and curve.png are written atomically at the
end.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from ..atomic import write_text_atomic
from ..errors import ConfigError
from .io import write_json

RANKINGS = ("shortgpt", "drop_nll", "arg_errors")
DEFAULT_BLOCKS = (0, 2, 4, 6, 8)


# ------------------------------------------------------------------------------------------------------------
# Argument-value tokens


def _call_arguments(call: dict) -> dict:
    fn = call.get("function", call)
    args = fn.get("arguments") or {}
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return {}
    return args if isinstance(args, dict) else {}


def argument_value_spans(text: str, calls: list[dict]) -> list[tuple[int, int]]:
    """Character spans of each call's argument values in `text` (the rendered target), found in call order: the value
    as JSON (``3``, ``"Paris"``, ``[1, 2]``) right after its key. A value the text does not hold as JSON is skipped."""
    spans, cursor = [], 0
    for call in calls:
        for key, value in _call_arguments(call).items():
            for ascii_only in (False, True):
                needle_key = json.dumps(key, ensure_ascii=ascii_only) + ": "
                needle_val = json.dumps(value, ensure_ascii=ascii_only)
                at = text.find(needle_key + needle_val, cursor)
                if at >= 0:
                    start = at + len(needle_key)
                    spans.append((start, start + len(needle_val)))
                    cursor = start + len(needle_val)
                    break
    return spans


def token_char_ends(tokenizer, ids: list[int]) -> list[int]:
    """The end offset of each token in ``decode(ids)`` (prefix decodes: exact for byte-level BPE, where a prefix
    decodes to a prefix of the whole; a token inside a multi-byte character ends where the character does)."""
    ends, text = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[: i + 1], skip_special_tokens=False)
        ends.append(len(text))
    return ends


def argument_value_steps(steps, tokenizer) -> tuple[list, int]:
    """The tool-call steps with their labels kept on the argument-value tokens only (a token overlapping a value's
    characters counts), and how many steps had no value found (dropped: a call without arguments, or one the
    target does not render as JSON)."""
    out, dropped = [], 0
    for s in steps:
        calls = (s.reference or {}).get("tool_calls") or []
        target = list(s.input_ids[s.context_length:])
        ends = token_char_ends(tokenizer, target)
        text = tokenizer.decode(target, skip_special_tokens=False)
        spans = argument_value_spans(text, calls)
        starts = [0] + ends[:-1]
        keep = [any(a < e and b > st for a, b in spans) for st, e in zip(starts, ends, strict=True)]
        if not any(keep):
            dropped += 1
            continue
        labels = list(s.labels[: s.context_length]) + [t if k else -100 for t, k in zip(target, keep, strict=True)]
        out.append(replace(s, labels=labels))
    return out, dropped


# ------------------------------------------------------------------------------------------------------------
# Rankings and patterns


def removal_order(scores: list[float], ties: list[float] | None = None) -> list[int]:
    """Blocks from cheapest to dearest to remove (a tie broken by `ties`, then by the lower index)."""
    ties = ties or [0.0] * len(scores)
    return sorted(range(len(scores)), key=lambda j: (scores[j], ties[j], j))


def removal_pattern(order: list[int], k: int, n_layers: int) -> list[bool]:
    """[L] gates: the first k blocks of `order` closed, every other open."""
    if not 0 <= k <= n_layers:
        raise ConfigError(f"curve: cannot remove {k} of {n_layers} blocks")
    closed = set(order[:k])
    return [j not in closed for j in range(n_layers)]


def rank_blocks(rm, data, ranking: str, cfg, calibration_steps: int) -> dict:
    """{"order": blocks cheapest first, "scores": per block, ...} for one ranking, on tool-call training steps."""
    from ..calibrate.influence import block_influence, drop_costs

    tool_steps = [s for s in data.train if s.step_type == "tool_call"][:calibration_steps]
    if not tool_steps:
        raise ConfigError("curve: the data has no tool-call training steps to rank blocks on")
    if ranking == "shortgpt":  # as evaluate's baseline: the first steps of the training split, any type
        steps = list(data.train)[: cfg.calibration_steps]
        scores = block_influence(rm, steps, cfg)
        return {"order": removal_order(scores), "scores": scores, "steps": len(steps)}
    if ranking == "drop_nll":
        costs = drop_costs(rm, tool_steps, cfg, desc="removal costs (all target tokens)")
        return {"order": removal_order(costs["nll"]), "scores": costs["nll"], "token_errors": costs["token_errors"],
                "steps": len(tool_steps)}
    if ranking == "arg_errors":
        value_steps, dropped = argument_value_steps(tool_steps, rm.tokenizer)
        if not value_steps:
            raise ConfigError("curve: no argument-value tokens found in the tool-call training steps")
        costs = drop_costs(rm, value_steps, cfg, desc="removal costs (argument-value tokens)")
        return {"order": removal_order(costs["token_errors"], costs["nll"]), "scores": costs["token_errors"],
                "nll": costs["nll"], "steps": len(value_steps), "steps_without_values": dropped}
    raise ConfigError(f"curve: unknown ranking {ranking!r}; expected one of {', '.join(RANKINGS)}")


# ------------------------------------------------------------------------------------------------------------
# The curve


def _paired(reference: dict, result: dict, cfg) -> dict:
    """result minus reference on the same steps: counts, points and the bootstrap interval."""
    from .accuracy import paired_accuracy

    p = paired_accuracy(reference, result, cfg.bootstrap, cfg.seed)
    return {k: p[k] for k in ("n", "diff_points", "diff_ci95", "only_a", "only_b")}


def _summary(result: dict, reference: dict | None, cfg) -> dict:
    out = {k: result[k] for k in ("accuracy", "n", "failures", "accuracy_unseen", "n_unseen") if k in result}
    if reference is not None:
        out["vs_reference"] = _paired(reference, result, cfg)
    return out


def _verdict(point: dict, tolerance: float) -> str:
    """'holds' when the whole interval lies above -tolerance, 'loses' when all of it lies below, else 'cannot tell'."""
    vs = point.get("vs_reference")
    if not vs:
        return "reference"
    lo, hi = vs["diff_ci95"]
    if lo is None or hi is None or math.isnan(lo):
        return "cannot tell"
    if lo >= -tolerance:
        return "holds"
    if hi < -tolerance:
        return "loses"
    return "cannot tell"


def skip_curve(reference_adapter: str, run_cfg, out_dir: Path, *, blocks: list[int], rankings: list[str],
               routed: list[str], tool_calls: int, planning: int, calibration_steps: int,
               tolerance: float = 1.0) -> dict:
    from ..adapters import adapter_base_name, load_adapter, read_adapter_meta
    from ..config import ModelConfig
    from ..data.build import load_steps
    from ..identity import same_tokenizer, tokenizer_identity
    from .accuracy import accuracy
    from .sampling import _accuracy_steps, _steps_key
    from .stage_cache import StageCache, directory_digest

    cfg = replace(run_cfg.eval, accuracy_steps_per_type={"tool_call": tool_calls, "planning": planning},
                  accuracy_teacher_forced=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def load(path):
        meta = read_adapter_meta(path)
        return load_adapter(path, ModelConfig(name=adapter_base_name(path, meta), dtype=run_cfg.model.dtype))

    rm = load(reference_adapter)
    data = load_steps(run_cfg.data, rm.tokenizer)
    draws = _accuracy_steps([], {"tool_call": [], "planning": []}, list(data.eval), cfg)
    n_layers = rm.num_layers
    if max(blocks) > n_layers:
        raise ConfigError(f"curve --blocks: {max(blocks)} is more than the model's {n_layers} blocks")
    cache = StageCache(out_dir / "partial", {"adapter": directory_digest(reference_adapter), "eval": asdict(cfg),
                                             "dtype": rm.dtype, "calibration": calibration_steps})
    # the rankings depend on the adapter, the calibration steps and the batching only, not on the generation settings
    rank_cache = StageCache(out_dir / "partial", {"adapter": directory_digest(reference_adapter),
                                                  "dtype": rm.dtype, "calibration": calibration_steps,
                                                  "batch_size": cfg.batch_size, "seed": cfg.seed,
                                                  "shortgpt_steps": cfg.calibration_steps})
    refs: dict[str, dict] = {}
    ranked = {r: rank_cache.run(f"rank-{r}", [_steps_key(list(data.train)[:max(calibration_steps, cfg.calibration_steps)])],
                           lambda r=r, m=rm: rank_blocks(m, data, r, cfg, calibration_steps)) for r in rankings}
    doc: dict = {"reference_adapter": str(reference_adapter), "n_layers": n_layers, "dtype": rm.dtype,
                 "tolerance_points": tolerance,
                 "eval_config": asdict(cfg), "rankings": ranked, "types": {}}
    for t, steps in draws.items():
        if not steps:
            continue
        idx = list(range(len(steps)))
        key = _steps_key(steps)

        def gen(config, name, forced=None, reference=None, model=rm, steps=steps, key=key, idx=idx):
            t0 = time.perf_counter()
            res = cache.run(name, [key, forced], lambda: accuracy(model, steps, idx, config, cfg, forced=forced,
                                                                  reference=reference))
            timings[name] = round(time.perf_counter() - t0, 1)
            return res

        ref = refs[t] = gen("lora_full_depth", f"{t}-k0")
        entry = {"n": len(steps), "steps": [f"{s.conversation_id}#{s.step_index}" for s in steps],
                 "reference": _summary(ref, None, cfg), "static": {}, "routed": []}
        by_pattern: dict[tuple, dict] = {}
        for k in sorted(b for b in blocks if b > 0):
            for r in rankings:
                pattern = removal_pattern(ranked[r]["order"], k, n_layers)
                res = by_pattern.get(tuple(pattern))
                if res is None:  # two rankings that remove the same set share one generation
                    res = by_pattern[tuple(pattern)] = gen("shortgpt", f"{t}-{r}-k{k}", forced=pattern, reference=ref)
                point = {"k": k, "skipped": sorted(ranked[r]["order"][:k]), "block_flops_skipped": k / n_layers,
                         **_summary(res, ref, cfg)}
                point["verdict"] = _verdict(point, tolerance)
                entry["static"].setdefault(r, []).append(point)
        doc["types"][t] = entry
    ref_identity = tokenizer_identity(rm.tokenizer)
    del rm
    for path in routed:  # trained routers, on the same steps, against the same reference
        rm2 = load(path)
        if not same_tokenizer(tokenizer_identity(rm2.tokenizer), ref_identity):
            raise ConfigError(f"curve --routed {path}: another tokenizer than the reference adapter's")
        digest = directory_digest(path)[:16]
        for t, steps in draws.items():
            if not steps:
                continue
            idx, key = list(range(len(steps))), _steps_key(steps)
            t0 = time.perf_counter()
            name = f"{t}-fulldepth-{digest}"  # the same adapter with every block: what its LoRA alone costs
            own = cache.run(name, [key, digest], lambda rm2=rm2, steps=steps, idx=idx:
                            accuracy(rm2, steps, idx, "lora_full_depth", cfg))
            timings[name] = round(time.perf_counter() - t0, 1)
            t0 = time.perf_counter()
            name = f"{t}-routed-{digest}"
            res = cache.run(name, [key, digest], lambda rm2=rm2, steps=steps, idx=idx, own=own:
                            accuracy(rm2, steps, idx, "routed", cfg, reference=own))
            timings[name] = round(time.perf_counter() - t0, 1)
            skipped = [n_layers - sum(s["gates"]) for s in res["samples"]]
            point = {"adapter": str(path), "blocks_skipped_mean": float(np.mean(skipped)),
                     "block_flops_skipped": float(np.mean(skipped)) / n_layers, **_summary(res, refs[t], cfg),
                     "own_full_depth": _summary(own, refs[t], cfg),
                     "vs_own_full_depth": _paired(own, res, cfg)}
            point["verdict"] = _verdict(point, tolerance)
            doc["types"][t]["routed"].append(point)
        del rm2
    doc["largest_k_holding"] = {t: {r: max([0] + [p["k"] for p in pts if p["verdict"] == "holds"])
                                    for r, pts in e["static"].items()} for t, e in doc["types"].items()}
    doc["largest_k_point_estimate_within_tolerance"] = {
        t: {r: max([0] + [p["k"] for p in pts if p["vs_reference"]["diff_points"] >= -tolerance])
            for r, pts in e["static"].items()} for t, e in doc["types"].items()}
    doc["seconds_per_stage"] = timings
    write_json(out_dir / "curve.json", doc)
    write_text_atomic(out_dir / "curve.md", curve_markdown(doc))
    plot_curve(doc, out_dir / "curve.png")
    return doc


def curve_markdown(doc: dict) -> str:
    lines = [f"# Accuracy against blocks skipped ({doc['n_layers']} blocks)", "",
             f"Reference (k = 0): `{doc['reference_adapter']}` at full depth. Each row: the same steps generated "
             "with k blocks removed, minus the reference, paired, with its 95% bootstrap interval. Verdict: *holds* "
             f"= the interval lies above -{doc['tolerance_points']:g} points, *loses* = below, else *cannot tell*.", ""]
    for t, e in doc["types"].items():
        ref = e["reference"]
        lines += [f"## {t}: {e['n']} eval steps; reference {100 * ref['accuracy']:.1f}%", "",
                  "| removal | k | blocks removed | accuracy | minus reference [95% CI] | verdict |",
                  "|---|---:|---|---:|---|---|"]
        for r, pts in e["static"].items():
            for p in pts:
                vs = p["vs_reference"]
                lines.append(f"| static, {r} | {p['k']} | {p['skipped']} | {100 * p['accuracy']:.1f}% | "
                             f"{vs['diff_points']:+.1f} [{vs['diff_ci95'][0]:+.1f}, {vs['diff_ci95'][1]:+.1f}] | "
                             f"{p['verdict']} |")
        for p in e["routed"]:
            vs = p["vs_reference"]
            lines.append(f"| trained routers `{p['adapter']}` | {p['blocks_skipped_mean']:.1f} (mean) | per step | "
                         f"{100 * p['accuracy']:.1f}% | {vs['diff_points']:+.1f} [{vs['diff_ci95'][0]:+.1f}, "
                         f"{vs['diff_ci95'][1]:+.1f}] | {p['verdict']} |")
        if e["routed"]:
            lines += ["", "Each trained adapter at full depth (its LoRA without skipping), and routed minus that:", "",
                      "| adapter | full depth | minus reference [95% CI] | routed minus own full depth [95% CI] |",
                      "|---|---:|---|---|"]
            for p in e["routed"]:
                own, vs, vo = p["own_full_depth"], p["own_full_depth"]["vs_reference"], p["vs_own_full_depth"]
                lines.append(f"| `{p['adapter']}` | {100 * own['accuracy']:.1f}% | {vs['diff_points']:+.1f} "
                             f"[{vs['diff_ci95'][0]:+.1f}, {vs['diff_ci95'][1]:+.1f}] | {vo['diff_points']:+.1f} "
                             f"[{vo['diff_ci95'][0]:+.1f}, {vo['diff_ci95'][1]:+.1f}] |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot_curve(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic import atomic_path

    types = list(doc["types"])
    fig, axes = plt.subplots(1, len(types), figsize=(6 * len(types), 4.2), squeeze=False)
    for ax, t in zip(axes[0], types, strict=True):
        e = doc["types"][t]
        ref = 100 * e["reference"]["accuracy"]
        for r, pts in e["static"].items():
            ks = [0] + [p["k"] for p in pts]
            acc = [ref] + [100 * p["accuracy"] for p in pts]
            lo = [0] + [-p["vs_reference"]["diff_ci95"][0] + p["vs_reference"]["diff_points"] for p in pts]
            hi = [0] + [p["vs_reference"]["diff_ci95"][1] - p["vs_reference"]["diff_points"] for p in pts]
            ax.errorbar(ks, acc, yerr=[lo, hi], marker="o", capsize=3, label=f"static ({r})")
        for p in e["routed"]:
            vs = p["vs_reference"]
            ax.errorbar([p["blocks_skipped_mean"]], [100 * p["accuracy"]],
                        yerr=[[vs["diff_points"] - vs["diff_ci95"][0]], [vs["diff_ci95"][1] - vs["diff_points"]]],
                        marker="*", markersize=12, capsize=3, linestyle="none",
                        label=f"trained routers ({Path(p['adapter']).parent.name or p['adapter']})")
        ax.axhline(ref - doc["tolerance_points"], color="grey", linestyle=":", linewidth=1,
                   label=f"reference - {doc['tolerance_points']:g} point")
        ax.set_xlabel(f"blocks skipped per step (of {doc['n_layers']})")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{t}: {e['n']} eval steps (paired 95% intervals)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..config import add_adapter_argument, add_config_arguments, add_output_dir_argument

    what = parser.add_argument_group("the reference", "--adapter: the full-depth reference adapter (k = 0); "
                                     "its own config unless --config")
    add_adapter_argument(what, required=True)
    add_config_arguments(what, required=False)
    parser.add_argument("--blocks", default=",".join(map(str, DEFAULT_BLOCKS)),
                        help="numbers of blocks to remove, comma-separated (default 0,2,4,6,8)")
    parser.add_argument("--rankings", default=",".join(RANKINGS), help=f"comma-separated, of {', '.join(RANKINGS)}")
    parser.add_argument("--routed", action="append", default=[], metavar="ADAPTER",
                        help="an adapter with trained routers, scored on the same steps (repeatable)")
    parser.add_argument("--tool-calls", type=int, default=96, help="eval tool-call steps per point (default 96)")
    parser.add_argument("--planning", type=int, default=0, help="GSM8K test problems per point (default 0: none)")
    parser.add_argument("--calibration-steps", type=int, default=16,
                        help="tool-call training steps the removal costs are measured on (default 16)")
    parser.add_argument("--tolerance", type=float, default=1.0, help="accuracy loss in points that still holds")
    add_output_dir_argument(parser)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise ConfigError(f"{flag}: expected non-negative integers, got {text!r}")
    return sorted(set(values))


def run(args: argparse.Namespace) -> int:
    from ..adapters import training_config
    from ..config import RunConfig, raw_config

    rankings = [r.strip() for r in args.rankings.split(",") if r.strip()]
    unknown = [r for r in rankings if r not in RANKINGS]
    if unknown or not rankings:
        raise ConfigError(f"--rankings: unknown {unknown or rankings}; expected some of {', '.join(RANKINGS)}")
    blocks = _int_list(args.blocks, "--blocks")
    if args.tool_calls < 1:
        raise ConfigError("--tool-calls must be >= 1")
    if args.planning < 0 or args.calibration_steps < 1:
        raise ConfigError("--planning must be >= 0 and --calibration-steps >= 1")
    raw = raw_config(args, None if args.config else training_config(args.adapter))
    run_cfg = RunConfig.from_dict({k: raw.get(k) for k in ("model", "router", "lora", "data", "train", "eval")})
    doc = skip_curve(args.adapter, run_cfg, Path(args.output_dir), blocks=blocks,
                     rankings=rankings, routed=args.routed, tool_calls=args.tool_calls, planning=args.planning,
                     calibration_steps=args.calibration_steps, tolerance=args.tolerance)
    print(json.dumps({"largest_k_holding": doc["largest_k_holding"],
                      "largest_k_point_estimate_within_tolerance": doc["largest_k_point_estimate_within_tolerance"],
                      "report": str(Path(args.output_dir) / "curve.md")}))
    return 0
