"""Routers trained on the per-step oracle's targets (issue 35, item 3): per-block BCE towards each step's oracle set,
the full-depth LoRA kept, a confidence threshold chosen on validation steps for an accuracy budget.

**Why the LoRA is kept and the fit is offline.** An oracle set is defined against the adapter's own full-depth
output (`layerroute.calibrate.oracle`): training the LoRA jointly would move the very outputs the targets were measured
on. And the oracle's semantics is ``prompt_full_depth`` (the context runs every block; a skipped block skips the
step's own tokens): block l's router then reads the context's states entering block l *at full depth*, which no
decision changes. So each step's router inputs are fixed features, computed once by one forward of its context
(`router_inputs`), and fitting the routers is per-block logistic regression on them (linear kind; the mlp kind a
small MLP): seconds on a CPU, not a training run, and exactly what inference decides from.

**Targets.** A tool-call step's block runs (target 1) unless it is in the step's oracle set. Planning steps take
their oracle set where an oracle record exists for them, else every block runs: the ``answer`` criterion that finds
planning sets is not a guarantee (`layerroute.calibrate.oracle`), and the method's claim for planning is ~2% anyway.

**The threshold** (module `Router`: a block runs when sigmoid(logit) > threshold): a block is skipped only where the
router is sure, p(run) <= t for a small t. `exactness_frontier` measures, per threshold, how many validation steps
stay exact (every target token still the argmax under teacher forcing, the oracle's own check, one batched forward
per step) and what they skip; `choose_threshold` takes the most skipping threshold whose exact rate on tool calls
stays within the accuracy budget. A step that stays exact generates its full-depth output token for token, so its
score cannot change: the exact rate is a lower bound on the share of scores kept.

The comparison that says whether the decision is per input: `static_frontier`, the same check for the best *fixed*
sets (the blocks most often in the training steps' oracle sets, top k, on every tool call).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibrate.oracle import CachedStep
from ..flops import step_flops
from ..nn.routed import find_routed_layers, routing
from ..nn.router import Router, RouterSpec, masked_pool


def step_key(step) -> str:
    """A step's name in the oracle's records (conversation id # assistant turn)."""
    return f"{step.conversation_id}#{step.step_index}"


def oracle_sets(records: Sequence[dict]) -> dict[str, list[int]]:
    """Step name -> its oracle set, from the oracle's JSONL records (records without a set are left out)."""
    return {r["step"]: list(r["oracle"]) for r in records if "oracle" in r}


def run_targets(steps: Sequence, sets: dict[str, list[int]], n_layers: int) -> torch.Tensor:
    """[N, L] float: 1 where block l runs on step n (not in its oracle set; every block where it has none)."""
    run = torch.ones(len(steps), n_layers)
    for i, step in enumerate(steps):
        for j in sets.get(step_key(step), []):
            run[i, j] = 0.0
    return run


# ------------------------------------------------------------------------------------------------------------
# Features: what each block's router reads under prompt_full_depth


@torch.no_grad()
def router_inputs(rm, model, steps: Sequence, *, turn_token_id: int | None = None,
                  progress: bool = True) -> torch.Tensor:
    """[N, L, H] float32: for each step, the context's states entering each block at full depth, pooled as the
    routers pool them (`router.pooling`; the step's own tokens are not read). One forward per step of `model` (the
    module to call: e.g. the LoRA-merged one inference runs)."""
    layers = find_routed_layers(rm.model)
    captured: dict[int, torch.Tensor] = {}

    def hook(layer):
        def pre(_module, args, kwargs):
            captured[layer.index] = (args[0] if args else kwargs["hidden_states"]).detach()
        return pre

    handles = [layer.register_forward_pre_hook(hook(layer), with_kwargs=True) for layer in layers]
    out = torch.zeros(len(steps), len(layers), rm.config.hidden_size)
    pooling = rm.router_cfg.pooling
    rm.model.eval()
    try:
        for i, step in enumerate(tqdm(steps, desc="router inputs", unit="step", disable=not progress)):
            ids = torch.tensor([list(step.input_ids[:step.context_length])], device=rm.device)
            captured.clear()
            with routing(rm.model, "off"):
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
            mask = torch.ones(ids.shape, dtype=torch.float32, device=rm.device)
            marks = None if pooling != "last_turn" else (ids == turn_token_id)
            for j in range(len(layers)):
                out[i, j] = masked_pool(captured[j], mask, pooling, turn_marks=marks)[0].cpu()
    finally:
        for h in handles:
            h.remove()
    return out


# ------------------------------------------------------------------------------------------------------------
# The fit


def fit_routers(x: torch.Tensor, run: torch.Tensor, spec: RouterSpec, *, epochs: int = 400, lr: float = 0.02,
                weight_decay: float = 0.01, seed: int = 0, normalize_input: bool = True) -> list[Router]:
    """One `Router` per block, fitted by full-batch Adam on the BCE between its logit and `run` [N, L]
    (x [N, L, H]: `router_inputs`). Deterministic for a seed."""
    torch.manual_seed(seed)
    n, n_layers, hidden = x.shape
    routers = []
    for j in range(n_layers):
        r = Router(hidden, kind=spec, normalize_input=normalize_input)
        nn.init.normal_(spec.output_layer(r.net).weight, std=1e-3)
        y = run[:, j]
        # start at the block's base rate: a block every step runs needs no learning
        rate = float(y.mean().clamp(1e-3, 1 - 1e-3))
        nn.init.constant_(r.output_bias, float(torch.logit(torch.tensor(rate))))
        opt = torch.optim.AdamW(r.parameters(), lr=lr, weight_decay=weight_decay)
        loss_fn = nn.BCEWithLogitsLoss()
        xj = x[:, j]
        if 0 < rate < 1 and float(y.min()) < float(y.max()):
            for _ in range(epochs):
                opt.zero_grad()
                loss = loss_fn(r(xj), y)
                loss.backward()
                opt.step()
        routers.append(r.eval())
    return routers


@torch.no_grad()
def run_probabilities(routers: Sequence[Router], x: torch.Tensor) -> torch.Tensor:
    """[N, L]: each router's p(run) on its block's inputs."""
    return torch.stack([torch.sigmoid(r(x[:, j])) for j, r in enumerate(routers)], dim=1)


def skip_sets(prob: torch.Tensor, threshold: float) -> list[tuple[int, ...]]:
    """Per step, the blocks skipped at `threshold` (a block runs when p(run) > threshold, as `Router` decides)."""
    return [tuple(int(j) for j in torch.nonzero(row <= threshold).flatten()) for row in prob]


# ------------------------------------------------------------------------------------------------------------
# Frontiers: skip against exactness, by threshold (routers) or by size (fixed sets)


def _flop_fraction(rm, step, n_target: int, skipped: Sequence[int]) -> float:
    mask = [j not in set(skipped) for j in range(rm.num_layers)]
    return step_flops(rm.config, step.context_length, n_target, mask, prompt_full_depth=True,
                      count_routers=False)["block_skipped_fraction"]


@torch.no_grad()
def exactness_table(rm, model, steps: Sequence, targets: Sequence[Sequence[int]],
                    candidates: Sequence[Sequence[tuple[int, ...]]], *, rows: int = 8,
                    progress: bool = True) -> list[list[bool]]:
    """exact[n][c]: does step n stay exact (errors no more than at full depth) with candidate set c of its
    list `candidates[n]` removed? One cached context per step (`model`: the module to call), its distinct sets
    batched."""
    out = []
    rm.model.eval()
    for step, target, cands in tqdm(list(zip(steps, targets, candidates, strict=True)), desc="exactness",
                                    unit="step", disable=not progress):
        distinct = sorted({tuple(sorted(c)) for c in cands} - {()})
        if not distinct:
            out.append([True] * len(cands))
            continue
        cached = CachedStep(rm, model, step.input_ids[:step.context_length], target, rows=rows)
        res = cached.costs([()] + distinct)
        ok = {s: c.errors <= res[0].errors for s, c in zip(distinct, res[1:], strict=True)}
        out.append([ok.get(tuple(sorted(c)), True) for c in cands])
    return out


def summarize(rm, steps: Sequence, targets: Sequence[Sequence[int]], chosen: Sequence[tuple[int, ...]],
              exact: Sequence[bool]) -> dict:
    """Exact rate, mean blocks skipped and the FLOP shares of one candidate per step."""
    n = max(len(steps), 1)
    return {"steps": len(steps), "exact_rate": sum(exact) / n,
            "mean_skipped": sum(len(c) for c in chosen) / n,
            "decode_fraction": sum(len(c) for c in chosen) / (n * rm.num_layers),
            "block_fraction_prompt_full_depth": sum(
                _flop_fraction(rm, s, max(len(t), 1), c) for s, t, c in zip(steps, targets, chosen, strict=True)) / n}


def frequency_order(sets: dict[str, list[int]], n_layers: int) -> list[int]:
    """Blocks by how many training steps' oracle sets hold them (most first; ties: lower index)."""
    count = [0] * n_layers
    for s in sets.values():
        for j in s:
            count[j] += 1
    return sorted(range(n_layers), key=lambda j: (-count[j], j))


def choose_threshold(points: Sequence[dict], budget: float) -> dict | None:
    """The point of most skipping whose tool-call exact rate is at least 1 - budget (None: none is)."""
    ok = [p for p in points if p["tool_call"]["exact_rate"] >= 1 - budget]
    return max(ok, key=lambda p: (p["tool_call"]["mean_skipped"], -p["threshold"])) if ok else None


def split_train_val(items: Sequence, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded shuffle cut into (train, validation); validation gets round(fraction * n)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    k = round(fraction * len(items))
    return [items[i] for i in order[k:]], [items[i] for i in order[:k]]
