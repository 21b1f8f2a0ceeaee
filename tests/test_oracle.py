"""The per-step oracle (layerroute.calibrate.oracle): the cached-context costs equal a full teacher-forced re-run
with the context at full depth, an oracle set reproduces its target under teacher forcing and in free-running
generation with real skipping, the speculative chain finds the one-at-a-time greedy set, and a run resumes."""

from __future__ import annotations

import json
import random

import pytest
import torch

from layerroute.calibrate.influence import skip_set_cost
from layerroute.calibrate.oracle import (
    CachedStep,
    RowCost,
    beam_reproducing_set,
    criterion_check,
    greedy_reproducing_set,
)
from layerroute.config import EvalConfig
from layerroute.errors import ConfigError
from layerroute.eval import oracle
from layerroute.infer.batched import Request, generate_batched
from layerroute.infer.generate import inference_weights
from layerroute.nn.routed import find_routed_layers
from tests.helpers import lively, synthetic_step, tiny_routed

CTX = 10
QUIET = (1, 3)


@pytest.fixture(scope="module")
def case():
    """A tiny model with varied greedy outputs, a step whose target is its own full-depth greedy output."""
    rm = lively(tiny_routed("shape:tiny-qwen2"), std=0.12)
    with torch.no_grad():  # blocks 1 and 3 all but silent: removable, while the others carry the varied output
        for layer in find_routed_layers(rm.model):
            if layer.index in QUIET:
                layer.block.self_attn.o_proj.base_layer.weight.mul_(0.01)
                layer.block.self_attn.o_proj.lora_B.default.weight.mul_(0.01)
                layer.block.mlp.down_proj.weight.mul_(0.01)
    prompt = [int(t) for t in torch.randint(3, 200, (CTX,), generator=torch.Generator().manual_seed(1))]
    target = generate_batched(rm, [Request(prompt, 8, forced=[True] * rm.num_layers)], prompt_full_depth=True,
                              progress=False)[0].tokens
    step = synthetic_step(0, CTX, len(target), "tool_call", ids=prompt + target)
    return rm, prompt, target, step


def test_cached_context_costs_equal_a_full_teacher_forced_rerun_at_prompt_full_depth(case):
    rm, prompt, target, step = case
    cfg = EvalConfig(batch_size=1, prompt_full_depth=True)
    sets = [(), (0,), (1,), (0, 1), tuple(range(rm.num_layers))]
    with inference_weights(rm) as model:
        got = CachedStep(rm, model, prompt, target, rows=2).costs(sets)
    for s, c in zip(sets, got, strict=True):
        nll, err = skip_set_cost(rm, [step], cfg, s)
        assert c.nll / len(target) == pytest.approx(nll, rel=1e-4, abs=1e-5)
        assert c.errors == round(err * len(target))
    assert got[0].errors == 0  # the target is the full-depth greedy output
    assert got[-1].errors > 0, "removing every block should break a varied output (else the test shows nothing)"


def test_oracle_set_reproduces_the_target_teacher_forced_and_free_running(case):
    rm, prompt, target, step = case
    L = rm.num_layers
    with inference_weights(rm) as model:
        cached = CachedStep(rm, model, prompt, target, rows=3)
        res = cached.costs([()] + [(j,) for j in range(L)])
        ok = criterion_check("exact", res[0], len(target), 0.0)
        found = greedy_reproducing_set(cached.costs, L, ok, res[1:])
    assert set(QUIET) <= set(found["set"]) and len(found["set"]) < L
    nll, err = skip_set_cost(rm, [step], EvalConfig(batch_size=1, prompt_full_depth=True), found["set"])
    assert err == 0
    run = [j not in found["set"] for j in range(L)]
    out = generate_batched(rm, [Request(prompt, len(target), forced=run)], prompt_full_depth=True, progress=False)[0]
    assert out.tokens == target


