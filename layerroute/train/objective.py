"""The routed training objective: one forward of the routed model -> per-row NLL sums, gates and router targets
(`RoutedStepLoss`), and the loss of one micro-batch as its share of the optimizer step's loss (`loss_parts`).

Loss = LM loss on the step's own target tokens (teacher forced) + lambda x gate regulariser (+ bce router loss)
(+ self-distillation).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from ..calibrate.influence import RowInfluence, influence_targets
from ..config import TrainConfig
from ..nn.losses import distillation_kl, per_row_sum, sliced_lm_loss, target_logits


class RoutedStepLoss(nn.Module):
    """One forward of the routed model in `mix` mode -> per-row NLL sums and every block's gate.

    A module of its own so that DDP (accelerate's `prepare`) wraps the whole forward, gates included.
    Returns row_sum [B], row_count [B], prob [L, B] (sigmoid, with gradient), gate [L, B] (hard, straight-through).
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig | None = None):
        super().__init__()
        self.model = model
        self.cfg = cfg or TrainConfig()
        # [2, L] run targets of planning (row 0) and tool-call (row 1) steps when they are static (drop_nll, drop_errors)
        self.static_targets: torch.Tensor | None = None

    def drop_mask(self, batch: int, num_layers: int, is_tool_call: torch.Tensor | None, device) -> torch.Tensor | None:
        """[B, L] keep-mask for LayerSkip-style block dropping: block l is dropped with probability
        rate * l / (L - 1) (never the first block, most often the last), only while training."""
        rate = self.cfg.experimental.block_drop_rate
        if rate <= 0 or not self.training:
            return None
        depth = torch.linspace(0, 1, num_layers, device=device)  # [L]
        keep = torch.rand(batch, num_layers, device=device) >= rate * depth  # [B, L]; global RNG: resumable
        if self.cfg.experimental.block_drop_on == "tool_call" and is_tool_call is not None:
            keep |= ~is_tool_call.to(device).bool().unsqueeze(1)  # planning rows keep every block
        return keep

    def forward(self, input_ids, attention_mask, labels, decision_mask, is_tool_call=None):
        from ..nn.routed import gate_records, routing, routing_state

        distill = self.cfg.experimental.distill_weight > 0 and self.training
        keep = self.drop_mask(input_ids.shape[0], routing_state(self.model).num_layers, is_tool_call,
                              input_ids.device)
        influence = self.cfg.router_loss == "targets" and self.training
        per_step = influence and self.static_targets is None  # targets measured in this forward (oracle_source)
        probe = RowInfluence(self.model, attention_mask) if per_step else nullcontext()
        with probe, routing(self.model, "mix", decision_mask=decision_mask, keep=keep,
                            straight_through=self.cfg.router_lm_grad, prompt_full_depth=self.cfg.experimental.prompt_full_depth):
            row_sum, row_count, logits, rows = sliced_lm_loss(
                self.model, input_ids, attention_mask, labels, return_logits=True
            )
            records = gate_records(self.model)
        prob = torch.stack([r.prob for r in records])  # [L, B]
        gate = torch.stack([r.gate for r in records]).to(prob.dtype)  # [L, B]
        kl_row = row_sum.new_zeros(row_sum.shape)
        if distill:
            # Self-distillation: the teacher is the same weights at full depth (all gates open), no gradient.
            # Costs one more forward per micro-batch (no backward).
            with torch.no_grad(), routing(self.model, "mix", forced="open"):
                teacher, _, _ = target_logits(self.model, input_ids, attention_mask, labels)
            kl = distillation_kl(logits, teacher, self.cfg.experimental.distill_temperature)  # [N]
            kl_row = per_row_sum(kl, rows, row_sum.shape[0])
        oracle_target = None
        if self.cfg.router_loss == "oracle" and self.training:
            # Oracle-guided router targets, first order: skipping block l moves its gate 1 -> 0, so the row's NLL
            # changes by about -dNLL/dg_l. A block whose estimated cost is below epsilon is a skip target.
            # Costs one extra backward pass to the gates (autograd.grad), about +60% of a step.
            per_row = row_sum / row_count.clamp_min(1)  # [B] mean NLL per step
            grads = torch.autograd.grad(per_row.sum(), [r.gate for r in records], retain_graph=True, allow_unused=True)
            cost = torch.stack([-g if g is not None else torch.zeros_like(per_row) for g in grads])  # [L, B]
            oracle_target = (cost.detach() > self.cfg.experimental.oracle_epsilon).to(prob.dtype)  # 1 = run
        if per_step:
            # Influence-oracle targets: in each row, the blocks whose own output changes the hidden state least
            # (ShortGPT's 1 - cos, measured at the block's actual input in this very forward) are skip targets,
            # as many as the step type's fraction says. Free: a cosine per block, no extra pass.
            frac = torch.where(is_tool_call.to(prob.device).bool(), self.cfg.oracle_skip_tool,
                               self.cfg.oracle_skip_planning)
            n_skip = (frac * prob.shape[0]).round().long()  # [B]
            oracle_target = influence_targets(probe.value.to(prob.device), n_skip).to(prob.dtype)
        elif influence:  # static per-type targets (drop_*), measured once in Trainer.setup
            rows_type = is_tool_call.to(prob.device).long()  # [B]: 0 planning, 1 tool call
            oracle_target = self.static_targets.to(prob.device, prob.dtype)[rows_type].T  # [L, B]
        return row_sum, row_count, prob, gate, {"kl_row": kl_row, "oracle_target": oracle_target}


