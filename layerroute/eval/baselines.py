"""Equal-FLOP baselines and the FLOP summary they are matched on.

At the routed model's budget (LoRA on): `shortgpt` removes the k blocks of lowest block influence
(1 - cos(h_in, h_out), measured on training steps), `random` skips k random blocks per step, where k is the routed
model's mean number of skipped blocks (per step type: `evaluate_adapter`)."""

from __future__ import annotations

import random
from functools import partial

import numpy as np
import torch

from .. import flops as flop_count


def flop_summary(model_config, steps, gates: list[list[bool]], idx: list[int], kv_policy: str,
                 count_routers: bool = True, prompt_full_depth: bool = False, bridge_rank: int = 0,
                 router_hidden: int | None = None) -> dict:
    """Block and total FLOPs skipped over the steps `idx` with these gates. router_hidden: the routers'
    `RouterSpec.flop_width` (None = `Linear(h, 1)`), so that an mlp router is counted as one."""
    parts = [
        flop_count.step_flops(model_config, steps[i].context_length, steps[i].length, gates[i],
                              kv_preserving=kv_policy == "kv_preserving", count_routers=count_routers,
                              prompt_full_depth=prompt_full_depth, bridge_rank=bridge_rank,
                              router_hidden=router_hidden)
        for i in idx
    ]
    agg = flop_count.aggregate(parts)
    return {"block_flops_skipped": agg["block_skipped_fraction"], "total_flops_skipped": agg["total_skipped_fraction"]}


def model_flop_summary(rm, steps, cfg):
    """`flop_summary(gates, idx, ...)` for this routed model's steps under an evaluation's cache policy and prompt
    depth: its routers counted as what they are (`rm.router_spec`: a linear or an mlp router), its skip bridges in
    every skipped block (also in forced configurations)."""
    return partial(flop_summary, rm.config, steps, kv_policy=cfg.kv_policy, prompt_full_depth=cfg.prompt_full_depth,
                   bridge_rank=rm.router_cfg.bridge_rank, router_hidden=rm.router_spec.flop_width)


def shortgpt_pattern(influence: list[float], k: int) -> list[bool]:
    drop = set(np.argsort(influence)[:k].tolist())
    return [i not in drop for i in range(len(influence))]


def random_patterns(n_steps: int, n_layers: int, k: int, seed: int) -> torch.Tensor:
    rng = random.Random(seed)
    pats = torch.ones(n_steps, n_layers, dtype=torch.bool)
    for s in range(n_steps):
        pats[s, rng.sample(range(n_layers), k)] = False
    return pats
