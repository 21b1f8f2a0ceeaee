"""The teacher-forced pass of one configuration (`teacher_forced`): per step, target NLL, greedy token errors and
the gates applied, with LoRA and routing set as the configuration says; `ppl` and `teacher_forced_exact` summarise
its results.

Configurations (`evaluate_adapter`'s): base, lora_full_depth (every block runs), routed, routed_no_lora (the routers
decide), shortgpt and random (LoRA on, forced gates). `evaluate_adapter` runs it (calibration, `layerroute.calibrate.influence.skip_set_cost`, does its own forward).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from ..adapters import RoutedModel
from ..config import EvalConfig
from ..data.collate import collate_steps, length_grouped_batches
from ..nn.losses import row_argmax_errors, sliced_lm_loss
from ..nn.routed import gate_records, routing
from ..special_tokens import pad_token_id


def _ppl_context(rm: RoutedModel, config: str, decision_mask, *, threshold=None, forced=None,
                 prompt_full_depth=False):
    """(lora context manager, routing context manager) for one configuration."""
    use_lora = config in ("lora_full_depth", "routed", "shortgpt", "random")
    lora = nullcontext() if use_lora else rm.lora_disabled()
    if config in ("base", "lora_full_depth"):
        route = routing(rm.model, "mix", decision_mask=decision_mask, forced="open")
    else:
        route = routing(rm.model, "mix", decision_mask=decision_mask, threshold=threshold, forced=forced,
                        prompt_full_depth=prompt_full_depth)
    return lora, route


@torch.no_grad()
def teacher_forced(rm: RoutedModel, steps, config: str, cfg: EvalConfig, *, threshold=None, patterns=None,
                   desc: str = "", pad_id: int | None = None) -> list[dict]:
    """Per step: summed target NLL, token count, greedy token errors (targets that are not the argmax given the
    gold prefix), and the gates applied ([L] bools).

    patterns: optional [n_steps, L] bool tensor of forced gates (baselines)."""
    pad = pad_token_id(rm.tokenizer) if pad_id is None else pad_id
    results: list[dict | None] = [None] * len(steps)
    batches = length_grouped_batches(steps, cfg.batch_size, seed=cfg.seed)
    for batch_idx in tqdm(batches, desc=desc or config, leave=False, disable=len(batches) < 4):
        batch = collate_steps([steps[i] for i in batch_idx], pad)
        batch = {k: v.to(rm.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        forced = patterns[batch_idx] if patterns is not None else None
        lora, route = _ppl_context(rm, config, batch["decision_mask"], threshold=threshold, forced=forced,
                                   prompt_full_depth=cfg.prompt_full_depth)
        with lora, route:
            sums, counts, logits, rows = sliced_lm_loss(rm.model, batch["input_ids"], batch["attention_mask"],
                                                        batch["labels"], return_logits=True)
            errors = row_argmax_errors(logits, batch["labels"], rows)
            gates = torch.stack([r.gate for r in gate_records(rm.model)], dim=1)  # [B, L]
            probs = torch.stack([r.prob for r in gate_records(rm.model)], dim=1)
        for j, i in enumerate(batch_idx):
            results[i] = {
                "nll": float(sums[j]), "tokens": int(counts[j]), "errors": int(errors[j]),
                "gates": gates[j].bool().tolist(), "probs": probs[j].float().tolist(),
            }
    return results  # type: ignore[return-value]


def ppl(results: list[dict], idx: list[int]) -> float:
    nll = sum(results[i]["nll"] for i in idx)
    tokens = sum(results[i]["tokens"] for i in idx)
    return math.exp(nll / tokens) if tokens else float("nan")


def teacher_forced_exact(results: list[dict], idx: list[int]) -> float:
    """The fraction of steps with no greedy token error under teacher forcing: the steps greedy decoding reproduces
    token for token. A lower bound on free-running accuracy (the AST checker also accepts equivalent calls) that
    costs one forward per step instead of a generation."""
    return sum(results[i]["errors"] == 0 for i in idx) / len(idx) if idx else float("nan")
