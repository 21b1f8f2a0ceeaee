"""The evaluation harness on a tiny model: exact skip fractions, the four PPL configurations, baselines, report."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoTokenizer

from layerroute.adapters import save_adapter
from layerroute.config import EvalConfig
from layerroute.data.build import load_steps
from layerroute.data.config import DataConfig
from layerroute.errors import ConfigError
from layerroute.eval.accuracy import score_generation
from layerroute.eval.baselines import flop_summary, random_patterns, shortgpt_pattern
from layerroute.eval.teacher_forced import ppl, teacher_forced
from tests.helpers import tiny_routed

HERE = os.path.dirname(__file__)
TOKENIZER = os.path.join(HERE, "fixtures", "tokenizers", "smollm2")


def data_cfg(limit: int = 12, **extra) -> DataConfig:
    return DataConfig.from_dict({
        "progress": False, "eval_fraction": 0.5, "max_length": 768, **extra,
        "sources": [
            {"name": "bfcl", "categories": ["simple_python"], "limit": limit},
            # generated offline by reasoning-gym: no file needed, so the test runs wherever the package is installed
            {"name": "gsm_symbolic", "limit": limit, "turns_per_conversation": 2},
        ],
    })


@pytest.fixture(scope="module")
def setup():
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    rm = tiny_routed("shape:tiny-qwen2")
    rm.tokenizer = tok
    data = load_steps(data_cfg(), tok)
    steps = list(data.eval)[:6] + list(data.train)[:6]
    return rm, data, steps


def test_forced_patterns_give_exact_skip_fractions(setup):
    rm, _, steps = setup
    cfg = EvalConfig(batch_size=3)
    patterns = torch.tensor([[True, False, True, False]] * len(steps))
    res = teacher_forced(rm, steps, "shortgpt", cfg, patterns=patterns)
    gates = [r["gates"] for r in res]
    assert all(g == [True, False, True, False] for g in gates)
    summary = flop_summary(rm.config, steps, gates, list(range(len(steps))), "exact")
    assert summary["block_flops_skipped"] == pytest.approx(0.5, abs=1e-12)
    assert 0 < summary["total_flops_skipped"] < 0.5  # the LM head is never skipped
    none = flop_summary(rm.config, steps, [[True] * 4] * len(steps), list(range(len(steps))), "exact",
                        count_routers=False)
    assert none["block_flops_skipped"] == 0 and none["total_flops_skipped"] == 0


def test_four_ppl_configurations(setup):
    rm, _, steps = setup
    cfg = EvalConfig(batch_size=4)
    idx = list(range(len(steps)))
    runs = {c: teacher_forced(rm, steps, c, cfg) for c in ("base", "lora_full_depth", "routed", "routed_no_lora")}
    p = {c: ppl(r, idx) for c, r in runs.items()}
    # routers start open: routed == LoRA full depth, routed without LoRA == base; LoRA changes the model
    assert p["routed"] == pytest.approx(p["lora_full_depth"], rel=1e-5)
    assert p["routed_no_lora"] == pytest.approx(p["base"], rel=1e-5)
    assert abs(p["lora_full_depth"] - p["base"]) > 1e-3
    # close block 2's router: routed now differs from full depth, and its gates say so
    router = rm.routers()[2]
    with torch.no_grad():
        saved = router.net.bias.clone()
        router.net.bias.fill_(-5.0)
    try:
        closed = teacher_forced(rm, steps, "routed", cfg)
    finally:
        with torch.no_grad():
            router.net.bias.copy_(saved)
    assert all(r["gates"] == [True, True, False, True] for r in closed)
    assert abs(ppl(closed, idx) - p["lora_full_depth"]) > 1e-4


def test_baseline_patterns():
    assert shortgpt_pattern([0.5, 0.1, 0.3, 0.05], 2) == [True, False, True, False]
    pats = random_patterns(50, 6, 2, seed=0)
    assert (pats.sum(dim=1) == 4).all() and not (pats == pats[0]).all()


def test_malformed_generation_is_scored_wrong(setup):
    _, data, _ = setup
    tool = next(s for s in list(data.eval) + list(data.train) if s.step_type == "tool_call")
    plan = next(s for s in list(data.eval) + list(data.train) if s.step_type == "planning")
    for text in ("", "<tool_call>{\"name\": \"f\", \"arguments\": {", "I think the answer is unclear", "\x00\x01"):
        ok, reason = score_generation(tool, text)
        assert ok is False and reason
    assert score_generation(plan, "garbage")[0] is False
    # the gold target itself scores right
    gold = setup[0].tokenizer.decode(tool.target_ids, skip_special_tokens=True)
    assert score_generation(tool, gold)[0] is True
    gold_plan = setup[0].tokenizer.decode(plan.target_ids, skip_special_tokens=True)
    assert score_generation(plan, gold_plan)[0] is True
    # the same call written as bare JSON (Qwen2.5-Coder's native form, no <tool_call> wrapper) scores the same
    from layerroute.data.toolcalls import parse_tool_calls

    bare = "\n".join(json.dumps(c) for c in parse_tool_calls(gold)[0])
    assert score_generation(tool, bare)[0] is score_generation(tool, gold)[0] is True
    assert score_generation(tool, "Here: " + bare)[0] is False  # text around it: not a call
    # a spec BFCL's checker cannot read (a parameter without a type, as one live_multiple function has) is a
    # counted wrong verdict, not a crash that loses the evaluation's generations
    import copy
    import dataclasses

    broken_tools = copy.deepcopy(tool.tools)
    fn = broken_tools[0].get("function", broken_tools[0])
    for spec in fn["parameters"]["properties"].values():
        spec.pop("type", None)
    ok, reason = score_generation(dataclasses.replace(tool, tools=broken_tools), gold)
    assert ok is False and reason.startswith("BFCL spec not checkable")


def test_run_eval_writes_json_report_and_plots(setup, tmp_path):
    rm, _, _ = setup
    adapter = save_adapter(rm, tmp_path / "a", extra={"config": {}})
    # the adapter must carry its tokenizer's identity: evaluate loads the base model named in the adapter
    cfg = EvalConfig(batch_size=4, max_steps_per_type=4, thresholds=[0.5, 0.9], bootstrap=50,
                     accuracy_steps_per_type=0, calibration_steps=4)
    from layerroute.eval.adapter import evaluate_adapter
    from layerroute.eval.report import write_report

    data = load_steps(data_cfg(), rm.tokenizer)
    res = evaluate_adapter(rm, data, cfg, {"note": "tiny"})
    doc = {**res, "adapters": [str(adapter)], "seeds": [], "aggregate": None,
           "skip_differential_points": res["splits"]["full"]["skip_differential_points"]}
    write_report(doc, tmp_path)
    for split in ("full", "length_matched"):
        for t in ("tool_call", "planning"):
            entry = res["splits"][split][t]
            assert set(entry["ppl"]) == {"base", "lora_full_depth", "routed", "routed_no_lora"}
            # a random tiny model reproduces no step token for token; routers start open, so routed == LoRA
            assert set(entry["teacher_forced_exact"]) == set(entry["ppl"])
            if entry["n"]:
                assert entry["teacher_forced_exact"]["routed"] == entry["teacher_forced_exact"]["lora_full_depth"] == 0
    assert len(res["threshold_sweep"]) == 2
    report = (tmp_path / "report.md").read_text()
    assert "paper" in report and "Honest columns" in report
    assert (tmp_path / "run_rate_heatmap.png").stat().st_size > 1000
    assert (tmp_path / "pareto.png").is_file()
    json.dumps(res, default=str)


def test_accuracy_keeps_each_generation_with_its_verdict(setup):
    from layerroute.eval.accuracy import accuracy

    rm, data, _ = setup
    steps = list(data.eval)
    idx = [i for i, s in enumerate(steps) if s.step_type == "tool_call"][:2]
    cfg = EvalConfig(max_new_tokens_tool=3, max_new_tokens_planning=3)
    res = accuracy(rm, steps, idx, "lora_full_depth", cfg)
    assert res["n"] == len(res["samples"]) == 2
    assert [s["conversation_id"] for s in res["samples"]] == [steps[i].conversation_id for i in idx]
    assert sum(s["correct"] for s in res["samples"]) == round(res["accuracy"] * res["n"])
    assert all(s["correct"] or s["reason"] for s in res["samples"])  # every failure says why
    assert all(s["teacher_forced_errors"] >= 0 for s in res["samples"]) and 0 <= res["teacher_forced_exact"] <= 1


def test_no_teacher_forced_error_means_greedy_generation_reproduces_the_target(setup):
    """teacher_forced_exact's claim, end to end with routing and real skipping: a target made of the routed model's
    own greedy continuation has zero errors under teacher forcing; one changed token is one error."""
    import dataclasses

    from layerroute.infer.generate import routed_generate

    rm, data, _ = setup
    step = next(s for s in data.eval if s.step_type == "tool_call")
    router = rm.routers()[1]
    with torch.no_grad():
        saved = router.net.bias.clone()
        router.net.bias.fill_(-5.0)  # block 1 skipped: the routed path differs from full depth
    try:
        ctx = step.input_ids[: step.context_length]
        gen = list(routed_generate(rm, [ctx], max_new_tokens=6, eos_token_id=[]).tokens[0])

        def with_target(target):
            return dataclasses.replace(step, input_ids=ctx + target, labels=[-100] * len(ctx) + target,
                                       decision_mask=step.decision_mask[: len(ctx)] + [0] * len(target),
                                       length=len(target))

        cfg = EvalConfig(batch_size=2)
        same = teacher_forced(rm, [with_target(gen)], "routed", cfg)[0]
        changed = teacher_forced(rm, [with_target(gen[:-1] + [(gen[-1] + 1) % rm.config.vocab_size])], "routed",
                                 cfg)[0]
    finally:
        with torch.no_grad():
            router.net.bias.copy_(saved)
    assert same["gates"][1] is False and same["tokens"] == 6
    assert same["errors"] == 0 and changed["errors"] == 1


def _fake_steps(n_tool: int, n_plan: int):
    from types import SimpleNamespace

    kinds = ["tool_call"] * n_tool + ["planning"] * n_plan
    return [SimpleNamespace(step_type=t, conversation_id=f"c{i}") for i, t in enumerate(kinds)]


def test_accuracy_draw_is_the_historic_one_when_the_ppl_sample_holds_it_and_the_whole_split_otherwise():
    from layerroute.eval.sampling import _accuracy_steps, _by_type, _cap

    all_steps = _fake_steps(40, 30)
    full = _cap(_by_type(all_steps, range(len(all_steps))), 12, 0)  # the perplexity sample, 12 per type
    cfg = EvalConfig(accuracy_steps_per_type=4, seed=0)
    old = _cap(full, 4, 1)  # how every accuracy figure before per-type counts was drawn
    assert _accuracy_steps(all_steps, full, all_steps, cfg) == {t: [all_steps[i] for i in old[t]] for t in old}
    big = _accuracy_steps(all_steps, full, all_steps, EvalConfig(accuracy_steps_per_type={"tool_call": 30}))
    assert len(big["tool_call"]) == 30 and big["planning"] == []
    assert {s.step_type for s in big["tool_call"]} == {"tool_call"}
    assert len({id(s) for s in big["tool_call"]}) == 30  # no step twice
    every = _accuracy_steps(all_steps, full, all_steps, EvalConfig(accuracy_steps_per_type=100))
    assert [len(every[t]) for t in ("tool_call", "planning")] == [40, 30]  # capped by what the split holds


@pytest.mark.parametrize("bad", [{"tool_calls": 3}, -1, {"planning": -2}, {"planning": 1.5}])
def test_accuracy_counts_are_validated_naming_the_flag(bad):
    from layerroute.errors import ConfigError

    with pytest.raises(ConfigError, match="eval.accuracy_steps_per_type"):
        EvalConfig(accuracy_steps_per_type=bad)
    with pytest.raises(ConfigError, match="eval.accuracy_configs"):
        EvalConfig(accuracy_configs=["routed", "lora"])


def test_accuracy_subset_resummarises_chosen_steps_and_counts_unseen_categories_apart():
    from layerroute.eval.accuracy import _accuracy_summary, accuracy_subset

    def sample(cid, ok, cat, errors):
        return {"conversation_id": cid, "step_index": 0, "category": cat, "correct": ok,
                "reason": None if ok else "unparsable tool call: x", "teacher_forced_errors": errors}

    res = _accuracy_summary([sample("a", True, "live_simple", 0), sample("b", False, "simple_python", 2),
                             sample("c", False, "live_simple", 1), sample("d", True, "simple_python", 0)])
    sub = accuracy_subset(res, [("c", 0), ("a", 0), ("b", 0)], unseen_categories=("live_simple",))
    assert [s["conversation_id"] for s in sub["samples"]] == ["c", "a", "b"]  # in the order asked
    assert sub["accuracy"] == pytest.approx(1 / 3) and sub["n"] == 3
    assert sub["teacher_forced_exact"] == pytest.approx(1 / 3)
    assert sub["failures"] == {"unparsable tool call": 2}
    assert sub["accuracy_unseen"] == pytest.approx(0.5) and sub["n_unseen"] == 2
    assert "accuracy_unseen" not in accuracy_subset(res, [("b", 0)], unseen_categories=("live_simple",))
    with pytest.raises(ValueError, match="not scored"):
        accuracy_subset(res, [("zz", 0)])


def test_length_matched_accuracy_draw_is_its_own_and_takes_all_when_asked_for_more():
    from layerroute.eval.sampling import _length_matched_accuracy_steps

    class S:
        def __init__(self, i, t):
            self.conversation_id, self.step_index, self.step_type = f"c{i}", 0, t

    pool = [S(i, "tool_call" if i % 3 else "planning") for i in range(30)]
    few = _length_matched_accuracy_steps(pool, EvalConfig(accuracy_length_matched_per_type={"tool_call": 5}))
    assert len(few["tool_call"]) == 5 and few["planning"] == []
    assert all(s.step_type == "tool_call" for s in few["tool_call"])
    assert few["tool_call"] == sorted(few["tool_call"], key=pool.index)  # kept in split order
    every = _length_matched_accuracy_steps(pool, EvalConfig(accuracy_length_matched_per_type=100))
    assert len(every["tool_call"]) == 20 and len(every["planning"]) == 10
    with pytest.raises(ConfigError, match="eval.accuracy_length_matched_per_type"):
        EvalConfig(accuracy_length_matched_per_type=-1)


def test_paired_accuracy_counts_disagreements_and_bounds_the_difference():
    from layerroute.eval.accuracy import paired_accuracy

    def res(verdicts):
        return {"samples": [{"conversation_id": f"c{i}", "correct": v} for i, v in enumerate(verdicts)]}

    lora, routed = res([1, 1, 0, 1, 0, 0, 1, 1]), res([1, 0, 0, 1, 1, 0, 1, 0])
    p = paired_accuracy(lora, routed, resamples=500, seed=0)
    assert (p["n"], p["both_correct"], p["only_a"], p["only_b"]) == (8, 3, 2, 1)
    assert p["diff_points"] == pytest.approx(-12.5)
    lo, hi = p["diff_ci95"]
    assert lo <= -12.5 <= hi and lo < hi
    same = paired_accuracy(lora, lora, resamples=50, seed=0)
    assert same["diff_points"] == 0 and same["diff_ci95"] == [0.0, 0.0]
    unbooted = paired_accuracy(lora, routed, resamples=0, seed=0)  # eval.bootstrap=0: no interval, no crash
    assert unbooted["diff_points"] == pytest.approx(-12.5) and all(v != v for v in unbooted["diff_ci95"])  # NaN
    with pytest.raises(ValueError, match="same steps"):
        paired_accuracy(lora, res([1, 0]), resamples=10, seed=0)


def test_paired_accuracy_script_compares_two_evaluations_step_by_step(tmp_path, capsys):
    from tests.helpers import run_main, script_main

    def doc(verdicts, ids):
        samples = [{"conversation_id": c, "correct": v} for c, v in zip(ids, verdicts, strict=True)]
        return {"accuracy": {"tool_call": {"routed": {"accuracy": sum(verdicts) / len(verdicts), "n": len(verdicts),
                                                      "samples": samples}}}}

    ids = ["a", "b", "c", "d"]
    (tmp_path / "ref.json").write_text(json.dumps(doc([1, 1, 0, 0], ids)))
    (tmp_path / "new.json").write_text(json.dumps(doc([1, 0, 0, 1], ids)))
    (tmp_path / "other.json").write_text(json.dumps(doc([1, 0, 0, 1], ["a", "b", "c", "e"])))
    main = script_main(os.path.join(HERE, "..", "benchmarks", "paired_accuracy.py"))

    def run(*args):
        return run_main(main, args, capsys)

    ok = run(f"{tmp_path}/ref.json:routed", f"{tmp_path}/new.json:routed")
    out = json.loads(ok.stdout)["b_minus_a"]
    assert ok.returncode == 0 and (out["both_correct"], out["only_a"], out["only_b"]) == (1, 1, 1)
    assert out["diff_points"] == 0.0
    bad = run(f"{tmp_path}/ref.json:routed", f"{tmp_path}/other.json:routed")  # different steps: refused
    assert bad.returncode != 0 and "same steps" in bad.stderr
    missing = run(f"{tmp_path}/ref.json:lora_full_depth", f"{tmp_path}/new.json:routed")
    assert missing.returncode != 0 and "no tool_call accuracy on the full split for 'lora_full_depth'" in missing.stderr
    # the length-matched draw's verdicts, read from its own key
    for name, verdicts in (("ref_lm", [0, 0, 1, 1]), ("new_lm", [1, 1, 1, 1])):
        d = doc([1, 1, 1, 1], ids)
        d["accuracy_length_matched"] = doc(verdicts, ids)["accuracy"]
        (tmp_path / f"{name}.json").write_text(json.dumps(d))
    lm = run(f"{tmp_path}/ref_lm.json:routed", f"{tmp_path}/new_lm.json:routed", "--split", "length_matched")
    assert lm.returncode == 0 and json.loads(lm.stdout)["b_minus_a"]["diff_points"] == 50.0
    full = run(f"{tmp_path}/ref_lm.json:routed", f"{tmp_path}/new_lm.json:routed")
    assert json.loads(full.stdout)["b_minus_a"]["diff_points"] == 0.0
    # a side of an exact_match_all result (teacher-forced exact match), named by its index
    em = {"benchmark": "exact_match_all", "sides": [
        {"adapter": "x", "config": "routed", "teacher_forced_exact": 0.5,
         "samples": [{"conversation_id": c, "correct": v} for c, v in zip(ids, [0, 1, 1, 0], strict=True)]}]}
    (tmp_path / "em.json").write_text(json.dumps(em))
    mixed = run(f"{tmp_path}/ref.json:routed", f"{tmp_path}/em.json:0")
    out = json.loads(mixed.stdout)
    assert mixed.returncode == 0 and out["b"]["config"] == "x:routed" and out["b_minus_a"]["only_b"] == 1
    wrong = run(f"{tmp_path}/ref.json:routed", f"{tmp_path}/em.json:3")
    assert wrong.returncode != 0 and "side index 0..0" in wrong.stderr


def test_plot_exact_match_pairs_every_point_with_the_reference_and_writes_the_picture(tmp_path, capsys):
    from tests.helpers import run_main, script_main

    ids = ["a", "b", "c", "d"]

    def side(name, verdicts, skip, step_ids=ids):
        return {"adapter": name, "config": "routed", "teacher_forced_exact": sum(verdicts) / len(verdicts),
                "block_skip": skip,
                "samples": [{"conversation_id": c, "correct": v} for c, v in zip(step_ids, verdicts, strict=True)]}

    (tmp_path / "em.json").write_text(json.dumps({"benchmark": "exact_match_all", "sides": [
        side("ref", [1, 1, 1, 0], 0.0), side("x", [1, 0, 0, 0], 0.3), side("y", [1, 1, 0, 1], 0.1),
        side("z", [1, 1, 1, 1], 0.1, ["a", "b", "c", "e"])]}))
    main = script_main(os.path.join(HERE, "..", "benchmarks", "plot_exact_match.py"))
    png = tmp_path / "plots" / "frontier.png"

    def run(*args):
        return run_main(main, ["--reference", f"{tmp_path}/em.json:0=full depth", *args, "--output", png], capsys)

    ok = run(f"{tmp_path}/em.json:1=nine blocks", f"{tmp_path}/em.json:2")
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout.strip().splitlines()[-1])
    assert out["reference"]["reference_config"] == "full depth"
    assert [(p["label"], p["block_skip"], p["diff_points"]) for p in out["points"]] == [
        ("nine blocks", 0.3, -50.0), ("y:routed", 0.1, 0.0)]
    lo, hi = out["points"][0]["diff_ci95"]
    assert lo <= -50.0 <= hi
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(png.parent.glob(".*.tmp"))
    other_steps = run(f"{tmp_path}/em.json:3")  # scored on different steps: refused, nothing plotted
    assert other_steps.returncode != 0 and "same eval steps" in other_steps.stderr
    empty_label = run(f"{tmp_path}/em.json:1=")
    assert empty_label.returncode != 0 and "non-empty label" in empty_label.stderr