@dataclass
class LossParts:
    """The terms of one micro-batch's loss, each already divided by its optimizer-step-wide denominator."""

    lm: torch.Tensor
    reg: torch.Tensor
    bce: torch.Tensor
    distill: torch.Tensor
    total: torch.Tensor


def loss_parts(
    cfg: TrainConfig,
    row_sum: torch.Tensor,
    prob: torch.Tensor,
    gate: torch.Tensor,
    is_tool_call: torch.Tensor,
    *,
    kl_row: torch.Tensor | None = None,
    oracle_target: torch.Tensor | None = None,
    tokens_total: int,
    rows_total: int,
    micro_total: int,
) -> LossParts:
    """The loss of one micro-batch as its share of the whole optimizer step's loss.

    The denominators span every micro-batch of the step on every process, so that summing the parts over the
    step gives the token-mean LM loss and the row-mean regulariser, however the rows were split into micro-batches
    and processes.
    """
    zero = row_sum.new_zeros(())
    lm = row_sum.sum() / max(tokens_total, 1)
    kind = cfg.regularizer
    reg_term = None  # lambda x reg when lambda differs per row
    if kind in ("soft_mean", "hard_ste"):
        # soft_mean (the paper's) penalises the mean sigmoid prob; hard_ste the hard decision with the sigmoid's
        # gradient (straight-through). The gradients are identical (d gate / d prob = 1): only the logged value
        # differs. Measured: the two train bit-identical adapters (tests/test_train_objective.py, RESULTS.md).
        per_row = (prob if kind == "soft_mean" else gate).mean(dim=0)  # [B] run-rate of each row
        reg = per_row.sum() / rows_total
        if cfg.reg_weight_planning is not None:
            lam = torch.where(is_tool_call.to(per_row.device).bool(), cfg.reg_weight, cfg.reg_weight_planning)
            reg_term = (lam.to(per_row.dtype) * per_row).sum() / rows_total
    elif kind == "budget":  # only the batch's mean run-rate is constrained: tool calls may skip more than planning
        reg = (gate.mean() - cfg.experimental.target_run_rate).pow(2) / micro_total
    else:
        reg = zero
    if reg_term is None:
        reg_term = cfg.reg_weight * reg
    if cfg.router_loss != "none" and (cfg.router_loss == "bce" or oracle_target is not None):
        if cfg.router_loss == "bce":
            # LayerRoute-BCE: every block's router is told the step type (tool call -> skip, planning -> run).
            target = (~is_tool_call).to(prob.dtype).expand_as(prob)  # [L, B]
        else:
            target = oracle_target  # [L, B] from first-order costs or block influence (RoutedStepLoss)
        p = prob.clamp(1e-6, 1 - 1e-6)
        bce_rows = -(target * p.log() + (1 - target) * (1 - p).log()).mean(dim=0)  # [B]
        bce = bce_rows.sum() / rows_total
    else:
        bce = zero
    # self-distillation: token-mean KL to the full-depth model, over the same tokens as the LM loss
    distill = kl_row.sum() / max(tokens_total, 1) if kl_row is not None else zero
    total = lm + reg_term + cfg.bce_weight * bce + cfg.experimental.distill_weight * distill
    return LossParts(lm=lm, reg=reg, bce=bce, distill=distill, total=total)
