"""Batched generation = one-at-a-time generation, token for token (fp32 tiny model): rows that decide differently,
rows with their own budgets and stop tokens, left padding, rows dropped mid-batch; too-long prompts and
unclosed calls are scored wrong and counted by reason."""

from __future__ import annotations

import pytest
import torch

from layerroute.infer.batched import Request, generate_batched
from layerroute.infer.generate import routed_generate
from layerroute.infer.stop import FINISH_CONTEXT, FINISH_LENGTH, FINISH_REUSED, FINISH_STOP
from tests.helpers import TINY_SHAPES, lively, tiny_routed

# different lengths (left padding in a batch), different budgets
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [100, 200, 300], [42, 43, 44, 45, 46], [7, 7, 8], [300, 301, 302, 303, 304, 305],
           [11, 12]]
BUDGETS = [9, 4, 12, 7, 1, 10]


@pytest.fixture(scope="module", params=TINY_SHAPES)
def rm(request):
    rm = lively(tiny_routed(request.param))
    gen = torch.Generator().manual_seed(3)  # routers whose decisions depend on the prompt (and differ across rows)
    with torch.no_grad():
        for r in rm.routers():
            r.net.weight.copy_(torch.randn(r.net.weight.shape, generator=gen))
            r.net.bias.zero_()
    return rm


def _alone(rm, req: Request, **kw) -> list[int]:
    out = routed_generate(rm, [req.prompt], max_new_tokens=req.max_new_tokens, eos_token_id=sorted(req.stop) or None,
                          forced=req.forced, **kw)
    return out.tokens[0], out.gates[0]


@pytest.mark.parametrize("batch_size", [2, 4, 6])
@pytest.mark.parametrize("policy", ["exact", "kv_preserving"])
def test_router_decided_batches_equal_rows_alone(rm, batch_size, policy):
    reqs = [Request(p, b) for p, b in zip(PROMPTS, BUDGETS, strict=True)]
    got = generate_batched(rm, reqs, batch_size=batch_size, kv_policy=policy, progress=False)
    assert len({tuple(r.gates) for r in got}) > 2, "routers should disagree across rows for this test"
    for req, res in zip(reqs, got, strict=True):
        tokens, gates = _alone(rm, req, kv_policy=policy)
        assert res.gates == gates, "decisions must not depend on the other rows or padding"
        assert res.tokens == tokens
        assert len(res.tokens) == req.max_new_tokens and res.finish == FINISH_LENGTH


def test_own_stop_tokens_end_rows_early_and_the_rest_continue(rm):
    free = generate_batched(rm, [Request(p, 12) for p in PROMPTS], batch_size=6, progress=False)
    # each row stops at a token it emits itself at a different depth (its 2nd, 4th, ... token)
    stops = [frozenset({r.tokens[min(1 + 2 * i, 11)]}) for i, r in enumerate(free)]
    reqs = [Request(p, 12, stop=s) for p, s in zip(PROMPTS, stops, strict=True)]
    got = generate_batched(rm, reqs, batch_size=6, progress=False)
    for req, res, whole in zip(reqs, got, free, strict=True):
        tokens, _ = _alone(rm, req)
        assert res.tokens == tokens
        cut = next(i for i, t in enumerate(whole.tokens) if t in req.stop)
        assert res.tokens == whole.tokens[: cut + 1] and res.finish == FINISH_STOP  # stop token kept
    assert len({len(r.tokens) for r in got}) > 2, "rows should finish at different steps"


def test_forced_rows_equal_rows_alone(rm):
    patterns = [[True, False, True, True], [True, True, True, True], [False, True, False, True],
                [True, True, False, False], [True, False, False, True], [True, True, True, False]]
    reqs = [Request(p, b, forced=f) for p, b, f in zip(PROMPTS, BUDGETS, patterns, strict=True)]
    got = generate_batched(rm, reqs, batch_size=4, progress=False)
    for req, res in zip(reqs, got, strict=True):
        tokens, gates = _alone(rm, req)
        assert res.gates == list(req.forced) == gates
        assert res.tokens == tokens


def test_lora_off_equals_adapters_disabled(rm):
    reqs = [Request(p, 6) for p in PROMPTS[:3]]
    got = generate_batched(rm, reqs, batch_size=3, lora=False, progress=False)
    with rm.lora_disabled():
        for req, res in zip(reqs, got, strict=True):
            assert res.tokens == routed_generate(rm, [req.prompt], max_new_tokens=6, eos_token_id=None,
                                                 merge_lora=False).tokens[0]


