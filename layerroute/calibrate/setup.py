"""Measurements taken in setup, before the first update: router biases spread by block influence, the static
router targets of the drop_* / greedy_* / fixed oracles (single-block removal costs), and the skip bridges' fit."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from ..config import GREEDY_ORACLES, EvalConfig, TrainConfig
from ..errors import ConfigError
from .influence import block_influence, drop_costs, greedy_drop_targets, oracle_skip_targets


@contextmanager
def without_dropout(model: nn.Module):
    """eval() for a measurement taken mid-setup (no LoRA dropout), then the previous train/eval mode back."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


INFLUENCE_STEPS = 16  # training steps that measure block influence for router.init_bias_spread


def spread_router_biases(rm, steps, router_cfg, tc, pad_id: int) -> list[float]:
    """Initial router biases ordered by block influence (ShortGPT: 1 - cos(h_in, h_out), full depth): the least
    influential block gets init_bias, the most influential init_bias + spread, linear in rank. A uniform
    penalty then closes the cheapest blocks first instead of whichever the first noisy gradients pick
    (measured: random blocks at an equal count cost 100x the perplexity of ShortGPT's choice)."""
    with without_dropout(rm.model):
        influence = block_influence(rm, steps, EvalConfig(batch_size=tc.batch_size, seed=tc.seed), pad_id,
                                    progress=tc.progress)
    ranks = np.argsort(np.argsort(influence))  # 0 = least influential
    L = len(influence)
    with torch.no_grad():
        for router, rank in zip(rm.routers(), ranks, strict=True):
            router.output_bias.fill_(router_cfg.init_bias + router_cfg.init_bias_spread * rank / max(L - 1, 1))
    return influence


def static_oracle_targets(rm, train_steps: list, tc: TrainConfig, pad_id: int, *, main_process: bool,
                          log) -> tuple[torch.Tensor, dict]:
    """[2, L] static run targets (planning, tool call) from single-block drop costs, measured before any
    update (peft starts LoRA at zero, or train.experimental.init_lora's, so a resumed run measures the same model and gets
    the same targets).
    drop_nll ranks blocks by the NLL a removal adds; drop_errors by the greedy token errors it adds (NLL
    breaking ties): NLL is dominated by tokens the model is unsure of anyway, errors by the ones it gets right.
    greedy_* grow the set one block at a time from the same single-drop costs (removals interact).
    Returns the targets and their record (summary.json's oracle_targets); `log` prints a line on the main process."""
    L = rm.num_layers
    if tc.oracle_source == "fixed":  # chosen by the user: no calibration
        blocks = sorted(set(tc.oracle_skip_blocks))
        if blocks[-1] >= L:
            raise ConfigError(f"train.oracle_skip_blocks: block {blocks[-1]} does not exist ({L} blocks: 0..{L - 1})")
        tool = torch.ones(L)
        tool[blocks] = 0.0
        record = {"tool_call": {"skip": blocks, "fixed": True}}
        log(f"[setup] fixed oracle, tool_call: skip blocks {blocks}")
        return torch.stack([torch.ones(L), tool]), record
    rows, record = [], {}
    for step_type, frac in (("planning", tc.oracle_skip_planning), ("tool_call", tc.oracle_skip_tool)):
        n_skip = int(round(frac * L))
        if n_skip == 0:
            rows.append(torch.ones(L))
            continue
        steps = [s for s in train_steps if s.step_type == step_type][: tc.oracle_calibration_steps]
        ecfg = EvalConfig(batch_size=tc.batch_size, seed=tc.seed, prompt_full_depth=tc.experimental.prompt_full_depth)
        greedy_path = None
        with without_dropout(rm.model):
            costs = drop_costs(rm, steps, ecfg, pad_id, progress=tc.progress and main_process,
                               desc=f"removal costs ({step_type}, {len(steps)} steps)")
            if tc.oracle_source in GREEDY_ORACLES:
                target, greedy_path = greedy_drop_targets(rm, steps, ecfg, n_skip, tc.oracle_source, costs,
                                                          tc.experimental.oracle_greedy_candidates, pad_id)
            else:
                target = oracle_skip_targets(costs, n_skip, tc.oracle_source)
        rows.append(target)
        record[step_type] = {"costs": costs["nll"], "token_error_costs": costs["token_errors"],
                             "skip": [i for i in range(L) if target[i] == 0]}
        if greedy_path is not None:
            record[step_type]["greedy_path"] = greedy_path
            log(f"[setup] {tc.oracle_source} path, {step_type}: " + ", ".join(
                f"+{p['block']} (NLL {p['nll']:+.3f}, errors {p['token_errors']:+.3f})" for p in greedy_path))
        log(f"[setup] {tc.oracle_source} oracle, {step_type}: skip blocks {record[step_type]['skip']} "
                    f"(single-drop NLL costs {min(costs['nll']):+.3f} .. {max(costs['nll']):+.3f} nats/token, "
                    f"token-error costs {min(costs['token_errors']):+.3f} .. {max(costs['token_errors']):+.3f}, "
                    f"{len(steps)} steps)")
    return torch.stack(rows), record


def fit_skip_bridges(rm, train_steps: list, tc: TrainConfig, pad_id: int, *, progress: bool) -> tuple[list[float], int]:
    """Closed-form fit of the skip bridges on the first train.bridge_calibration_steps tool-call steps (the first
    steps of any type when there is no tool call); returns each block's explained share and the steps used."""
    from .bridges import fit_bridges

    calib = [s for s in train_steps if s.step_type == "tool_call"][: tc.bridge_calibration_steps]
    calib = calib or train_steps[: tc.bridge_calibration_steps]
    explained = fit_bridges(rm, calib, tc.batch_size, pad_id, tc.seed,  # in eval mode, then back
                            progress=progress)
    return explained, len(calib)
