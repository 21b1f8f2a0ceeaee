"""load_steps: bad-row accounting, threshold, disjoint splits, eval-only BFCL categories, length matching."""

import json
import os
import random

import pytest
from transformers import AutoTokenizer

from layerroute.data.build import load_steps
from layerroute.data.config import DataConfig
from layerroute.data.render import PLANNING, TOOL_CALL
from layerroute.data.splits import assign_split, bin_histogram, hash_fraction, length_matched_subset
from layerroute.errors import DataError
from tests.helpers import synthetic_step

HERE = os.path.dirname(__file__)
FIX = os.path.join(HERE, "fixtures", "data")


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(os.path.join(HERE, "fixtures", "tokenizers", "smollm2"))


def fixture_sources():
    return [
        {"name": "hermes", "path": os.path.join(FIX, "hermes_function_calling_v1.json")},
        {"name": "glaive", "path": os.path.join(FIX, "glaive_function_calling_v2.json")},
        {"name": "gsm8k_hub", "path": os.path.join(FIX, "gsm8k_main.jsonl")},
        {"name": "turing", "path": os.path.join(FIX, "turing_open_reasoning.json")},
        {"name": "jsonl", "path": os.path.join(FIX, "messages.jsonl")},
        {"name": "bfcl", "path": os.path.join(FIX, "bfcl"), "categories": ["simple_python"]},
    ]


def test_bad_rows_counted_by_source_and_reason(tok):
    cfg = DataConfig.from_dict(
        {"sources": fixture_sources(), "bad_row_max_fraction": 1.0, "progress": False, "eval_fraction": 0.3}
    )
    data = load_steps(cfg, tok)
    st = data.stats()
    json.dumps(st)  # JSON-able
    assert st["rejected_rows"] == {
        "hermes": {
            "tool_call_invalid_json": 1,
            "unknown_role": 1,
            "no_assistant_turn": 1,
            "tool_call_unclosed": 1,
        },
        "glaive": {"tool_call_arguments_invalid_json": 1, "no_assistant_turn": 1, "unknown_role": 1},
        "gsm8k_hub": {"no_final_answer": 1, "missing_field": 1},
        "turing": {"missing_field": 1},
        "jsonl": {"unknown_role": 1, "no_assistant_turn": 1, "invalid_json_line": 1},
        "bfcl": {"bfcl_missing_ground_truth": 1},
    }
    assert st["repaired_rows"]["hermes"] == {"python_literal_call": 1}
    assert st["repaired_rows"]["glaive"]["string_encoded_arguments"] == 1
    assert st["rows"]["glaive"]["duplicates"] == 1
    assert st["rejected_examples"]["hermes"]["unknown_role"] == [
        "hermes:bad-unknown-role: turn 2 is from 'observation'"
    ]
    n_steps = len(data.train) + len(data.eval)
    assert n_steps == sum(r["steps"] for r in st["rows"].values())
    assert sum(st["totals"]["train"].values()) + sum(st["totals"]["eval"].values()) == n_steps


def test_bad_row_threshold_raises_with_examples(tok):
    cfg = DataConfig.from_dict({"sources": fixture_sources()[:1], "progress": False})  # default 5%
    with pytest.raises(DataError) as e:
        load_steps(cfg, tok)
    msg = str(e.value)
    assert "hermes: 4 of 8 rows (50.0%)" in msg and "data.bad_row_max_fraction" in msg
    assert "tool_call_invalid_json: 1" in msg and "hermes:bad-truncated-json:" in msg