def test_attention_only_removal_changes_the_output_and_keeps_the_mlp(case):
    rm, prompt, target, _ = case
    with inference_weights(rm) as model:
        blocks = CachedStep(rm, model, prompt, target).costs([(0, 1)])[0]
        attn = CachedStep(rm, model, prompt, target, units="attention").costs([(), (0, 1)])
    assert attn[0].errors == 0
    assert attn[1].nll != pytest.approx(attn[0].nll) and attn[1].nll != pytest.approx(blocks.nll)


def _sequential_greedy(cost_of, n, ok, singles):
    order = sorted((j for j in range(n) if ok(singles[j])), key=lambda j: (singles[j].nll, j))
    chosen = order[:1]
    for j in order[1:]:
        if ok(cost_of(tuple(sorted(chosen + [j])))):
            chosen.append(j)
    return sorted(chosen)


@pytest.mark.parametrize("seed", range(6))
def test_speculative_chain_finds_the_one_at_a_time_greedy_set(seed):
    rng = random.Random(seed)
    n = 12
    weight = [rng.random() for _ in range(n)]
    pairs = {tuple(sorted(rng.sample(range(n), 2))) for _ in range(6)}  # pairs that break the step together

    def cost(s):
        bad = any(a in s and b in s for a, b in pairs) or sum(weight[j] for j in s) > 2.5
        return RowCost(int(bad), 0, sum(weight[j] for j in s))

    singles = [cost((j,)) for j in range(n)]
    ok = criterion_check("exact", RowCost(0, 0, 0.0), 1, 0.0)
    want = _sequential_greedy(cost, n, ok, singles)
    for chain in (1, 3, 8):
        got = greedy_reproducing_set(lambda sets: [cost(s) for s in sets], n, ok, singles, chain=chain)
        assert got["set"] == want
    beam = beam_reproducing_set(lambda sets: [cost(s) for s in sets], n, ok, singles, width=3)
    assert not cost(tuple(beam["set"])).errors and len(beam["set"]) >= 1


def test_a_margin_counts_a_lead_lost_where_full_depth_kept_it(case):
    """margin m: where full depth leads by >= m a set must keep a lead >= m; elsewhere the argmax is enough. The
    counts equal that rule recomputed from the sets' own logits, never fall under the plain exact counts, and the
    full-depth row keeps every lead (so the criterion is relative to 0 errors there)."""
    rm, prompt, target, _ = case
    sets = [()] + [(j,) for j in range(rm.num_layers)] + [(0, 2)]
    with inference_weights(rm) as model:
        # every set in one forward, for the costs as for the leads read here (the same rounding)
        plain = CachedStep(rm, model, prompt, target, rows=len(sets))
        full_leads, leads = plain._leads([()])[0], plain._leads(sets)
        # m halfway between full depth's lead and a set's smaller one that keeps the argmax: that set loses it
        drop = torch.where(leads > 0, full_leads - leads, torch.zeros_like(leads))
        lowered, pos = divmod(int(drop.argmax()), drop.shape[1])
        assert drop[lowered, pos] > 1e-3, "no set lowers a lead and keeps the argmax: the test shows nothing"
        m = float(full_leads[pos] + leads[lowered, pos]) / 2
        strict = CachedStep(rm, model, prompt, target, rows=len(sets), margin=m)
        got, base = strict.costs(sets), plain.costs(sets)
    floor = torch.where(full_leads >= m, m, 0.0)
    for i, (c, b) in enumerate(zip(got, base, strict=True)):
        wrong = (leads[i] < 0) | (leads[i] < floor)
        assert c.errors == int(wrong.sum()) + strict.first_error
        assert c.errors >= b.errors and c.nll == pytest.approx(b.nll, rel=1e-5)
    assert got[0].errors == 0 and got[lowered].errors > base[lowered].errors
    with pytest.raises(ConfigError, match="margin"):
        CachedStep(rm, None, prompt, target, margin=-1.0)


