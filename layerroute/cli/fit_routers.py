"""`layerroute fit-routers`: routers trained on the per-step oracle's targets (`layerroute.train.per_step`), their
threshold chosen on validation steps, written as an adapter `layerroute eval` evaluates.

    layerroute oracle --adapter A --split train --steps 400 --output-dir runs/oracle     # the targets (resumable)
    layerroute fit-routers --adapter A --targets runs/oracle/train --output-dir runs/per-step
    layerroute eval --adapter runs/per-step/adapter --output-dir runs/per-step/eval      # prompt_full_depth, recorded

Writes OUT/frontier.json (per threshold: validation exact rate and skip, tool calls and planning; the fixed-set
frontier beside it), OUT/frontier.png, OUT/router_inputs.safetensors (the features per step,
reused by a rerun on the same adapter: more oracle records cost only their own forwards) and OUT/adapter (the same LoRA, the fitted routers, router.threshold = the chosen threshold,
eval.prompt_full_depth = true in its recorded config).
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import ConfigError

DEFAULT_THRESHOLDS = "0.01,0.02,0.05,0.1,0.2,0.3,0.5"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..config import add_adapter_argument, add_config_arguments, add_output_dir_argument

    what = parser.add_argument_group("the adapter", "--adapter: the full-depth adapter the oracle ran on; its own "
                                     "config unless --config")
    add_adapter_argument(what, required=True)
    add_config_arguments(what, required=False)
    parser.add_argument("--targets", required=True,
                        help="the oracle's output folder for the train split (holds oracle-tool_call.jsonl; "
                             "oracle-planning.jsonl is used when present)")
    parser.add_argument("--planning-steps", type=int, default=200,
                        help="training planning steps (every block runs unless the oracle has a record; default 200)")
    parser.add_argument("--val-fraction", type=float, default=0.25, help="steps held out to choose the threshold")
    parser.add_argument("--budget", type=float, default=0.02,
                        help="tool-call exact rate lost on validation allowed at the chosen threshold (default 0.02)")
    parser.add_argument("--thresholds", default=DEFAULT_THRESHOLDS,
                        help=f"p(run) thresholds tried, comma-separated (default {DEFAULT_THRESHOLDS})")
    parser.add_argument("--max-fixed", type=int, default=6, help="largest fixed set on the comparison frontier")
    parser.add_argument("--epochs", type=int, default=400)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    add_output_dir_argument(parser)


def _thresholds(text: str) -> list[float]:
    try:
        values = sorted({float(t) for t in text.split(",") if t.strip()})
    except ValueError as err:
        raise ConfigError(f"fit-routers: --thresholds must be numbers, got {text!r}") from err
    if not values or any(not 0 < t < 1 for t in values):
        raise ConfigError(f"fit-routers: --thresholds must lie in (0, 1), got {text!r}")
    return values


def _features(rm, model, steps, path: Path, identity: str, turn_id) -> torch.Tensor:
    """The router inputs of `steps` [N, L, H]: those `path` already holds for this adapter are read, the others
    computed and added (a rerun with more oracle records computes only the new steps)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from ..atomic import atomic_path
    from ..train.per_step import router_inputs, step_key

    cached: dict[str, torch.Tensor] = {}
    if path.is_file():
        with safe_open(str(path), "pt") as fh:
            same = (fh.metadata() or {}).get("identity") == identity
        cached = load_file(str(path)) if same else {}
    todo = [s for s in steps if step_key(s) not in cached]
    if todo:
        x = router_inputs(rm, model, todo, turn_token_id=turn_id)
        cached.update({step_key(s): x[i].contiguous() for i, s in enumerate(todo)})
        with atomic_path(path) as tmp:
            save_file(cached, str(tmp), metadata={"identity": identity})
    return torch.stack([cached[step_key(s)] for s in steps])