def test_reused_rows_stop_after_prefill(rm):
    seen = []

    def on_decided(i, gates):
        seen.append(i)
        return [1, 2, 3] if i % 2 == 0 else None

    reqs = [Request(p, 5) for p in PROMPTS]
    got = generate_batched(rm, reqs, batch_size=3, on_decided=on_decided, progress=False)
    assert sorted(seen) == list(range(len(PROMPTS)))
    for i, (req, res) in enumerate(zip(reqs, got, strict=True)):
        if i % 2 == 0:
            assert res.tokens == [1, 2, 3] and res.finish == FINISH_REUSED
        else:
            assert res.tokens == _alone(rm, req)[0]


def test_row_logits_processor_applies_to_its_row_only(rm):
    banned = 17

    def only_banned(ids, scores):  # forces one token, reading the row's own ids (prompt + generated)
        assert ids.shape[0] == 1 and ids.shape[1] >= len(PROMPTS[1])
        out = torch.full_like(scores, -float("inf"))
        out[:, banned] = 0
        return out

    reqs = [Request(p, 4) for p in PROMPTS[:3]]
    reqs[1].logits_processor = only_banned
    got = generate_batched(rm, reqs, batch_size=3, progress=False)
    assert got[1].tokens == [banned] * 4
    assert got[0].tokens == _alone(rm, reqs[0])[0] and got[2].tokens == _alone(rm, reqs[2])[0]


def test_prompt_longer_than_the_context_is_not_generated(rm):
    limit = rm.config.max_position_embeddings
    reqs = [Request(list(range(3, 3 + limit)), 4), Request([5, 6, 7], 4), Request([8] * (limit - 2), 10)]
    got = generate_batched(rm, reqs, batch_size=3, progress=False)
    assert got[0].finish == FINISH_CONTEXT and got[0].tokens == []
    assert got[1].tokens == _alone(rm, reqs[1])[0]
    assert got[2].budget == 2 and len(got[2].tokens) == 2  # clipped to what fits in the context


# -- scored evaluation (layerroute.eval.accuracy) on real BFCL / GSM8K steps -----------
@pytest.fixture(scope="module")
def scored_setup():
    import os

    from transformers import AutoTokenizer

    from layerroute.data.build import load_steps
    from tests.test_evaluate import TOKENIZER, data_cfg

    assert os.path.isdir(TOKENIZER)
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    rm = tiny_routed("shape:tiny-qwen2")
    rm.tokenizer = tok
    steps = list(load_steps(data_cfg(), tok).eval)
    return rm, steps


def _cfg(**kw):
    from layerroute.config import EvalConfig

    return EvalConfig(**{"max_new_tokens_tool": 4, "max_new_tokens_planning": 4, "accuracy_teacher_forced": False,
                         "bootstrap": 20, **kw})


def test_too_long_prompt_and_unclosed_call_are_scored_wrong_and_counted_by_reason(scored_setup, monkeypatch):
    from layerroute.eval.accuracy import accuracy

    rm, steps = scored_setup
    tools = sorted((i for i, s in enumerate(steps) if s.step_type == "tool_call"), key=lambda i: steps[i].context_length)
    idx = tools[:2] + tools[-1:]
    longest = steps[tools[-1]].context_length
    assert steps[tools[1]].context_length < longest, "need a step shorter than the longest"
    monkeypatch.setattr(rm.config, "max_position_embeddings", longest)  # the longest prompt no longer fits
    res = accuracy(rm, steps, idx, "lora_full_depth", _cfg(accuracy_batch_size=3))
    assert res["n"] == 3 and res["accuracy"] == 0  # never dropped
    reasons = [s["reason"] for s in res["samples"]]
    assert reasons[2].startswith("prompt exceeds the model's context") and res["samples"][2]["finish"] == "context"
    # 4 tokens cannot close a call: cut at the budget, and said so
    assert all(r.startswith("hit max_new_tokens") for r in reasons[:2])
    assert res["failures"] == {"prompt exceeds the model's context": 1, "hit max_new_tokens": 2}
    assert "teacher_forced_exact" not in res  # the cross-check was off: no figure rather than a 0 that reads as one


def test_batched_accuracy_equals_one_at_a_time(scored_setup):
    from layerroute.eval.accuracy import accuracy

    rm, steps = scored_setup
    idx = list(range(min(len(steps), 6)))
    one = accuracy(rm, steps, idx, "routed", _cfg(accuracy_batch_size=1, accuracy_teacher_forced=True))
    many = accuracy(rm, steps, idx, "routed", _cfg(accuracy_batch_size=4, accuracy_teacher_forced=True))
    assert [s["tokens"] for s in one["samples"]] == [s["tokens"] for s in many["samples"]]
    assert one["accuracy"] == many["accuracy"] and one["teacher_forced_exact"] == many["teacher_forced_exact"]


