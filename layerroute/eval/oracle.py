"""`layerroute oracle`: the per-step oracle (`layerroute.calibrate.oracle`) over eval steps, resumable.

Per step: the target is the model's own greedy output at full depth (`eval.accuracy.generate_and_score`, scored as
evaluation scores it); the greedy search finds the set; optionally the beam and attention-only searches, the
free-running check (the set applied with real skipping, `batched.generate_batched` with forced gates and
``prompt_full_depth``: the same tokens? the same score?) and the same set with the context skipped too (one
teacher-forced pass, `influence.skip_set_cost`). FLOPs: `flops.step_flops(..., prompt_full_depth=True)`.

Results are one JSON line per step in ``OUT/oracle-<type>.jsonl``, appended as each step finishes and keyed by the
model's identity (the adapter directory's digest) and the settings, so an interrupted run resumes where it stopped;
steps are drawn in a seeded random order, so a run cut short is a random sample of the draw.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..calibrate.oracle import (
    CRITERIA,
    CachedStep,
    beam_reproducing_set,
    criterion_check,
    greedy_reproducing_set,
)
from ..errors import ConfigError
from ..tasks.registry import task_for_step

# ------------------------------------------------------------------------------------------------------------
# Per step: target, answer tokens, oracle, free-running check


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def answer_token_mask(tokenizer, target: Sequence[int]) -> list[bool] | None:
    """Per target token: does it overlap the final answer's number (what GSM8K scoring reads)? None when the
    text has no number."""
    from ..tasks.gsm8k import extract_final_number, normalize_number
    from .skip_curve import token_char_ends

    text = tokenizer.decode(list(target), skip_special_tokens=False)
    final = extract_final_number(text)
    if final is None:
        return None
    spans = [m.span() for m in _NUMBER.finditer(text) if normalize_number(m.group()) == final]
    if not spans:
        return None
    a, b = spans[-1]
    ends = token_char_ends(tokenizer, list(target))
    starts = [0] + ends[:-1]
    return [st < b and e > a for st, e in zip(starts, ends, strict=True)]


def step_features(step) -> dict:
    """What might predict a step's oracle set: function(s), schema size, argument count, lengths."""
    calls = (step.reference or {}).get("tool_calls") or []
    functions = [c.get("function", c).get("name") for c in calls]
    n_args = 0
    for c in calls:
        args = c.get("function", c).get("arguments") or {}
        n_args += len(args) if isinstance(args, dict) else 0
    return {"category": step.category, "source": step.source, "functions": functions, "n_calls": len(calls),
            "n_args": n_args, "n_tools": len(step.tools), "schema_chars": len(json.dumps(step.tools)),
            "context_length": step.context_length, "gold_length": step.length}


