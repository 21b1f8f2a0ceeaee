"""report.md from small eval.json-shaped dicts: the first table pairs each skip with the accuracy it costs, and a
threshold sweep whose points coincide is said in words, not plotted."""

from __future__ import annotations

import math

from layerroute.eval.report import cost_table, sweep_coincides, sweep_lines, write_report


def _entry(block: float, total: float, ppl: dict, baselines: dict | None = None) -> dict:
    return {"n": 4, "block_flops_skipped": block, "total_flops_skipped": total, "ppl": ppl,
            "baselines": baselines or {}}


def _acc(accuracy: float, n: int = 8) -> dict:
    return {"accuracy": accuracy, "n": n}


def _doc(sweep: list[dict] | None = None) -> dict:
    ppl = {"base": 3.0, "lora_full_depth": 1.3, "routed": 1.6, "routed_no_lora": 9.0}
    shortgpt = {"shortgpt": {"ppl": 2.5, "block_flops_skipped": 0.3, "total_flops_skipped": 0.25}}
    full = {
        "tool_call": _entry(0.3, 0.28, ppl, shortgpt),
        "planning": _entry(0.0, -0.001, dict(ppl, routed=1.3), {}),
        "skip_differential_points": 30.0, "differential_ci95": [29.0, 31.0], "gate_context_length_correlation": 0.1,
        "per_layer_run_rate": {"tool_call": [1.0, 0.0, 1.0], "planning": [1.0, 1.0, 1.0]},
    }
    return {
        "adapters": ["a"], "seeds": [], "splits": {"full": full, "length_matched": full},
        "accuracy": {"tool_call": {"base": _acc(0.0), "lora_full_depth": _acc(0.5), "routed": _acc(0.25),
                                   "shortgpt": _acc(0.125)},
                     "planning": {"lora_full_depth": _acc(0.25, 4), "routed": _acc(0.25, 4)}},
        "accuracy_paired_routed_vs_lora": {"tool_call": {"n": 8, "diff_points": -25.0, "diff_ci95": [-50.0, 0.0],
                                                         "both_correct": 2, "only_a": 2, "only_b": 0}},
        "threshold_sweep": sweep,
    }


def _row(lines: list[str], step_type: str, configuration: str) -> list[str]:
    row = next(line for line in lines if line.startswith(f"| {step_type} | {configuration}"))
    return [cell.strip() for cell in row.strip("|").split("|")]


def test_first_table_pairs_each_skip_with_the_accuracy_it_costs():
    lines = cost_table(_doc())
    assert lines[0].startswith("## What each skip costs")
    # step type, configuration, block skip %, total skip %, accuracy, cost vs LoRA full depth, PPL
    assert _row(lines, "tool_call", "routed") == [
        "tool_call", "routed (the routers decide)", "30.0", "28.0", "25.0% (n=8)", "-25.0 [-50.0, 0.0]", "1.60"]
    assert _row(lines, "tool_call", "LoRA")[2:6] == ["0.0", "0.0", "50.0% (n=8)", "(reference)"]
    assert _row(lines, "tool_call", "ShortGPT")[2:6] == ["30.0", "25.0", "12.5% (n=8)", "-37.5"]  # unpaired
    assert _row(lines, "tool_call", "base")[4:6] == ["0.0% (n=8)", "-50.0"]
    # measured without generation: its skip and PPL, and no accuracy claimed
    assert _row(lines, "tool_call", "routed without LoRA")[4:7] == ["not generated", "n/a", "9.00"]
    # no baseline measured on planning steps (the routers skipped none): no row rather than an empty one
    assert not any(line.startswith("| planning | ShortGPT") for line in lines)
    assert _row(lines, "planning", "routed")[4:6] == ["25.0% (n=4)", "0.0"]
    assert any("differential 30.0 points" in line for line in lines)


def test_report_opens_with_the_cost_table_and_keeps_the_papers_terms_below(tmp_path):
    text = write_report(_doc(), tmp_path).read_text()
    assert text.index("## What each skip costs") < text.index("## In the paper's terms") < text.index(
        "## Honest columns")


def _point(threshold: float, tool: float, plan: float, tool_ppl: float = 1.6) -> dict:
    return {"threshold": threshold, "tool_call": {"ppl": tool_ppl, "total_flops_skipped": tool},
            "planning": {"ppl": 1.3, "total_flops_skipped": plan}}


def test_a_sweep_of_binary_routers_coincides_and_is_said_not_plotted(tmp_path):
    sweep = [_point(t, 0.28, -0.001) for t in (0.3, 0.5, 0.7, 0.9)]
    assert sweep_coincides(sweep)
    (tmp_path / "pareto.png").write_bytes(b"an earlier run's plot")
    text = write_report(_doc(sweep), tmp_path).read_text()
    assert "Every threshold tried (0.3, 0.5, 0.7, 0.9) gives the same gates" in text
    assert "pareto.png" not in text and not (tmp_path / "pareto.png").exists()


def test_a_sweep_that_moves_gets_its_table_and_plot(tmp_path):
    sweep = [_point(0.5, 0.28, 0.0), _point(0.9, 0.40, 0.05, tool_ppl=2.0)]
    assert not sweep_coincides(sweep)
    lines = sweep_lines({"threshold_sweep": sweep})
    assert "| 0.9 | 40.0 | 2.00 | 5.0 | 1.30 |" in lines and "![threshold sweep](pareto.png)" in lines
    write_report(_doc(sweep), tmp_path)
    assert (tmp_path / "pareto.png").stat().st_size > 1000


def test_coinciding_needs_two_points_and_counts_nan_alike():
    assert not sweep_coincides([_point(0.5, 0.2, 0.0)])
    nan = [_point(t, 0.2, 0.0, tool_ppl=math.nan) for t in (0.5, 0.9)]
    assert sweep_coincides(nan)
    assert not sweep_coincides([_point(0.5, 0.2, 0.0), _point(0.9, 0.2, 0.0, tool_ppl=1.7)])