def test_splits_are_disjoint_by_conversation_and_deterministic(tok):
    d = {
        "sources": [
            {"name": "gsm8k_jsonl", "limit": 120, "turns_per_conversation": 2},  # the packaged GSM8K train
            {"name": "glaive", "path": os.path.join(FIX, "glaive_function_calling_v2.json")},
        ],
        "eval_fraction": 0.3,
        "bad_row_max_fraction": 1.0,
        "progress": False,
    }
    a = load_steps(DataConfig.from_dict(d), tok)
    train_ids = {s.conversation_id for s in a.train}
    eval_ids = {s.conversation_id for s in a.eval}
    assert train_ids and eval_ids and not train_ids & eval_ids
    assert 0.15 < len(eval_ids) / (len(eval_ids) + len(train_ids)) < 0.45
    b = load_steps(DataConfig.from_dict(d), tok)
    assert [s.id for s in a.train] == [s.id for s in b.train] and [s.id for s in a.eval] == [
        s.id for s in b.eval
    ]
    # chained math: two planning steps per conversation, the second sees the first
    conv = [s for s in a.train if s.source == "gsm8k_jsonl"][:2]
    assert [s.step_index for s in conv] == [0, 1] and conv[1].input_ids[: conv[0].total_length] == conv[
        0
    ].input_ids
    assert conv[1].reference["content"].endswith(f"The answer is {conv[1].meta['answer']}.")
    # a different seed moves conversations between splits
    c = load_steps(DataConfig.from_dict({**d, "seed": 1}), tok)
    assert {s.conversation_id for s in c.eval} != eval_ids


def test_bfcl_live_categories_never_in_train(tok):
    d = {
        "sources": [
            {
                "name": "bfcl",
                "categories": ["parallel", "live_simple", "live_parallel"],
                "limit": 15,
                "role": "train",
            }
        ],
        "eval_fraction": 0.2,
        "progress": False,
        "max_length": 2048,
    }
    data = load_steps(DataConfig.from_dict(d), tok)
    assert data.train and all(not s.category.startswith("live_") for s in data.train)
    assert {s.category for s in data.eval} == {"live_simple", "live_parallel"}
    assert all(s.step_type == TOOL_CALL for s in data.train + data.eval)


def _step(i, kind, ctx, n):
    return synthetic_step(i, ctx, n, kind)


def test_length_matched_subset_has_matched_bins():
    rng = random.Random(0)
    # tool calls: long contexts, short targets; planning: short contexts, long targets; some overlap
    steps = [_step(i, TOOL_CALL, rng.randint(150, 900), rng.randint(20, 120)) for i in range(400)]
    steps += [_step(1000 + i, PLANNING, rng.randint(40, 500), rng.randint(40, 300)) for i in range(400)]
    sub, info = length_matched_subset(steps, ratio=1.25, seed=0)
    h = bin_histogram(sub, 1.25)
    assert h[TOOL_CALL] == h[PLANNING] and sum(h[TOOL_CALL].values()) == info["per_type"] > 20
    assert info["size"] == len(sub) == 2 * info["per_type"]
    assert len({s.id for s in sub}) == len(sub)
    sub2, _ = length_matched_subset(list(reversed(steps)), ratio=1.25, seed=0)
    assert sorted(s.id for s in sub2) == sorted(s.id for s in sub)  # deterministic, order-independent
    capped, cinfo = length_matched_subset(steps, ratio=1.25, seed=0, max_per_type=10)
    hc = bin_histogram(capped, 1.25)
    assert hc[TOOL_CALL] == hc[PLANNING] and cinfo["per_type"] == 10 == sum(hc[TOOL_CALL].values())


def test_length_matched_on_real_steps(tok):
    d = {
        "sources": [
            {"name": "bfcl", "categories": ["simple_python", "parallel"], "limit": 30, "role": "eval"},
            {
                "name": "gsm8k_jsonl",  # the packaged GSM8K train split
                "limit": 90,
                "role": "eval",
                "turns_per_conversation": 3,
            },
        ],
        "progress": False,
    }
    data = load_steps(DataConfig.from_dict(d), tok)
    h = bin_histogram(data.eval_length_matched, 1.25)
    assert h[TOOL_CALL] == h[PLANNING] and data.stats()["length_matched"]["per_type"] > 0
    assert {s.id for s in data.eval_length_matched} <= {s.id for s in data.eval}


def test_assign_split():
    assert assign_split("a", seed=0, eval_fraction=0.5, role="train") == "train"
    assert assign_split("a", seed=0, eval_fraction=0.0, role="eval") == "eval"
    assert assign_split("a", seed=0, eval_fraction=0.0, eval_only=True) == "eval"
    frac = sum(assign_split(f"id{i}", seed=3, eval_fraction=0.1) == "eval" for i in range(5000)) / 5000
    assert 0.08 < frac < 0.12
    assert hash_fraction("x", 1) == hash_fraction("x", 1) != hash_fraction("x", 2)
