"""The sliced target NLL equals transformers' own `labels=` loss."""

from __future__ import annotations

import pytest
import torch

from layerroute.losses import target_nll
from layerroute.routed import routing
from tests.helpers import TINY_SHAPES, random_batch, tiny_routed


@pytest.mark.parametrize("shape", TINY_SHAPES)
def test_target_nll_matches_labels_loss(shape):
    rm = tiny_routed(shape)
    ids, mask = random_batch(batch=3, length=10, context=6)
    labels = ids.clone()
    labels[:, :6] = -100
    labels[2, 8:] = -100  # a row with fewer targets (as after padding)
    attention = torch.ones_like(ids)
    with torch.no_grad(), routing(rm.model, "mix", decision_mask=mask):
        nll, rows = target_nll(rm.model, ids, attention, labels)
        ref = rm.model(input_ids=ids, attention_mask=attention, labels=labels).loss
    assert nll.shape == rows.shape == (4 + 4 + 2,)
    assert torch.bincount(rows).tolist() == [4, 4, 2]
    assert torch.allclose(nll.mean(), ref, atol=1e-5)
