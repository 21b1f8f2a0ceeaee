"""`layerroute curve`: argument-value token masks, removal orders, and the curve end to end on a tiny model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from layerroute.adapters import save_adapter
from layerroute.config import RunConfig
from layerroute.data.build import load_steps
from layerroute.errors import ConfigError
from layerroute.eval.skip_curve import (
    _call_arguments,
    _verdict,
    argument_value_spans,
    argument_value_steps,
    removal_order,
    removal_pattern,
    skip_curve,
)
from tests.helpers import tiny_routed

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "tokenizers", "smollm2")


def test_argument_value_spans_find_each_value_after_its_key_in_call_order():
    text = '<tool_call>\n{"name": "f", "arguments": {"a": -3, "b": "Paris", "c": [1, 2]}}\n</tool_call>'
    calls = [{"function": {"name": "f", "arguments": json.dumps({"a": -3, "b": "Paris", "c": [1, 2]})}}]
    spans = argument_value_spans(text, calls)
    assert [text[a:b] for a, b in spans] == ["-3", '"Paris"', "[1, 2]"]
    # a value the text does not hold (the call was rendered otherwise) is skipped, not guessed
    assert argument_value_spans(text, [{"name": "f", "arguments": {"a": 4}}]) == []


def test_argument_value_steps_keep_labels_on_value_tokens_only():
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    cfg = RunConfig.from_yaml(str(ROOT / "configs" / "smoke.yaml")).data
    steps = [s for s in load_steps(cfg, tok).train if s.step_type == "tool_call"][:6]
    masked, dropped = argument_value_steps(steps, tok)
    assert masked and len(masked) + dropped == len(steps)
    for orig, s in zip([s for s in steps if any(s.id == m.id for m in masked)], masked, strict=True):
        kept = [t for t in s.labels if t != -100]
        assert 0 < len(kept) < orig.length  # fewer targets than the whole call, never the context
        assert s.labels[: s.context_length] == orig.labels[: orig.context_length]
        text = tok.decode(kept)
        values = [v for c in orig.reference["tool_calls"] for v in _call_arguments(c).values()]
        assert any(str(v).strip('"') in text for v in values)


def test_removal_order_breaks_ties_then_index_and_patterns_close_the_first_k():
    assert removal_order([0.0, -1.0, 0.0, 2.0], ties=[0.5, 0.0, 0.1, 0.0]) == [1, 2, 0, 3]
    assert removal_pattern([1, 2, 0, 3], 2, 4) == [True, False, False, True]
    with pytest.raises(ConfigError, match="cannot remove 5 of 4"):
        removal_pattern([0, 1, 2, 3], 5, 4)


def test_verdict_needs_the_whole_interval_on_one_side():
    assert _verdict({"vs_reference": {"diff_ci95": [-0.5, 3.0]}}, 1.0) == "holds"
    assert _verdict({"vs_reference": {"diff_ci95": [-9.0, -2.0]}}, 1.0) == "loses"
    assert _verdict({"vs_reference": {"diff_ci95": [-9.0, 2.0]}}, 1.0) == "cannot tell"


def test_curve_end_to_end_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the smoke config names its fixture tokenizer relative to the repository
    cfg = RunConfig.from_yaml(str(ROOT / "configs" / "smoke.yaml"), [
        "eval.max_new_tokens_tool=6", "eval.max_new_tokens_planning=6", "eval.bootstrap=50",
        "eval.calibration_steps=2", "eval.accuracy_batch_size=2"])
    rm = tiny_routed("shape:tiny-qwen2")
    rm.tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    adapter = save_adapter(rm, tmp_path / "a", extra={"config": cfg.to_dict()})
    out = tmp_path / "curve"
    doc = skip_curve(str(adapter), cfg, out, blocks=[0, 1, 2], rankings=["shortgpt", "drop_nll", "arg_errors"],
                     routed=[str(adapter)], tool_calls=3, planning=2, calibration_steps=2)
    for t, n in (("tool_call", 3), ("planning", 2)):
        e = doc["types"][t]
        assert e["n"] == n and len(e["steps"]) == n
        for r in ("shortgpt", "drop_nll", "arg_errors"):
            pts = e["static"][r]
            assert [p["k"] for p in pts] == [1, 2]
            assert all(len(p["skipped"]) == p["k"] and p["vs_reference"]["n"] == n for p in pts)
            assert pts[0]["skipped"] == sorted(doc["rankings"][r]["order"][:1])
        # the routers of this adapter start open: routed is the reference's generation, step for step
        (routed,) = e["routed"]
        assert routed["blocks_skipped_mean"] == 0 and routed["vs_reference"]["diff_points"] == 0
        # the same adapter as the reference: its own full depth is the reference, step for step
        assert routed["own_full_depth"]["vs_reference"]["diff_points"] == 0
        assert routed["vs_own_full_depth"]["n"] == n
    assert sorted(doc["rankings"]["arg_errors"]["order"]) == list(range(4))
    assert (out / "curve.png").stat().st_size > 1000
    assert "static, arg_errors" in (out / "curve.md").read_text()
    json.loads((out / "curve.json").read_text())
    # a rerun reuses every finished stage (here: all of them) instead of generating again
    again = skip_curve(str(adapter), cfg, out, blocks=[0, 1, 2], rankings=["shortgpt", "drop_nll", "arg_errors"],
                       routed=[str(adapter)], tool_calls=3, planning=2, calibration_steps=2)
    assert again["types"] == doc["types"]
    assert "reused" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--rankings", "shortgpt,nope"], "--rankings"),
    (["--blocks", "0,x"], "--blocks"),
    (["--tool-calls", "0"], "--tool-calls"),
])
def test_curve_cli_rejects_bad_flags_naming_them(tmp_path, flags, message, capsys):
    from layerroute.cli import main

    rc = main(["curve", "--adapter", str(tmp_path / "none"), "--output-dir", str(tmp_path / "o"), *flags])
    assert rc != 0 and message in capsys.readouterr().err
