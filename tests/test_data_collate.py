"""collate_steps shapes and padding; length_grouped_batches covers every index once and limits padding."""

import random

import pytest
import torch

from layerroute.data.collate import collate_steps, length_grouped_batches
from layerroute.data.render import PLANNING, TOOL_CALL
from tests.helpers import synthetic_step


def _step(i, ctx, n, kind=TOOL_CALL):
    return synthetic_step(i, ctx, n, kind, ids=[10 + (i + j) % 50 for j in range(ctx + n)])


def test_collate_shapes_and_padding():
    steps = [_step(0, 5, 3, TOOL_CALL), _step(1, 2, 2, PLANNING), _step(2, 7, 4, PLANNING)]
    b = collate_steps(steps, pad_token_id=0)
    B, T = 3, 11
    assert set(b) >= {
        "input_ids",
        "attention_mask",
        "labels",
        "decision_mask",
        "is_tool_call",
        "context_length",
    }
    for k in ("input_ids", "attention_mask", "labels", "decision_mask"):
        assert b[k].shape == (B, T) and b[k].dtype == torch.long
    assert b["is_tool_call"].dtype == torch.bool and b["is_tool_call"].tolist() == [True, False, False]
    assert b["context_length"].tolist() == [5, 2, 7] and b["length"].tolist() == [3, 2, 4]
    assert b["attention_mask"].sum(1).tolist() == [8, 4, 11]
    row = 1  # right padding
    assert b["input_ids"][row, 4:].eq(0).all() and b["labels"][row, 4:].eq(-100).all()
    assert b["decision_mask"][row].tolist() == [1, 1] + [0] * 9
    # decision positions never overlap labelled positions, and are all attended
    assert not ((b["decision_mask"] == 1) & (b["labels"] != -100)).any()
    assert ((b["decision_mask"] == 1) <= (b["attention_mask"] == 1)).all()
    assert (b["labels"] != -100).sum().item() == 3 + 2 + 4
    with pytest.raises(ValueError):
        collate_steps([], 0)


def test_length_grouped_batches():
    rng = random.Random(0)
    steps = [_step(i, rng.randint(5, 400), rng.randint(5, 100)) for i in range(203)]
    batches = length_grouped_batches(steps, batch_size=8, seed=1)
    flat = [i for bt in batches for i in bt]
    assert sorted(flat) == list(range(203)) and all(1 <= len(bt) <= 8 for bt in batches)
    assert batches == length_grouped_batches(steps, batch_size=8, seed=1)
    assert batches != length_grouped_batches(steps, batch_size=8, seed=2)

    def padding(bs):
        return sum(
            max(len(steps[i].input_ids) for i in bt) * len(bt) - sum(len(steps[i].input_ids) for i in bt)
            for bt in bs
        )

    order = list(range(203))
    random.Random(1).shuffle(order)
    random_batches = [order[j : j + 8] for j in range(0, 203, 8)]
    assert padding(batches) < 0.2 * padding(random_batches)
