"""Next-token losses computed only where labels are set.

The LM head is a large share of the forward (vocab 49k-152k x hidden per position): projecting every position
and then masking most of them away wastes it. Here the decoder runs once, the hidden states at the positions
that predict a labelled token are gathered, and only those go through the LM head: a 1,500-token tool schema
with a 40-token call costs 40 vocabulary projections, not 1,500.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder stack (embeddings -> blocks -> final norm) and the LM head of a causal LM (through PEFT)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def target_logits(model: nn.Module, input_ids, attention_mask, labels):
    """Logits at the positions that predict a labelled token.

    Returns (logits [N, V] float32, targets [N], rows [N]): N = labelled next-token targets in the batch."""
    decoder, head = backbone_and_head(model)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state  # [B,T,H]
    targets = labels[:, 1:]  # [B, T-1]: position t predicts token t+1
    keep = targets != IGNORE_INDEX  # [B, T-1]
    logits = head(hidden[:, :-1][keep]).float()  # [N, V]
    rows = keep.nonzero()[:, 0]  # [N] row of each picked position (row-major, as the boolean index above)
    return logits, targets[keep], rows


def per_row_sum(values: torch.Tensor, rows: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.zeros(batch, device=values.device, dtype=values.dtype).index_add(0, rows, values)


def row_argmax_errors(logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[B] long: per row, the labelled targets that are not the argmax of their logits (from `target_logits`).

    Zero errors in a row = greedy decoding, fed the gold prefix, reproduces every target token: by induction the
    free-running greedy output is the target itself."""
    targets = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]  # [N], the order of target_logits' boolean index
    return per_row_sum((logits.argmax(-1) != targets).long(), rows, labels.shape[0])


def sliced_lm_loss(model: nn.Module, input_ids, attention_mask, labels, *, return_logits: bool = False):
    """Next-token NLL summed per row, logits computed only where the next token is a target.

    Equals `model(..., labels=labels).loss` (= row_sum.sum() / row_count.sum(); tested).
    Returns (row_sum [B] float32, row_count [B] long), plus (logits [N, V], rows [N]) with return_logits."""
    logits, targets, rows = target_logits(model, input_ids, attention_mask, labels)
    nll = F.cross_entropy(logits, targets, reduction="none")  # [N]
    batch = labels.shape[0]
    row_sum = per_row_sum(nll, rows, batch)
    row_count = torch.bincount(rows, minlength=batch)
    return (row_sum, row_count, logits, rows) if return_logits else (row_sum, row_count)


def distillation_kl(student_logits, teacher_logits, temperature: float = 1.0) -> torch.Tensor:
    """Per-token KL(teacher || student) [N] of the next-token distributions (teacher detached), x T^2."""
    t = temperature
    teacher = F.log_softmax(teacher_logits.detach() / t, dim=-1)
    student = F.log_softmax(student_logits / t, dim=-1)
    return (teacher.exp() * (teacher - student)).sum(dim=-1) * (t * t)