def test_answer_criterion_holds_the_answer_tokens_and_bounds_the_nll_rise():
    full = RowCost(errors=0, answer_errors=0, nll=10.0)
    ok = criterion_check("answer", full, 20, 0.1)  # up to 2 nats more over 20 tokens
    assert ok(RowCost(5, 0, 11.9)) and not ok(RowCost(0, 1, 10.0)) and not ok(RowCost(0, 0, 12.1))


def test_a_run_resumes_from_its_jsonl_and_ignores_a_torn_line(tmp_path, monkeypatch):
    steps = [synthetic_step(i, 3, 2, "tool_call") for i in range(3)]
    calls = []

    def fake_step(rm, step, cfg, **kw):
        calls.append(step.conversation_id)
        return {"step": f"{step.conversation_id}#0", "size": 1}

    monkeypatch.setattr(oracle, "oracle_step", fake_step)
    monkeypatch.setattr("layerroute.infer.generate.stop_ids", lambda rm: [])
    kw = dict(step_type="tool_call", criterion="exact", nll_rise=0.1, rows=2, chain=2, progress=False)
    oracle.run_oracle(None, "m", steps[:2], EvalConfig(), tmp_path, **kw)
    with open(tmp_path / "oracle-tool_call.jsonl", "a") as fh:
        fh.write('{"torn": ')  # an interrupted write
    recs = oracle.run_oracle(None, "m", steps, EvalConfig(), tmp_path, **kw)
    assert calls == ["c0", "c1", "c2"] and [r["step"] for r in recs] == ["c0#0", "c1#0", "c2#0"]
    oracle.run_oracle(None, "other adapter", steps[:1], EvalConfig(), tmp_path, **kw)
    assert calls[-1] == "c0"  # another identity is another key: measured again
    oracle.run_oracle(None, "m", steps[:1], EvalConfig(), tmp_path, margin=0.5, **kw)
    assert calls[-1] == "c0" and len(calls) == 5  # a margin is another key: measured again
    oracle.run_oracle(None, "m", steps, EvalConfig(), tmp_path, margin=0.0, **kw)
    assert len(calls) == 5  # margin 0 is the key without a margin: nothing measured again
    lines = (tmp_path / "oracle-tool_call.jsonl").read_text().splitlines()
    assert sum(1 for line in lines if line.startswith("{\"key\"") and json.loads(line)) == 5


@pytest.mark.slow
def test_oracle_step_on_real_steps_records_every_check():
    """End to end on rendered BFCL / GSM steps (tiny model, real tokenizer): a record with the target, the set,
    the free-running check, the context-skipped check, the beam and attention-only searches."""
    from transformers import AutoTokenizer

    from layerroute.data.build import load_steps
    from tests.test_evaluate import TOKENIZER, data_cfg

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    rm = tiny_routed("shape:tiny-qwen2")
    rm.tokenizer = tok
    steps = list(load_steps(data_cfg(limit=4), tok).eval)
    cfg = EvalConfig(max_new_tokens_tool=6, max_new_tokens_planning=6, batch_size=1)
    for kind, criterion in (("tool_call", "exact"), ("planning", "answer")):
        step = next(s for s in steps if s.step_type == kind)
        rec = oracle.oracle_step(rm, step, cfg, criterion=criterion, nll_rise=0.1, rows=8, chain=4, stop=[],
                                 beam=2, attention=True, free_running=True)
        assert rec["full_depth"]["tokens"] == 6 and rec["full_depth_errors"] == 0
        assert rec["size"] == len(rec["oracle"]) and len(rec["single_ok"]) == rm.num_layers
        assert rec["free_running"]["identical"] or criterion == "answer"
        assert rec["context_skipped_too"]["errors"] >= 0 and "set" in rec["beam"] and "set" in rec["attention_only"]
        assert rec["criterion"] in ("exact", "answer")
