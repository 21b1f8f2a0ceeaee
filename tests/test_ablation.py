"""`layerroute ablation`: recipes x seeds from real eval.json documents (a tiny model's evaluation)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from layerroute.cli import main
from layerroute.config import EvalConfig
from layerroute.data.build import load_steps
from layerroute.errors import ConfigError
from layerroute.eval.ablation import aggregate_recipes, markdown, parse_recipe, read_included
from layerroute.eval.adapter import evaluate_adapter
from layerroute.eval.runner import assemble
from layerroute.nn.routed import find_routed_layers
from tests.test_evaluate import data_cfg, setup  # noqa: F401  (module fixture: tiny routed model + tokenizer)

# length-matching bins 4x wide: the tiny data's few steps then have a length-matched split to score
WIDE_BINS = {"length_match_bin_ratio": 4.0}


@pytest.fixture(scope="module")
def one_eval(setup):  # noqa: F811
    rm, _, _ = setup
    cfg = EvalConfig(batch_size=4, max_steps_per_type=3, thresholds=[], bootstrap=20,
                     accuracy_steps_per_type=1, accuracy_length_matched_per_type=1, max_new_tokens_tool=4,
                     max_new_tokens_planning=4, calibration_steps=2,
                     accuracy_configs=["base", "lora_full_depth", "routed", "shortgpt", "random"])
    data = load_steps(data_cfg(**WIDE_BINS), rm.tokenizer)
    router = find_routed_layers(rm.model)[1].router.net
    saved = router.bias.detach().clone()
    with torch.no_grad():
        router.bias.fill_(-5.0)  # block 1 always skipped: the equal-FLOP baselines then remove one block too
    try:
        res = evaluate_adapter(rm, data, cfg, {"note": "tiny"})
    finally:
        with torch.no_grad():
            router.bias.copy_(saved)
    res["adapter"] = "a"
    return res


def test_equal_flop_baselines_match_each_step_types_routed_block_count(one_eval):
    assert one_eval["baseline_blocks_skipped"] == {"tool_call": 1, "planning": 1}  # block 1 of 4 always closed
    for t in ("tool_call", "planning"):
        entry = one_eval["splits"]["full"][t]
        for name in ("shortgpt", "random"):
            assert entry["baselines"][name]["block_flops_skipped"] == pytest.approx(entry["block_flops_skipped"])


def _write(tmp_path, name, res, differential):
    res = copy.deepcopy(res)
    res["adapter"] = f"runs/{name}/adapter"  # one adapter per seed, as in real runs
    for split in ("full", "length_matched"):
        res["splits"][split]["skip_differential_points"] = differential
    path = tmp_path / name / "eval.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(assemble([res], {}, None), default=str))
    return path


def test_recipes_aggregate_seeds_and_flag_sign(one_eval, tmp_path):
    a = [_write(tmp_path, f"good-s{i}", one_eval, d) for i, d in enumerate((10.0, 20.0, 30.0))]
    b = [_write(tmp_path, f"mixed-s{i}", one_eval, d) for i, d in enumerate((5.0, -5.0))]
    agg = aggregate_recipes({"good": [str(p) for p in a], "mixed": [str(p) for p in b]})
    d = agg["good"]["length_matched"]["skip_differential_points"]
    assert d["mean"] == pytest.approx(20.0) and d["values"] == [10.0, 20.0, 30.0]
    assert agg["good"]["seeds"] == 3 and agg["mixed"]["seeds"] == 2
    ppl = one_eval["splits"]["full"]["tool_call"]["ppl"]["routed"]
    assert agg["mixed"]["full"]["tool_call.ppl.routed"]["mean"] == pytest.approx(ppl)
    assert "tool_call.ppl.shortgpt" in agg["good"]["full"]  # the equal-FLOP baselines come along
    md = markdown(agg)
    rows = [line for line in md.splitlines() if line.startswith("| good | full | 3 |")]
    assert len(rows) == 1 and "| yes |" in rows[0] and "20.0 ± 8.2" in rows[0]
    assert any(line.startswith("| mixed | full | 2 |") and "| no |" in line for line in md.splitlines())


def test_cli_writes_table_json_and_plot(one_eval, tmp_path, capsys):
    for i, d in enumerate((3.0, 4.0)):
        _write(tmp_path, f"r-s{i}", one_eval, d)
    out = tmp_path / "out"
    assert main(["ablation", "--recipe", f"r={tmp_path}/r-s*/eval.json", "--output-dir", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["r"]["full"] == pytest.approx(3.5)
    assert (out / "ablation.png").stat().st_size > 1000
    assert (out / "ablation_tradeoff.png").stat().st_size > 1000
    assert (out / "ablation_accuracy.png").stat().st_size > 1000  # the evaluations scored routed and LoRA
    assert json.loads((out / "ablation.json").read_text())["r"]["seeds"] == 2
    md = (out / "ablation.md").read_text()
    assert "## Quality" in md and "routed - LoRA (points)" in md


def test_an_included_table_keeps_its_seeds_and_a_seed_evaluated_again_replaces_its_row(one_eval, tmp_path, capsys):
    old = [_write(tmp_path / "then", f"r-s{i}", one_eval, d) for i, d in enumerate((1.0, 2.0))]
    _write(tmp_path / "then", "q-s0", one_eval, 7.0)
    first = tmp_path / "first"
    assert main(["ablation", "--recipe", f"r={old[0]},{old[1]}", "--recipe", f"q={tmp_path}/then/q-s0/eval.json",
                 "--output-dir", str(first)]) == 0
    for path in old:  # the runs are gone (a new machine): the table must not need them
        path.unlink()
    again = _write(tmp_path / "now", "r-s1", one_eval, 5.0)  # seed 1 evaluated again
    new = _write(tmp_path / "now", "r-s2", one_eval, 9.0)  # and a new seed
    capsys.readouterr()
    out = tmp_path / "second"
    assert main(["ablation", "--include", str(first / "ablation.json"), "--recipe", f"r={again},{new}",
                 "--output-dir", str(out)]) == 0
    agg = json.loads((out / "ablation.json").read_text())
    assert list(agg) == ["r", "q"]  # included order first
    d = agg["r"]["full"]["skip_differential_points"]
    assert agg["r"]["seeds"] == 3 and d["values"] == [1.0, 5.0, 9.0] and d["mean"] == pytest.approx(5.0)
    assert agg["r"]["adapters"] == ["runs/r-s0/adapter", "runs/r-s1/adapter", "runs/r-s2/adapter"]
    assert agg["q"]["seeds"] == 1 and agg["q"]["full"] == json.loads((first / "ablation.json").read_text())["q"]["full"]
    # each seed's paired routed - LoRA interval is listed per seed (it does not average over seeds)
    md = (out / "ablation.md").read_text()
    paired = one_eval["accuracy_paired_routed_vs_lora"]["tool_call"]
    row = next(line for line in md.splitlines() if line.startswith("| r | runs/r-s2/adapter |"))
    assert f"{paired['diff_points']:.1f} ({paired['diff_ci95'][0]:.1f} to {paired['diff_ci95'][1]:.1f})" in row
    # the included table alone rebuilds the same markdown
    alone = tmp_path / "alone"
    assert main(["ablation", "--include", str(out / "ablation.json"), "--output-dir", str(alone)]) == 0
    assert (alone / "ablation.md").read_text() == (out / "ablation.md").read_text()


def test_a_bad_included_table_is_rejected_naming_the_flag(tmp_path, capsys):
    with pytest.raises(ConfigError, match="--include .*no such file"):
        read_included(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="--include .*not an ablation.json .invalid JSON"):
        read_included(str(bad))
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="--include .*not an ablation.json .expected recipes"):
        read_included(str(bad))
    legacy = tmp_path / "legacy.json"  # aggregates without per-seed rows (before session 10)
    legacy.write_text(json.dumps({"r": {"seeds": 1, "full": {}, "length_matched": {}}}))
    with pytest.raises(ConfigError, match="'r' has no per-seed rows"):
        read_included(str(legacy))
    assert main(["ablation", "--output-dir", str(tmp_path / "o")]) == 2
    assert "--recipe" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_accuracy_is_paired_step_by_step_and_the_plot_needs_it(one_eval, tmp_path):
    from layerroute.eval.ablation import plot_accuracy

    p = one_eval["accuracy_paired_routed_vs_lora"]["tool_call"]
    acc = one_eval["accuracy"]["tool_call"]
    assert p["n"] == acc["routed"]["n"] == acc["lora_full_depth"]["n"]
    assert p["diff_points"] == pytest.approx(100 * (acc["routed"]["accuracy"] - acc["lora_full_depth"]["accuracy"]))
    without = copy.deepcopy(one_eval)
    without.pop("accuracy")
    agg = aggregate_recipes({"x": [str(_write(tmp_path, "x-s0", without, 1.0))]})
    assert plot_accuracy(agg, tmp_path / "acc.png") is False and not (tmp_path / "acc.png").exists()



def test_accuracy_table_shows_teacher_forced_exactness_when_the_evaluation_has_it(one_eval, tmp_path):
    doc = copy.deepcopy(one_eval)
    doc["accuracy"]["tool_call"]["routed"]["teacher_forced_exact"] = 0.25
    old = copy.deepcopy(one_eval)
    for v in old["accuracy"]["tool_call"].values():  # an evaluation from before session 5
        v.pop("teacher_forced_exact", None)
    agg = aggregate_recipes({"new": [str(_write(tmp_path, "new-s0", doc, 1.0))],
                             "old": [str(_write(tmp_path, "old-s0", old, 1.0))]})
    rows = {line.split(" | ")[0][2:]: line for line in markdown(agg).splitlines()
            if line.startswith(("| new | full | tool_call", "| old | full | tool_call"))}
    assert rows["new"].endswith("| 25.0 |") and rows["old"].endswith("| n/a | n/a |")


def test_each_split_is_scored_on_its_own_draw_with_both_equal_flop_baselines(one_eval, setup, tmp_path):  # noqa: F811
    rm, _, _ = setup
    data = load_steps(data_cfg(**WIDE_BINS), rm.tokenizer)
    assert data.eval_length_matched  # else the test below would pass on nothing
    matched = {(s.conversation_id, s.step_index) for s in data.eval_length_matched}
    for t in ("tool_call", "planning"):
        lm = one_eval["accuracy_length_matched"][t]
        assert set(lm) == {"base", "lora_full_depth", "routed", "shortgpt", "random"}
        assert all((x["conversation_id"], x["step_index"]) in matched for x in lm["routed"]["samples"])
        assert lm["routed"]["n"] == 1 and one_eval["accuracy"][t]["random"]["n"] == 1
        assert one_eval["accuracy_paired_routed_vs_lora_length_matched"][t]["n"] == 1
    agg = aggregate_recipes({"r": [str(_write(tmp_path, "r-s0", one_eval, 1.0))]})
    assert agg["r"]["length_matched"]["tool_call.accuracy_n.random"]["mean"] == 1
    md = markdown(agg)
    assert any(line.startswith("| r | length_matched | planning | 1 |") for line in md.splitlines())
    assert "unseen functions" not in md  # the tiny data has no eval-only BFCL category
    from layerroute.eval.ablation import plot_accuracy_splits

    assert plot_accuracy_splits(agg, tmp_path / "splits.png") and (tmp_path / "splits.png").stat().st_size > 1000
    old = copy.deepcopy(one_eval)  # an evaluation from before session 9: no length-matched draw, nothing to plot
    old.pop("accuracy_length_matched")
    agg_old = aggregate_recipes({"o": [str(_write(tmp_path, "o-s0", old, 1.0))]})
    assert not plot_accuracy_splits(agg_old, tmp_path / "none.png") and not (tmp_path / "none.png").exists()


def test_bad_recipe_specs_name_the_flag(tmp_path):
    with pytest.raises(ConfigError, match="--recipe"):
        parse_recipe("no-equals-sign")
    with pytest.raises(ConfigError, match="matches no file"):
        parse_recipe(f"x={tmp_path}/nothing-*/eval.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not an eval.json"):
        aggregate_recipes({"x": [str(bad)]})
    with pytest.raises(ConfigError, match="no such evaluation"):
        aggregate_recipes({"x": [str(tmp_path / "missing.json")]})


def test_a_metric_missing_in_some_seeds_says_so(one_eval, tmp_path):
    with_baseline = _write(tmp_path, "a-s0", one_eval, 1.0)
    without = copy.deepcopy(one_eval)
    for split in ("full", "length_matched"):
        for t in ("tool_call", "planning"):
            without["splits"][split][t].pop("baselines", None)
    path = tmp_path / "a-s1" / "eval.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(assemble([without], {}, None), default=str))
    md = markdown(aggregate_recipes({"a": [str(with_baseline), str(path)]}))
    assert "(1 of 2 seeds)" in md


def test_prompt_full_depth_counts_only_the_steps_own_tokens_as_skipped(setup, one_eval):  # noqa: F811
    rm, _, _ = setup
    cfg = EvalConfig(batch_size=4, max_steps_per_type=3, thresholds=[], bootstrap=20, accuracy_steps_per_type=0,
                     calibration_steps=2, prompt_full_depth=True)
    data = load_steps(data_cfg(**WIDE_BINS), rm.tokenizer)
    router = find_routed_layers(rm.model)[1].router.net
    saved = router.bias.detach().clone()
    with torch.no_grad():
        router.bias.fill_(-5.0)  # block 1 closed for every step, as in one_eval
    try:
        res = evaluate_adapter(rm, data, cfg, {})
    finally:
        with torch.no_grad():
            router.bias.copy_(saved)
    for t in ("tool_call", "planning"):
        whole, steps_only = one_eval["splits"]["full"][t], res["splits"]["full"][t]
        assert whole["block_flops_skipped"] == pytest.approx(0.25)  # 1 of 4 blocks, context included
        assert 0 < steps_only["block_flops_skipped"] < 0.25  # the context still runs block 1
    lo, hi = res["splits"]["full"]["differential_ci95"]
    assert lo <= res["splits"]["full"]["skip_differential_points"] <= hi  # the interval is about the same measure


def _seeded(res, seed: int, correct: dict[str, bool]):
    """`res` trained with `seed` (as the eval.json's run config says), each configuration's steps all right or all
    wrong as `correct` says."""
    res = copy.deepcopy(res)
    res["meta"] = {**(res.get("meta") or {}), "training": {"config": {"train": {"seed": seed}}}}
    for c, ok in correct.items():
        for s in res["accuracy"]["tool_call"][c]["samples"]:
            s["correct"] = ok
    return res


def test_reference_recipe_pairs_every_routed_figure_with_the_same_seeds_full_depth_lora(one_eval, tmp_path, capsys):
    ref = [_write(tmp_path, f"ref-s{s}", _seeded(one_eval, s, {"lora_full_depth": s == 0}), 0.0) for s in (0, 1)]
    # the other recipe's seeds listed in the other order: pairing follows the training seed, not the position
    rec = [_write(tmp_path, f"r-s{s}", _seeded(one_eval, s, {"routed": False, "lora_full_depth": True}), 5.0)
           for s in (1, 0)]
    agg = aggregate_recipes({"ref": [str(p) for p in ref], "r": [str(p) for p in rec]}, reference="ref")
    rows = {r["adapter"]: r for r in agg["r"]["per_seed"]}
    s0, s1 = rows["runs/r-s0/adapter"]["full"], rows["runs/r-s1/adapter"]["full"]
    assert rows["runs/r-s0/adapter"]["reference_adapter"] == "runs/ref-s0/adapter"
    assert s0["tool_call.vs_reference.routed.diff_points"] == pytest.approx(-100.0)  # reference right, routed wrong
    assert s1["tool_call.vs_reference.routed.diff_points"] == pytest.approx(0.0)  # both wrong
    assert s1["tool_call.vs_reference.lora_full_depth.diff_points"] == pytest.approx(100.0)
    assert s0["tool_call.vs_reference.routed.n"] == one_eval["accuracy"]["tool_call"]["routed"]["n"]
    assert "tool_call.vs_reference.routed.diff_points" not in agg["ref"]["per_seed"][0]["full"]
    assert "## Minus the reference recipe's LoRA at full depth" in markdown(agg)
    with pytest.raises(ConfigError, match="--reference nope"):
        aggregate_recipes({"ref": [str(ref[0])]}, reference="nope")