def _plot(points: list[dict], fixed: list[dict], chosen: dict | None, ceiling: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([100 * p["tool_call"]["decode_fraction"] for p in points],
            [100 * p["tool_call"]["exact_rate"] for p in points], "o-", label="per-step routers (by threshold)")
    labels: dict[tuple, list[str]] = {}  # thresholds that land on the same point share one label
    for p in points:
        xy = (100 * p["tool_call"]["decode_fraction"], 100 * p["tool_call"]["exact_rate"])
        labels.setdefault(xy, []).append(f"{p['threshold']:g}")
    for xy, names in labels.items():
        ax.annotate("t=" + (names[0] if len(names) == 1 else f"{names[0]}-{names[-1]}"), xy, fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.plot([100 * p["decode_fraction"] for p in fixed], [100 * p["exact_rate"] for p in fixed], "s--",
            label="fixed set (top-k by oracle frequency)")
    ax.plot([100 * ceiling], [100], "kD", label="per-step oracle sets (the ceiling)")
    if chosen is not None:
        ax.plot([100 * chosen["tool_call"]["decode_fraction"]], [100 * chosen["tool_call"]["exact_rate"]], "r*",
                markersize=12, label=f"chosen (t = {chosen['threshold']:g})")
    ax.set_xlabel("blocks skipped on the step's own tokens (% of block FLOPs there)")
    ax.set_ylabel("validation tool calls still exact (%)")
    ax.set_title("Per-step routers vs fixed sets (validation)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from ..adapters import adapter_base_name, load_adapter, read_adapter_meta, training_config, turn_token_id
    from ..atomic import write_text_atomic
    from ..config import RunConfig, raw_config
    from ..data.build import load_steps
    from ..eval.oracle import read_records
    from ..eval.stage_cache import directory_digest
    from ..infer.generate import inference_weights
    from ..train import per_step as ps

    thresholds = _thresholds(args.thresholds)
    if not 0 < args.val_fraction < 1:
        raise ConfigError("fit-routers: --val-fraction must lie in (0, 1)")
    if not 0 <= args.budget < 1:
        raise ConfigError("fit-routers: --budget must lie in [0, 1)")
    if args.planning_steps < 0 or args.epochs < 1:
        raise ConfigError("fit-routers: --planning-steps must be >= 0 and --epochs >= 1")
    targets = Path(args.targets)
    tool_records = read_records(targets / "oracle-tool_call.jsonl")
    if not tool_records:
        raise ConfigError(f"fit-routers: no oracle records in {targets / 'oracle-tool_call.jsonl'} "
                          "(run `layerroute oracle --split train` first)")
    sets = ps.oracle_sets(tool_records + read_records(targets / "oracle-planning.jsonl"))
    with_tokens = {r["step"]: r["target"] for r in tool_records if "oracle" in r and r.get("target")}

    raw = raw_config(args, None if args.config else training_config(args.adapter))
    run_cfg = RunConfig.from_dict({k: raw.get(k) for k in ("model", "router", "lora", "data", "train", "eval")})
    meta = read_adapter_meta(args.adapter)
    rm = load_adapter(args.adapter, replace(run_cfg.model, name=adapter_base_name(args.adapter, meta)))
    data = load_steps(run_cfg.data, rm.tokenizer)
    by_key = {ps.step_key(s): s for s in data.train}
    tool = [by_key[k] for k in sets if k in by_key and by_key[k].step_type == "tool_call"]
    missing = sum(1 for k in sets if k not in by_key)
    if missing:
        print(f"fit-routers: {missing} oracle records name steps this data does not have (left out)")
    planning_pool = [s for s in data.train if s.step_type == "planning"]
    planning = ps.split_train_val(planning_pool, 0.0, args.seed)[0][:args.planning_steps]
    tool_fit, tool_val = ps.split_train_val(tool, args.val_fraction, args.seed)
    plan_fit, plan_val = ps.split_train_val(planning, args.val_fraction, args.seed)
    tool_val = [s for s in tool_val if ps.step_key(s) in with_tokens]  # the exactness check needs the target
    if len(tool_fit) < 10 or not tool_val:
        raise ConfigError(f"fit-routers: {len(tool_fit)} training and {len(tool_val)} validation tool calls with "
                          "oracle targets: too few (run the oracle on more --split train steps)")

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    identity = directory_digest(args.adapter)
    turn_id = turn_token_id(rm.router_cfg, rm.tokenizer)
    fit_steps, val_steps = tool_fit + plan_fit, tool_val + plan_val
    with inference_weights(rm) as model:
        x_all = _features(rm, model, fit_steps + val_steps, out / "router_inputs.safetensors", identity, turn_id)
        x_fit, x_val = x_all[:len(fit_steps)], x_all[len(fit_steps):]
        y_fit = ps.run_targets(fit_steps, sets, rm.num_layers)
        routers = ps.fit_routers(x_fit, y_fit, rm.router_spec, epochs=args.epochs, weight_decay=args.weight_decay,
                                 seed=args.seed, normalize_input=rm.router_cfg.normalize_input)
        prob = ps.run_probabilities(routers, x_val)
        n_tool = len(tool_val)
        tool_targets = [with_tokens[ps.step_key(s)] for s in tool_val]
        order = ps.frequency_order({k: v for k, v in sets.items() if k in {ps.step_key(s) for s in tool_fit}},
                                   rm.num_layers)
        fixed_sets = [tuple(sorted(order[:k])) for k in range(args.max_fixed + 1)]
        per_threshold = [ps.skip_sets(prob[:n_tool], t) for t in thresholds]
        candidates = [[sets_t[i] for sets_t in per_threshold] + fixed_sets for i in range(n_tool)]
        exact = ps.exactness_table(rm, model, tool_val, tool_targets, candidates)
    plan_lengths = [[0] * max(s.length, 1) for s in plan_val]  # planning: skip counted on the gold length
    points = []
    for ti, t in enumerate(thresholds):
        chosen_sets = per_threshold[ti]
        plan_sets = ps.skip_sets(prob[n_tool:], t)
        points.append({
            "threshold": t,
            "tool_call": ps.summarize(rm, tool_val, tool_targets, chosen_sets, [e[ti] for e in exact]),
            "planning": {k: v for k, v in ps.summarize(rm, plan_val, plan_lengths, plan_sets,
                                                       [True] * len(plan_val)).items() if k != "exact_rate"},
        })
    fixed = [{"k": k, "set": list(fs), **ps.summarize(rm, tool_val, tool_targets, [fs] * n_tool,
                                                      [e[len(thresholds) + k] for e in exact])}
             for k, fs in enumerate(fixed_sets)]
    chosen = ps.choose_threshold(points, args.budget)
    summary = {
        "adapter": str(args.adapter), "adapter_digest": identity, "targets": str(targets),
        "fit": {"tool_call": len(tool_fit), "planning": len(plan_fit), "epochs": args.epochs,
                "weight_decay": args.weight_decay, "seed": args.seed, "router": rm.router_spec.name},
        "validation": {"tool_call": n_tool, "planning": len(plan_val)},
        "oracle_mean_size_fit": sum(len(sets[ps.step_key(s)]) for s in tool_fit) / len(tool_fit),
        "oracle_mean_size_val": sum(len(sets[ps.step_key(s)]) for s in tool_val) / n_tool,
        "budget": args.budget, "points": points, "fixed_sets": fixed,
        "chosen_threshold": None if chosen is None else chosen["threshold"],
    }
    write_text_atomic(out / "frontier.json", json.dumps(summary, indent=2))
    ps_plot = out / "frontier.png"
    _plot(points, fixed, chosen, summary["oracle_mean_size_val"] / rm.num_layers, ps_plot)
    if chosen is not None:
        for router, fitted in zip(rm.routers(), routers, strict=True):
            router.load_state_dict(fitted.state_dict())
        rm.router_cfg = replace(rm.router_cfg, threshold=chosen["threshold"])
        training = copy.deepcopy(meta.get("training", {}))
        cfg = training.setdefault("config", {})
        cfg.setdefault("router", {})["threshold"] = chosen["threshold"]
        cfg.setdefault("eval", {})["prompt_full_depth"] = True
        training["per_step_routers"] = {k: summary[k] for k in ("targets", "fit", "validation", "budget",
                                                               "chosen_threshold")}
        rm.save(out / "adapter", extra={"training": training})
    print(json.dumps({"frontier": str(out / "frontier.json"), "plot": str(ps_plot),
                      "chosen_threshold": summary["chosen_threshold"],
                      "adapter": str(out / "adapter") if chosen is not None else None,
                      "tool_call_at_chosen": None if chosen is None else chosen["tool_call"],
                      "planning_at_chosen": None if chosen is None else chosen["planning"]}))
    return 0
