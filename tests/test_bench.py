"""The benchmark harness: ideal speedups from FLOPs, and one tiny end-to-end run of `layerroute bench`."""

from __future__ import annotations

import json

import pytest
import torch

from layerroute import flops
from layerroute.cli import main
from layerroute.eval.bench import _ideal
from layerroute.model import shape_config


def test_ideal_is_one_when_nothing_is_skipped_and_grows_with_skips():
    cfg = shape_config("qwen2.5-0.5b")
    dense = _ideal(cfg, 64, 16, [[True] * 24], None)
    assert dense["decode"]["ideal_speedup"] == pytest.approx(1.0)
    assert dense["step"]["ideal_speedup"] < 1.0  # the routers cost a little
    half = [i % 2 == 0 or i < 2 for i in range(24)]
    ideal = _ideal(cfg, 64, 16, [half], None)
    expected = flops.step_flops(cfg, 64, 16, half)
    assert ideal["step"]["ideal_speedup"] == pytest.approx(1 / (1 - expected["total_skipped_fraction"]))
    assert 1.0 < ideal["decode"]["ideal_speedup"] < 1 / (1 - sum(not x for x in half) / 24)  # LM head is kept


def test_bench_cli_prints_a_table_and_writes_one_json_line(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--model", "shape:tiny-llama", "--skip-fraction", "0.25", "--batch", "1", "2",
                 "--reps", "1", "--warmup", "0", "--tool", "8:3", "--planning", "12:4", "--output", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "{" not in table  # the terminal gets the table; the JSON is in the file, on one line
    (line,) = out.read_text().splitlines()
    report = json.loads(line)
    # one row per scenario x batch x configuration (and a header and a rule)
    rows = sum(len(r["configs"]) for r in report["results"])
    assert len(table.strip().splitlines()) == rows + 2 and "grouped0.25" in table
    assert report["patterns"] == {"0.25": "11.1"}
    keys = {(r["scenario"], r["batch"]) for r in report["results"]}
    assert keys == {("tool", 1), ("tool", 2), ("planning", 1), ("planning", 2)}
    b2 = next(r for r in report["results"] if r["batch"] == 2 and r["scenario"] == "tool")
    assert set(b2["configs"]) == {"dense", "open", "skip0.25", "mixed0.25", "grouped0.25"}
    assert b2["speedups"]["mixed0.25"]["skipped_blocks_per_row"] == [1, 0]
    for key in ("decode", "step", "cpu_decode", "cpu_step"):
        assert b2["speedups"]["skip0.25"][key]["ideal_speedup"] > 1.0
    assert "router_overhead" in b2 and "tool_b2" in report["headline"]


def test_bench_with_an_adapter_lets_its_routers_decide(tmp_path, capsys):
    from tests.helpers import tiny_routed

    rm = tiny_routed("shape:tiny-llama")
    with torch.no_grad():  # a router that always closes block 2
        rm.routers()[2].net.bias.fill_(-5.0)
    rm.save(tmp_path / "adapter")
    code = main(["bench", "--adapter", str(tmp_path / "adapter"), "--batch", "1", "--reps", "1", "--warmup", "0",
                 "--scenarios", "tool", "--tool", "8:3", "--json"])  # --json: the JSON line, last on stdout
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (res,) = report["results"]
    assert set(res["configs"]) == {"dense", "open", "routed"}
    assert res["speedups"]["routed"]["skipped_blocks_per_row"] == [1]


def test_real_steps_time_each_steps_own_context_with_the_routers_gates():
    from transformers import AutoTokenizer

    from layerroute.data.build import load_steps
    from layerroute.eval.bench import bench_real_steps
    from tests.helpers import tiny_routed
    from tests.test_evaluate import TOKENIZER, data_cfg

    rm = tiny_routed("shape:tiny-qwen2")
    rm.tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    with torch.no_grad():  # block 1 always closed: every step skips exactly one of four blocks
        rm.routers()[1].net.bias.fill_(-5.0)
    steps = [s for s in load_steps(data_cfg(4), rm.tokenizer).eval if s.step_type == "tool_call"][:2]
    res = bench_real_steps(rm, steps, reps=2, warmup=0, new_tokens=3, log=lambda _: None)
    assert res["steps"] == 2 and res["new_tokens"] == 6
    assert res["context_tokens"] == sum(s.context_length for s in steps)
    assert res["skipped_blocks_per_step"] == [1, 1]
    assert res["block_flops_skipped"] == pytest.approx(0.25, abs=1e-12)  # every block costs the same
    assert res["ideal_speedup"] > 1.0
    assert res["configs"]["dense"]["step_ms"]["n"] == 2
    assert res["speedup"]["step_measured_median"] > 0


REAL_STEPS = {  # bench_real_steps' result, trimmed to what the table reads
    "steps": 2, "context_tokens": 600, "new_tokens": 40, "block_flops_skipped": 0.3, "ideal_speedup": 1.4,
    "skipped_blocks_per_step": [9, 8],
    "configs": {c: {"ttft_ms": {"median": t}, "decode_ms_per_token": {"median": d}, "step_ms": {"median": s}}
                for c, t, d, s in (("dense", 400.0, 50.0, 2000.0), ("routed", 300.0, 40.0, 1600.0))},
    "speedup": {"step_eff_median": 1.25 / 1.4},
}


def test_real_steps_table_pairs_skip_with_speedup():
    from layerroute.eval.bench import real_steps_table

    lines = real_steps_table(REAL_STEPS).splitlines()
    dense = next(line for line in lines if line.startswith("dense")).split()
    routed = next(line for line in lines if line.startswith("routed")).split()
    assert dense[1:3] == ["0", "0.0%"] and dense[-2:] == ["1.00x", "1.00x"]
    assert routed[1:3] == ["8-9", "30.0%"]  # blocks skipped per step: their range
    assert routed[3:] == ["300.0", "40.0", "1,600.0", "1.25x", "1.40x"]  # ms medians, measured and ideal speedup
    assert lines[-1].endswith("0.89")


def test_steps_from_needs_an_adapter(capsys):
    assert main(["bench", "--steps-from", "configs/offline-smollm2.yaml"]) == 2
    assert "--steps-from needs --adapter" in capsys.readouterr().err
