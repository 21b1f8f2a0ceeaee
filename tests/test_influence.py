"""Block influence: the per-row probe sees each block's own output (closed gate or not), the mean over steps is
the length-weighted mean of the rows, and the influence oracle skips the k least influential blocks of each row."""

from __future__ import annotations

import pytest
import torch

from layerroute.calibrate.influence import RowInfluence, influence_targets
from layerroute.nn.routed import routing
from tests.helpers import random_batch, tiny_routed


def test_influence_targets_skip_the_k_least_influential_blocks_of_each_row():
    influence = torch.tensor([[0.5, 0.1], [0.2, 0.9], [0.9, 0.3], [0.1, 0.4]])  # [L=4, B=2]
    target = influence_targets(influence, torch.tensor([2, 1]))
    # row 0 skips blocks 3 (0.1) and 1 (0.2); row 1 skips block 0 (0.1) only
    assert target.T.tolist() == [[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]]
    assert influence_targets(influence, torch.tensor([0, 9])).T.tolist() == [[1.0] * 4, [0.0] * 4]


def _probe(rm, ids, mask, forced):
    with torch.no_grad(), RowInfluence(rm.model, mask) as probe, routing(rm.model, "mix", forced=forced):
        rm.model(input_ids=ids, attention_mask=mask)
    return probe.value


def test_row_influence_measures_the_block_not_the_gate():
    rm = tiny_routed()
    ids, _ = random_batch(batch=3, length=10)
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0  # a padded row: its mean covers its real tokens only
    opened = _probe(rm, ids, mask, "open")
    assert opened.shape == (rm.num_layers, 3) and bool((opened > 0).all())
    # Under grad (as in training) a closed gate still runs the block: the probe reports the block's own
    # influence, not the 0 a hook on the routed layer would see for h_out = h_in.
    with RowInfluence(rm.model, mask) as probe, routing(rm.model, "mix", forced=[False] + [True] * (rm.num_layers - 1)):
        rm.model(input_ids=ids, attention_mask=mask)
    assert probe.value[0].tolist() == pytest.approx(opened[0].tolist(), rel=1e-5)  # block 0 saw the same input
    # a row's value ignores its padding: the same row unpadded and cut to its real tokens gives the same number
    alone = _probe(rm, ids[2:3, :6], torch.ones(1, 6, dtype=mask.dtype), "open")
    assert alone[:, 0].tolist() == pytest.approx(opened[:, 2].tolist(), rel=1e-4, abs=1e-6)


def test_row_influence_raises_when_a_block_never_ran():
    rm = tiny_routed()
    ids, _ = random_batch(batch=2, length=8)
    mask = torch.ones_like(ids)
    with pytest.raises(RuntimeError, match="did not run"):
        _probe(rm, ids, mask, "closed")  # no grad + every gate closed: the blocks are not run at all
