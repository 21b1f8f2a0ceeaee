"""Next-token NLL computed only where labels are set.

The LM head is a large share of the forward (vocab 49k-152k x hidden per position): projecting every position
and then masking most of them away wastes it. Here the decoder runs once, the hidden states at the positions
that predict a labelled token are gathered, and only those go through the LM head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _causal_lm(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def target_nll(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
    """Per-token NLL at labelled positions.

    Returns (nll [N] float32, row [N] long): N = number of labelled next-token targets in the batch, `row` the
    batch row of each. Equal to the `labels=` loss of transformers (tested) at a fraction of the LM-head cost.
    """
    lm = _causal_lm(model)
    hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, H]
    targets = labels[:, 1:]  # position t predicts token t + 1
    keep = targets != -100  # [B, T-1]
    picked = hidden[:, :-1][keep]  # [N, H]
    logits = lm.get_output_embeddings()(picked).float()  # [N, V]
    nll = F.cross_entropy(logits, targets[keep], reduction="none")
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(keep)[keep]
    return nll, rows