def test_configurations_that_cannot_differ_reuse_the_full_depth_generations(scored_setup):
    from layerroute.eval.accuracy import accuracy, reuse_counts

    rm, steps = scored_setup
    idx = list(range(min(len(steps), 5)))
    cfg = _cfg()
    ref = accuracy(rm, steps, idx, "lora_full_depth", cfg)
    routed = accuracy(rm, steps, idx, "routed", cfg, reference=ref)  # routers at init open every block
    assert reuse_counts(routed) == {"lora_full_depth": len(idx)}
    assert [s["tokens"] for s in routed["samples"]] == [s["tokens"] for s in ref["samples"]]
    pattern = [True] * rm.num_layers
    patterns = [pattern if i % 2 else [False] + pattern[1:] for i in range(len(idx))]
    rand = accuracy(rm, steps, idx, "random", cfg, patterns=patterns, reference=ref)
    assert reuse_counts(rand) == {"lora_full_depth": len(idx) // 2}  # the steps whose pattern removes nothing
    fresh = accuracy(rm, steps, idx, "random", cfg, patterns=patterns)
    assert [s["tokens"] for s in rand["samples"]] == [s["tokens"] for s in fresh["samples"]]


def test_eval_of_record_overlay_scores_every_configuration_paired_with_step_ids(scored_setup, tmp_path):
    import yaml

    from layerroute.config import EvalConfig, apply_eval_overlay
    from layerroute.data.build import load_steps
    from layerroute.eval.adapter import evaluate_adapter
    from tests.test_evaluate import data_cfg

    raw = apply_eval_overlay({"eval": {"max_new_tokens_tool": 3, "seed": 0}},
                             yaml.safe_load(open("configs/eval-of-record.overlay.yaml")), "configs/eval-of-record.overlay.yaml")
    assert raw["eval"]["max_new_tokens_tool"] == 3 and raw["eval"]["accuracy_batch_size"] == 8
    raw["eval"].update(max_new_tokens_planning=3, max_steps_per_type=3, thresholds=[], calibration_steps=2,
                       bootstrap=20, accuracy_planning_sources=["gsm_symbolic"])
    cfg = EvalConfig(**raw["eval"])
    _, steps = scored_setup
    rm = lively(tiny_routed("shape:tiny-qwen2", seed=1))
    rm.tokenizer = scored_setup[0].tokenizer
    with torch.no_grad():  # routers that skip some blocks on some steps (so the baselines exist)
        for i, r in enumerate(rm.routers()):
            r.net.weight.zero_()
            r.net.bias.fill_(-1.0 if i == 1 else 1.0)
    data = load_steps(data_cfg(), rm.tokenizer)
    res = evaluate_adapter(rm, data, cfg, {})
    n_tool = sum(s.step_type == "tool_call" for s in data.eval)
    acc = res["accuracy"]["tool_call"]
    assert set(acc) == {"base", "lora_full_depth", "routed", "routed_no_lora", "shortgpt", "random"}
    assert all(v["n"] == n_tool for v in acc.values())  # every eval tool call, none dropped
    paired = res["accuracy_paired"]["tool_call"]
    assert {"routed_vs_lora_full_depth", "shortgpt_vs_lora_full_depth", "random_vs_lora_full_depth",
            "routed_no_lora_vs_base", "lora_full_depth_vs_base"} <= set(paired)
    for p in paired.values():
        assert len(p["only_a_ids"]) == p["only_a"] and len(p["only_b_ids"]) == p["only_b"]
        assert len(p["diff_ci95"]) == 2
    # the routers skip block 1 everywhere, so nothing is reused there
    assert "reused_from" not in acc["routed"]
    from layerroute.eval.report import write_report

    doc = {**res, "adapters": ["a"], "seeds": [], "aggregate": None,
           "skip_differential_points": res["splits"]["full"]["skip_differential_points"]}
    write_report(doc, tmp_path)
    assert "routed_no_lora minus base, paired on" in (tmp_path / "report.md").read_text()


def test_routed_generate_forwards_generation_kwargs(rm):
    from transformers import LogitsProcessorList

    def only_17(ids, scores):
        out = torch.full_like(scores, -float("inf"))
        out[:, 17] = 0
        return out

    out = routed_generate(rm, [PROMPTS[0]], max_new_tokens=3, eos_token_id=None,
                          logits_processor=LogitsProcessorList([only_17]))
    assert out.tokens == [[17, 17, 17]]
