"""benchmarks/lossless_drafts_table.py: the docs' tables come from a result file, ratios against dense and lookup."""

from __future__ import annotations

import importlib.util

from tests.helpers import ROOT


def _module():
    spec = importlib.util.spec_from_file_location("lossless_drafts_table", ROOT / "benchmarks" / "lossless_drafts_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(cpu_s, decode_s, forwards, by_source=None):
    return {"steps": 2, "identical_to_dense": 2, "tokens": 60, "forwards": forwards, "tokens_per_forward": 60 / forwards,
            "by_source": by_source or {}, "cpu_s_per_step": cpu_s, "cpu_prefill_s_per_step": cpu_s - decode_s,
            "cpu_decode_s_per_step": decode_s}


def test_each_configuration_is_a_row_with_its_ratios():
    result = {"model": "m", "dtype": "bfloat16", "adapter": "a", "date": "d", "complete": False, "steps_done": 2,
              "steps_drawn": ["x", "y", "z"], "dense_tool_call_prefill_share": 0.25,
              "machine": {"cpu": "cpu", "cores": 2, "bf16_native_cpu": True},
              "summary": {"tool_call": {"dense": _row(4.0, 3.0, 60), "lookup": _row(2.0, 1.0, 30),
                                        "grammar_lookup": _row(1.6, 0.6, 15, {"grammar": {"accepted_per_forward": 2.5}})},
                          "planning": {"dense": None}}}
    text = _module().tables(result)
    assert "2 steps done of 3 drawn (partial)" in text and "planning" not in text
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
             if line.startswith("| ")]
    rows = {row[0]: dict(zip(cells[0], row, strict=True)) for row in cells[1:]}
    g = rows["grammar_lookup"]
    assert g["vs dense"] == "2.50" and g["vs lookup"] == "1.25" and g["decode vs dense"] == "5.00"
    assert g["accepted / decode forward by drafter"] == "grammar 2.50" and rows["dense"]["vs lookup"] == "0.50"
    assert "prefill share of a dense tool-call step: 25.0%" in text