def oracle_step(rm, step, cfg, *, criterion: str, nll_rise: float, rows: int, chain: int, stop: list[int],
                beam: int = 0, attention: bool = False, free_running: bool = False, margin: float = 0.0) -> dict:
    """Everything the oracle records for one step (see the module doc)."""
    from ..calibrate.influence import skip_set_cost
    from ..flops import attention_flops, block_flops, step_flops
    from ..infer.batched import Request, generate_batched
    from ..infer.generate import inference_weights
    from .accuracy import generate_and_score, score

    t0 = time.perf_counter()
    # LoRA merged for the target, the oracle and the check alike (a model without LoRA: its plain weights)
    sample = generate_and_score(rm, [step], "lora_full_depth", cfg, stop=stop)[0]
    target = list(sample["tokens"])
    rec = {"step": f"{step.conversation_id}#{step.step_index}", "type": step.step_type, **step_features(step),
           "full_depth": {"correct": sample["correct"], "reason": sample["reason"], "finish": sample["finish"],
                          "tokens": len(target), "text": sample["text"][:600]}, "target": target}
    if not target:
        return {**rec, "skipped": "no target tokens (prompt too long or empty budget)"}
    answer = answer_token_mask(rm.tokenizer, target) if criterion == "answer" else None
    rec["answer_tokens"] = None if answer is None else int(sum(answer))
    crit = criterion if (criterion != "answer" or answer) else "exact"  # no number to hold: the whole text
    L = rm.num_layers
    with inference_weights(rm) as model:
        cached = CachedStep(rm, model, step.input_ids[:step.context_length], target, rows=rows, answer=answer,
                            margin=margin)
        res = cached.costs([()] + [(j,) for j in range(L)])
        full, singles = res[0], res[1:]
        ok = criterion_check(crit, full, len(target), nll_rise)
        greedy = greedy_reproducing_set(cached.costs, L, ok, singles, chain=chain)
        rec.update(criterion=crit, margin=margin, full_depth_errors=full.errors, full_nll=full.nll,
                   single_nll_rise=[round(c.nll - full.nll, 5) for c in singles],
                   single_ok=[ok(c) for c in singles], oracle=greedy["set"], order=greedy["order"],
                   size=len(greedy["set"]), checks=greedy["checks"],
                   oracle_nll_rise=None if greedy["nll"] is None else greedy["nll"] - full.nll)
        if beam:
            tb = time.perf_counter()
            b = beam_reproducing_set(cached.costs, L, ok, singles, width=beam)
            rec["beam"] = {"width": beam, "set": b["set"], "size": len(b["set"]), "checks": b["checks"],
                           "seconds": round(time.perf_counter() - tb, 1)}
        if attention:
            ta = time.perf_counter()
            att = CachedStep(rm, model, step.input_ids[:step.context_length], target, rows=rows, answer=answer,
                             units="attention", margin=margin)
            ares = att.costs([()] + [(j,) for j in range(L)])
            aok = criterion_check(crit, ares[0], len(target), nll_rise)
            ag = greedy_reproducing_set(att.costs, L, aok, ares[1:], chain=chain)
            n, ctx = len(target), step.context_length
            share = attention_flops(rm.config, n, ctx) / block_flops(rm.config, n, ctx)  # of a block, step tokens
            rec["attention_only"] = {
                "set": ag["set"], "size": len(ag["set"]), "seconds": round(time.perf_counter() - ta, 1),
                "attention_share_of_block": share,
                # of the step's own tokens' block FLOPs (the context runs at full depth)
                "decode_fraction": len(ag["set"]) * share / L}
        rec["forwards"] = cached.forwards
    run_mask = [j not in set(greedy["set"]) for j in range(L)]
    fl = step_flops(rm.config, step.context_length, len(target), run_mask, prompt_full_depth=True,
                    count_routers=False)
    rec["flops"] = {"block_fraction_prompt_full_depth": fl["block_skipped_fraction"],
                    "decode_fraction": len(greedy["set"]) / L,
                    "block_fraction_if_context_skipped_too": step_flops(
                        rm.config, step.context_length, len(target), run_mask,
                        count_routers=False)["block_skipped_fraction"]}
    if free_running:
        budget = task_for_step(step).budget(step, cfg)
        out = generate_batched(rm, [Request(list(step.input_ids[:step.context_length]), budget, frozenset(stop),
                                            forced=run_mask)], batch_size=1, kv_policy=cfg.kv_policy,
                               prompt_full_depth=True, progress=False)[0]
        text = rm.tokenizer.decode(out.tokens, skip_special_tokens=True)
        correct, _ = score(step, text, out.finish, out.extra)
        first_diff = next((i for i, (a, b) in enumerate(zip(out.tokens, target, strict=False)) if a != b),
                          None if len(out.tokens) == len(target) else min(len(out.tokens), len(target)))
        rec["free_running"] = {"identical": out.tokens == target, "correct": bool(correct),
                               "first_difference": first_diff}
        # the same set with the context skipped too (what routing without prompt_full_depth does): one
        # teacher-forced pass, the target tokens counted
        ctx = list(step.input_ids[:step.context_length])
        own = replace(step, input_ids=ctx + target, labels=[-100] * len(ctx) + target,
                      decision_mask=[1] * len(ctx) + [0] * len(target), length=len(target))
        nll, err = skip_set_cost(rm, [own], replace(cfg, prompt_full_depth=False, batch_size=1), greedy["set"])
        rec["context_skipped_too"] = {"errors": round(err * len(target)), "nll_per_token": nll}
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    return rec


