"""The sliced target NLL equals transformers' own `labels=` loss."""

from __future__ import annotations

import pytest
import torch

from layerroute.nn.losses import distillation_kl, row_argmax_errors, sliced_lm_loss
from layerroute.nn.routed import routing
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
        row_sum, row_count, logits, rows = sliced_lm_loss(rm.model, ids, attention, labels, return_logits=True)
        ref = rm.model(input_ids=ids, attention_mask=attention, labels=labels).loss
    assert logits.shape[0] == rows.shape[0] == 4 + 4 + 2
    assert row_count.tolist() == [4, 4, 2]
    assert torch.allclose(row_sum.sum() / row_count.sum(), ref, atol=1e-5)


def test_distillation_kl_is_zero_for_identical_and_positive_otherwise():
    a = torch.randn(5, 11)
    assert torch.allclose(distillation_kl(a, a), torch.zeros(5), atol=1e-6)
    b = a + torch.randn(5, 11)
    kl = distillation_kl(b, a)
    assert (kl > 0).all()
    manual = (a.softmax(-1) * (a.log_softmax(-1) - b.log_softmax(-1))).sum(-1)
    assert torch.allclose(kl, manual, atol=1e-5)


def test_argmax_errors_count_targets_that_greedy_decoding_would_not_pick():
    rm = tiny_routed(TINY_SHAPES[0])
    ids, mask = random_batch(batch=2, length=10, context=6)
    attention = torch.ones_like(ids)
    with torch.no_grad(), routing(rm.model, "mix", decision_mask=mask):
        full = rm.model(input_ids=ids, attention_mask=attention).logits  # [B, T, V]
        greedy = full[:, :-1].argmax(-1)  # [B, T-1]: the argmax next token at every position
        # row 0's targets are the model's own argmax continuation (no error); row 1's are random ids
        labels = torch.full_like(ids, -100)
        labels[0, 7:] = greedy[0, 6:]
        labels[1, 7:] = ids[1, 7:]
        *_, logits, rows = sliced_lm_loss(rm.model, ids, attention, labels, return_logits=True)
    errors = row_argmax_errors(logits, labels, rows)
    assert errors[0] == 0
    assert errors[1] == int((greedy[1, 6:] != ids[1, 7:]).sum())