# ------------------------------------------------------------------------------------------------------------
# The run: resumable JSONL per step type


def read_records(path: Path, key: str | None = None) -> list[dict]:
    """The records of a JSONL file (a torn last line, from an interrupted write, is ignored), those of `key` only
    when given."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if key is None or rec.get("key") == key:
            out.append(rec)
    return out


def append_record(path: Path, rec: dict) -> None:
    """One line, flushed and synced before the next step starts (a crash loses at most the step in progress)."""
    with open(path, "a") as fh:
        fh.write(json.dumps(rec) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def draw_steps(steps, step_type: str, n: int, seed: int, sources: list[str] | None = None) -> list:
    """n eval steps of a type in a seeded random order (a run cut short is a random sample of the draw)."""
    pool = [s for s in steps if s.step_type == step_type and (not sources or s.source in sources)]
    rng = random.Random(seed)
    rng.shuffle(pool)
    return pool[:n]


def run_oracle(rm, identity: str, steps, cfg, out: Path, *, step_type: str, criterion: str, nll_rise: float,
               rows: int, chain: int, beam_steps: int = 0, beam: int = 4, attention_steps: int = 0,
               free_running_steps: int = 0, margin: float = 0.0, progress: bool = True) -> list[dict]:
    """Oracle every step not already in ``out/oracle-<type>.jsonl`` under the same key; returns all its records."""
    from ..infer.generate import stop_ids
    from .stage_cache import fingerprint

    out.mkdir(parents=True, exist_ok=True)
    path = out / f"oracle-{step_type}.jsonl"
    settings = {"model": identity, "criterion": criterion, "nll_rise": nll_rise,
                "budget": [cfg.max_new_tokens_tool, cfg.max_new_tokens_planning], "kv": cfg.kv_policy}
    if margin:  # a margin is part of the key; without one the key is what it was (earlier JSONL still resumes)
        settings["margin"] = margin
    key = fingerprint(settings)[:16]
    done = {r["step"]: r for r in read_records(path, key)}
    if path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        with open(path, "a") as fh:  # a torn last line (an interrupted write) stays a line of its own
            fh.write("\n")
    stop = stop_ids(rm)
    bar = tqdm(total=len(steps), desc=f"oracle {step_type}", unit="step", disable=not progress)
    records = []
    for i, step in enumerate(steps):
        sid = f"{step.conversation_id}#{step.step_index}"
        if sid not in done:
            rec = oracle_step(rm, step, cfg, criterion=criterion, nll_rise=nll_rise, rows=rows, chain=chain,
                              stop=stop, beam=beam if i < beam_steps else 0, attention=i < attention_steps,
                              free_running=i < free_running_steps, margin=margin)
            done[sid] = {"key": key, "index": i, **rec}
            append_record(path, done[sid])
        records.append(done[sid])
        sizes = [r["size"] for r in records if "size" in r]
        bar.set_postfix(mean_size=f"{sum(sizes) / max(len(sizes), 1):.2f}")
        bar.update()
    bar.close()
    return records


# ------------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..config import add_adapter_argument, add_config_arguments, add_output_dir_argument

    what = parser.add_argument_group("the model", "--adapter: the full-depth adapter (e.g. a lora_only run's "
                                     "adapter/), its own config unless --config; or --base with --config")
    add_adapter_argument(what)
    add_config_arguments(what, required=False)
    parser.add_argument("--type", dest="step_type", choices=("tool_call", "planning"), default="tool_call")
    parser.add_argument("--steps", type=int, default=150, help="steps of the type (default 150)")
    parser.add_argument("--split", choices=("eval", "train"), default="eval",
                        help="eval (the headroom) or train (per-step router targets); the JSONL is per split")
    parser.add_argument("--planning-sources", default="gsm8k_test",
                        help="comma-separated sources planning steps are drawn from (default gsm8k_test)")
    parser.add_argument("--criterion", choices=CRITERIA,
                        help="exact (default for tool calls) or answer (default for planning steps)")
    parser.add_argument("--nll-rise", type=float, default=0.1,
                        help="answer criterion: mean NLL rise allowed over full depth, nats/token (default 0.1)")
    parser.add_argument("--margin", type=float, default=0.0,
                        help="exact criterion: where full depth leads by at least this (logits), a set must keep "
                             "that lead (robust to bf16 rounding between teacher forcing and decoding; default 0)")
    parser.add_argument("--rows", type=int, default=8, help="candidate sets per forward (default 8)")
    parser.add_argument("--chain", type=int, default=8, help="longest speculative chain of nested sets (default 8)")
    parser.add_argument("--beam", type=int, default=4, help="beam width of the beam check (default 4)")
    parser.add_argument("--beam-steps", type=int, default=0, help="steps (the first) that also get the beam search")
    parser.add_argument("--attention-steps", type=int, default=0,
                        help="steps (the first) that also get the attention-only search")
    parser.add_argument("--free-running-steps", type=int, default=0,
                        help="steps (the first) whose oracle set is also generated with real skipping")
    parser.add_argument("--base", action="store_true", help="no adapter: the frozen base model (--config needed)")
    parser.add_argument("--seed", type=int, default=0, help="the order steps are drawn in")
    add_output_dir_argument(parser)


def run(args: argparse.Namespace) -> int:
    from ..adapters import (
        adapter_base_name,
        build_routed_model,
        load_adapter,
        read_adapter_meta,
        training_config,
    )
    from ..config import RunConfig, raw_config
    from ..data.build import load_steps
    from .stage_cache import directory_digest

    if bool(args.adapter) == bool(args.base):
        raise ConfigError("oracle: give --adapter DIR, or --base with --config")
    if args.steps < 1 or args.rows < 1 or args.chain < 1:
        raise ConfigError("oracle: --steps, --rows and --chain must be >= 1")
    if not args.margin >= 0:
        raise ConfigError(f"oracle: --margin must be >= 0 (logits), got {args.margin}")
    if args.base and not args.config:
        raise ConfigError("oracle --base needs --config")
    raw = raw_config(args, None if args.config else training_config(args.adapter))
    run_cfg = RunConfig.from_dict({k: raw.get(k) for k in ("model", "router", "lora", "data", "train", "eval")})
    if args.adapter:
        meta = read_adapter_meta(args.adapter)
        rm = load_adapter(args.adapter, replace(run_cfg.model, name=adapter_base_name(args.adapter, meta)))
        identity = directory_digest(args.adapter)
    else:
        rm = build_routed_model(run_cfg.model, run_cfg.router, replace(run_cfg.lora, enabled=False))
        rm.model.eval()
        identity = json.dumps({"base": asdict(run_cfg.model)}, sort_keys=True, default=str)
    criterion = args.criterion or ("exact" if args.step_type == "tool_call" else "answer")
    data = load_steps(run_cfg.data, rm.tokenizer)
    sources = [s for s in args.planning_sources.split(",") if s] if args.step_type == "planning" else None
    if args.split == "train":
        sources = None  # every training source of the type
    steps = draw_steps(list(data.train if args.split == "train" else data.eval), args.step_type, args.steps,
                       args.seed, sources)
    if not steps:
        raise ConfigError(f"oracle: no {args.split} steps of type {args.step_type}")
    torch.manual_seed(0)
    out = Path(args.output_dir) if args.split == "eval" else Path(args.output_dir) / "train"
    records = run_oracle(rm, identity, steps, run_cfg.eval, out, step_type=args.step_type,
                         criterion=criterion, nll_rise=args.nll_rise, rows=args.rows, chain=args.chain,
                         beam_steps=args.beam_steps, beam=args.beam, attention_steps=args.attention_steps,
                         free_running_steps=args.free_running_steps, margin=args.margin)
    sizes = [r["size"] for r in records if "size" in r]
    print(json.dumps({"type": args.step_type, "steps": len(records), "mean_size": sum(sizes) / max(len(sizes), 1),
                      "jsonl": str(out / f"oracle-{args.step_type}.jsonl")}))
    return 0

