"""Lossless drafting (`layerroute.infer.drafts`, verified by `layerroute.infer.verify`): whatever the drafts, the tokens are plain greedy decoding's.

The reference is transformers' own greedy generate() on the same merged model (with the grammar's logits processor
where constrained). Every drafter combination, drafts that are always wrong, an oracle whose drafts run past the end
of turn or past the budget, and a grammar drafter that tokenizes the forced text otherwise than the model (one token
per character) must give exactly the reference tokens; the tiny random model writes its calls in odd tokenizations
(``{"city":\\n"Rome"}``), so the forced text is often rejected too.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, DynamicCache

from layerroute.infer.constrain import GrammarLogitsProcessor, model_grammars
from layerroute.infer.drafts import (
    Drafter,
    DraftPolicy,
    GrammarDrafter,
    NgramIndex,
    SuffixStore,
    make_drafters,
    only_allowed,
)
from layerroute.infer.generate import inference_weights, plain_blocks, run_generate
from layerroute.infer.verify import draft_generate
from layerroute.nn.kv_cache import RoutedCache
from layerroute.nn.routed import routing
from tests.helpers import lively, tiny_routed
from tests.helpers import smoke_data as smoke_data  # a module-scoped fixture (the slow test)
from tests.test_constrain import EOS, TOKENIZER, TOOL_SETS, prompts

BUDGET = 64


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOKENIZER)


@pytest.fixture(scope="module")
def setup(tok):
    rm = lively(tiny_routed("shape:tiny-qwen2", seed=3), seed=3)
    rm.tokenizer = tok
    grammars = model_grammars(rm, [EOS])
    with torch.no_grad(), inference_weights(rm) as model, plain_blocks(model):
        cases = []
        for i, p in enumerate(prompts(tok, 3)):
            g = grammars.for_tools(TOOL_SETS[i], "required", parallel=False)
            cases.append((p, g, reference(model, p, g), reference(model, p, None)))
        yield rm, model, cases


def reference(model, prompt, grammar, budget=BUDGET):
    ids = torch.tensor([prompt])
    proc = None if grammar is None else GrammarLogitsProcessor([grammar], [EOS])
    out, _ = run_generate(model, ids, torch.ones_like(ids), cache=DynamicCache(), max_new_tokens=budget,
                          eos_token_id=[EOS], pad_token_id=EOS, logits_processor=proc)
    new = out[0, len(prompt):].tolist()
    return new[: new.index(EOS) + 1] if EOS in new else new


class Wrong(Drafter):
    """Always drafts tokens the model will not choose: the reference's next token + 1, repeated."""

    name = "lookup"

    def __init__(self, ref):
        self.ref = ref

    def propose(self, ctx, k):
        n = len(ctx.seq) - self.prompt_len + len(ctx.draft)
        nxt = self.ref[n] if n < len(self.ref) else 7
        return [(nxt + 1) % 1000 + 3] * k, "lookup"

    def start(self, prompt):
        self.prompt_len = len(prompt)


class Oracle(Drafter):
    """Drafts the reference's own continuation, then junk: drafts that run past the end of turn or the budget."""

    name = "suffix"

    def __init__(self, ref):
        self.ref = ref

    def start(self, prompt):
        self.prompt_len = len(prompt)

    def propose(self, ctx, k):
        n = len(ctx.seq) - self.prompt_len + len(ctx.draft)
        return (self.ref[n:] + [5, 6, 7] * k)[:k], "suffix"


class CharGrammar(GrammarDrafter):
    """The forced text one character per token: a tokenization the model never writes."""

    def tokenize(self, text):
        out = []
        for ch in text:
            ids = self.tokenizer(ch, add_special_tokens=False)["input_ids"]
            out.extend(ids)
        return out


COMBOS = ["", "grammar", "lookup", "grammar,lookup", "grammar,lookup,suffix"]


@pytest.mark.parametrize("names", COMBOS)
@pytest.mark.parametrize("constrained", [True, False])
def test_every_combination_is_plain_greedy(setup, tok, names, constrained):
    rm, model, cases = setup
    store = SuffixStore()
    modes = ("full", "short") if "grammar" in names and constrained else ("full",)
    for prompt, grammar, ref_c, ref_free in cases[:2]:
        g, ref = (grammar, ref_c) if constrained else (None, ref_free)
        for adaptive in (True, False):
            for mode in modes:
                drafters = make_drafters(names, tok, suffix_store=store, grammar_mode=mode)
                r = draft_generate(model, prompt, max_new_tokens=BUDGET, stop_ids=[EOS], grammar=g,
                                   drafters=drafters, policy=DraftPolicy(adaptive=adaptive))
                assert r.tokens == ref, (names, adaptive, mode)
                assert r.forwards <= len(r.tokens)
        store.add(ref)  # the next prompt's suffix drafts come from this one's output


def test_grammar_drafts_save_forwards(setup, tok):
    rm, model, cases = setup
    total = sum(len(ref) for _, _, ref, _ in cases)
    forwards = 0
    for prompt, grammar, ref, _ in cases:
        r = draft_generate(model, prompt, max_new_tokens=BUDGET, stop_ids=[EOS], grammar=grammar,
                           drafters=make_drafters("grammar", tok), policy=DraftPolicy(adaptive=False))
        assert r.tokens == ref
        assert r.accepted.get("grammar", 0) > 0
        forwards += r.forwards
    assert forwards < total * 0.7


@pytest.mark.parametrize("constrained", [True, False])
def test_wrong_drafts_change_nothing(setup, constrained):
    rm, model, cases = setup
    for prompt, grammar, ref_c, ref_free in cases:
        g, ref = (grammar, ref_c) if constrained else (None, ref_free)
        r = draft_generate(model, prompt, max_new_tokens=BUDGET, stop_ids=[EOS], grammar=g, drafters=[Wrong(ref)],
                           policy=DraftPolicy(adaptive=False, max_draft=3))
        assert r.tokens == ref and r.forwards == len(ref) and r.accepted.get("lookup", 0) == 0
        # adaptive: a source that is never right soon stops costing verification tokens
        a = draft_generate(model, prompt, max_new_tokens=BUDGET, stop_ids=[EOS], grammar=g, drafters=[Wrong(ref)])
        assert a.tokens == ref and a.drafted.get("lookup", 0) <= len(ref) // 3


@pytest.mark.parametrize("constrained", [True, False])
def test_drafts_past_the_end_of_turn_and_the_budget(setup, constrained):
    rm, model, cases = setup
    for prompt, grammar, ref_c, ref_free in cases:
        g, ref = (grammar, ref_c) if constrained else (None, ref_free)
        cache = RoutedCache()
        r = draft_generate(model, prompt, max_new_tokens=BUDGET, stop_ids=[EOS], grammar=g, drafters=[Oracle(ref)],
                           policy=DraftPolicy(adaptive=False, max_draft=8), cache=cache)
        assert r.tokens == ref
        assert cache.get_seq_length() == len(prompt) + len(ref) - 1  # everything but the last token
        for budget in (1, 2, 5, len(ref) - 1):  # the budget ends inside a draft
            short = draft_generate(model, prompt, max_new_tokens=budget, stop_ids=[EOS], grammar=g,
                                   drafters=[Oracle(ref)], policy=DraftPolicy(adaptive=False, max_draft=8))
            assert short.tokens == ref[:budget] and short.finish == ("stop" if budget == len(ref) else "length")
    # no stop tokens at all: the oracle's junk after the reference is verified and rejected
    prompt, _, _, _ = cases[0]
    ref = reference(model, prompt, None, budget=20)
    ref_nostop = run_generate(model, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long),
                              cache=DynamicCache(), max_new_tokens=20, eos_token_id=None,
                              pad_token_id=EOS)[0][0, len(prompt):].tolist()
    r = draft_generate(model, prompt, max_new_tokens=20, stop_ids=None, drafters=[Oracle(ref)],
                       policy=DraftPolicy(adaptive=False))
    assert r.tokens == ref_nostop


def test_forced_text_tokenized_otherwise(setup, tok):
    rm, model, cases = setup
    for prompt, grammar, ref, _ in cases:
        r = draft_generate(model, prompt, max_new_tokens=BUDGET, stop_ids=[EOS], grammar=grammar,
                           drafters=[CharGrammar(tok)], policy=DraftPolicy(adaptive=False))
        assert r.tokens == ref
        assert r.drafted.get("grammar", 0) > r.accepted.get("grammar", 0)  # some were the model's choice, not all


def test_session_prefix_and_routed_skipping(setup, tok):
    rm, model, cases = setup
    prompt, grammar, ref, _ = cases[1]
    cache = RoutedCache()
    model(input_ids=torch.tensor([prompt[:-5]]), past_key_values=cache, use_cache=True)  # a session's prefix
    r = draft_generate(model, prompt, max_new_tokens=BUDGET, stop_ids=[EOS], grammar=grammar,
                       drafters=make_drafters("grammar,lookup", tok), cache=cache)
    assert r.tokens == ref
    with pytest.raises(ValueError, match="one must be new"):
        draft_generate(model, prompt[:-5], max_new_tokens=4, stop_ids=[EOS], cache=cache)


def test_routed_skipping_under_drafts(tok):
    rm = lively(tiny_routed("shape:tiny-qwen2", seed=5), seed=5)
    rm.tokenizer = tok
    prompt = prompts(tok, 1)[0]
    grammar = model_grammars(rm, [EOS]).for_tools(TOOL_SETS[0], "required", parallel=False)
    forced = [True, False, True, True]
    with torch.no_grad(), inference_weights(rm) as model:
        for policy in ("exact", "kv_preserving"):
            with routing(rm.model, "skip", decision_mask=torch.ones(1, len(prompt)), forced=forced, kv_policy=policy):
                ref = reference(model, prompt, grammar)
            with routing(rm.model, "skip", decision_mask=torch.ones(1, len(prompt)), forced=forced, kv_policy=policy):
                r = draft_generate(model, prompt, max_new_tokens=BUDGET, stop_ids=[EOS], grammar=grammar,
                                   drafters=make_drafters("grammar,lookup", tok), policy=DraftPolicy(adaptive=False))
            assert r.tokens == ref


def test_ngram_index_and_suffix_store():
    idx = NgramIndex(max_n=3)
    doc = idx.add([1, 2, 3, 4, 1, 2])
    assert idx.match([1, 2], 3) == ([3, 4, 1], 2)  # the earlier occurrence: the tail is never its own match
    assert idx.match([9, 2], 2) == ([3, 4], 1)
    assert idx.match([9], 2) == ([], 0)
    idx.extend(doc, [5])  # [1, 2] now last seen before 5
    assert idx.match([1, 2], 2) == ([5], 2)
    assert idx.match([1, 2], 2, min_n=3) == ([], 0)
    store = SuffixStore(max_n=4, max_docs=4)
    for i in range(6):
        store.add([100 + i, 7, 8, 9])
    assert len(store) <= 4 and store.index.match([7, 8], 5) == ([9], 2)


def test_only_allowed_and_names(tok):
    row = torch.zeros(4, dtype=torch.int32)
    assert only_allowed(row, [2]) is None
    row[1] = 1 << 5
    assert only_allowed(row, []) == 37 and only_allowed(row, [2]) == 37
    row[0] = (1 << 2) | (1 << 3)
    assert only_allowed(row, [2, 3]) is None  # 2, 3 and 37: a choice
    row[1] = 0
    assert only_allowed(row, [3, 2]) == 3  # stop tokens only: the first stop token
    from layerroute.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown drafter 'shallow'"):
        make_drafters("grammar,shallow", tok)
    with pytest.raises(ConfigError, match="named twice"):
        make_drafters("lookup,lookup", tok)
    with pytest.raises(ValueError, match="'full' or 'short'"):
        GrammarDrafter(tok, "half")
    assert DraftPolicy(first_cost=5.0).cut(["lookup:2"] * 4) == 0
    assert DraftPolicy().cut(["grammar"] * 6) == 6


def test_generate_cli_draft(tok, tmp_path, monkeypatch, capsys):
    """`layerroute generate --draft grammar,lookup --constrain`: the same text as without drafts, fewer forwards;
    with a free string and a budget only the budget rule closes (in the verify loop too)."""
    import argparse
    import json

    from layerroute.cli import generate_cli
    from layerroute.errors import ConfigError
    from tests.test_constrain import GCD, SEARCH, WEATHER

    rm = lively(tiny_routed("shape:tiny-qwen2", seed=3), seed=3)
    rm.tokenizer = tok
    monkeypatch.setattr(generate_cli, "load_for_inference", lambda *a, **k: rm)
    monkeypatch.setattr(rm.base_model.generation_config, "eos_token_id", EOS)
    path = tmp_path / "tools.json"
    path.write_text(json.dumps([WEATHER, GCD]))
    parser = argparse.ArgumentParser()
    generate_cli.add_arguments(parser)
    base = ["--prompt", "gcd?", "--tools", str(path), "--constrain", "--tool-choice", "required",
            "--no-parallel-calls", "--skip-fraction", "0.25", "--max-new-tokens", "96"]  # budget rule never binds
    outputs = []
    for extra in ([], ["--draft", "grammar,lookup"]):
        assert generate_cli.run(parser.parse_args(base + extra)) == 0
        out = capsys.readouterr().out.strip().splitlines()
        outputs.append(("\n".join(out[1:-1]), json.loads(out[-1])))
    assert outputs[0][0] == outputs[1][0]
    assert outputs[1][1]["forwards"] < outputs[1][1]["tokens"] and "grammar" in outputs[1][1]["by_source"]
    free = tmp_path / "search.json"
    free.write_text(json.dumps([SEARCH]))
    tight = [a if a != str(path) else str(free) for a in base[:-1]] + ["36"]  # the shortest call is 30 tokens
    texts = []
    for extra in ([], ["--draft", "grammar,lookup"]):
        assert generate_cli.run(parser.parse_args(tight + extra)) == 0
        out = capsys.readouterr().out.strip().splitlines()
        texts.append("\n".join(out[1:-1]))
    assert texts[0] == texts[1] and json.loads(out[-1])["budget_rule_closed"] > 0
    assert texts[1].rstrip().endswith("</tool_call>")
    with pytest.raises(ConfigError, match="one --prompt"):
        generate_cli.run(parser.parse_args(base + ["--draft", "lookup", "--prompt", "again"]))
    with pytest.raises(ConfigError, match="unknown drafter"):
        generate_cli.run(parser.parse_args(base + ["--draft", "magic"]))


def test_server_lone_path_drafts_same_answers(tok):
    """The server's lone request path with drafts: the same answers as without, per-drafter acceptance in the
    response's `layerroute.drafts` and in /metrics; requests under a grammar are drafted too (its budget rule in the
    verify loop), a continued session included."""
    from fastapi.testclient import TestClient

    from layerroute.serve import create_app
    from tests.test_constrain import GCD, SEARCH, WEATHER
    from tests.test_serve import routed_model

    ask = [{"role": "user", "content": "gcd of 12 and 18?"}]
    body = {"model": "m", "messages": ask, "tools": [WEATHER, GCD], "tool_choice": "required",
            "parallel_tool_calls": False, "max_tokens": 64, "temperature": 0}
    answers = {}
    for drafts in (None, "grammar,lookup,suffix"):
        app = create_app(routed_model(seed=1), model_name="m", max_batch=1, forced=[True, False, True, True],
                         drafts=drafts, prefill_thread=False)
        with TestClient(app) as client:
            first = client.post("/v1/chat/completions", json=body).json()
            again = client.post("/v1/chat/completions", json={**body, "messages": ask + [
                first["choices"][0]["message"], {"role": "tool", "content": "6", "tool_call_id": "x"},
                {"role": "user", "content": "and of 4 and 6?"}]}).json()
            free = client.post("/v1/chat/completions", json={"model": "m", "messages": ask, "max_tokens": 24,
                                                             "temperature": 0}).json()
            # a free string the random model never closes: only the budget rule ends the call within 36 tokens
            tight = client.post("/v1/chat/completions", json={**body, "tools": [SEARCH], "max_tokens": 36}).json()
            metrics = client.get("/metrics").text
        answers[drafts] = [r["choices"][0]["message"] for r in (first, again, free, tight)]
        assert tight["choices"][0]["message"]["tool_calls"], tight
        if drafts:
            assert all("drafts" in r["layerroute"] for r in (first, again, free, tight))
            assert again["layerroute"]["cache"]["reused"] is True
            assert free["layerroute"]["drafts"]["forwards"] <= free["usage"]["completion_tokens"] + 1
            assert first["layerroute"]["drafts"]["forwards"] < first["usage"]["completion_tokens"]
            assert "layerroute_drafted_request_forwards_total" in metrics
        else:
            assert "drafts" not in first["layerroute"]
    strip = [[{k: v for k, v in m.items() if k != "tool_calls"} | {"calls": [
        (c["function"]["name"], c["function"]["arguments"]) for c in m.get("tool_calls") or []]} for m in ms]
        for ms in answers.values()]
    assert strip[0] == strip[1]


@pytest.mark.slow
def test_real_model_bfcl_steps_equal_plain_greedy(smoke_data):
    """SmolLM2-135M-Instruct (float32) on four BFCL tool-call steps of the smoke data, each under its own grammar:
    grammar + lookup drafts give transformers' greedy tokens exactly, in fewer forwards (a near-tie flipped by the
    multi-token forward's rounding would show here)."""
    from layerroute.infer.generate import load_for_inference, stop_ids

    rm = load_for_inference("smollm2-135m-instruct", None, "float32", "cpu")
    eos = stop_ids(rm)
    grammars = model_grammars(rm, eos)
    steps = [s for s in smoke_data.eval + smoke_data.train if s.step_type == "tool_call" and s.tools][:4]
    assert len(steps) == 4
    tokens = forwards = 0
    with torch.no_grad(), inference_weights(rm) as model, plain_blocks(model):
        for step in steps:
            prompt = list(step.input_ids[: step.context_length])
            grammar = grammars.for_tools(step.tools, "required", parallel=False)
            ids = torch.tensor([prompt])
            out, _ = run_generate(model, ids, torch.ones_like(ids), cache=DynamicCache(), max_new_tokens=80,
                                  eos_token_id=eos, pad_token_id=eos[0],
                                  logits_processor=GrammarLogitsProcessor([grammar], eos))
            ref = out[0, len(prompt):].tolist()
            ref = ref[: next((i + 1 for i, t in enumerate(ref) if t in eos), len(ref))]
            r = draft_generate(model, prompt, max_new_tokens=80, stop_ids=eos, grammar=grammar,
                               drafters=make_drafters("grammar,lookup", rm.tokenizer))
            assert r.tokens == ref, step.conversation_id
            tokens, forwards = tokens + len(ref), forwards + r.forwards
    assert forwards < tokens / 2


def test_eval_drafts_same_samples(tok):
    """eval.drafts: free-running accuracy decodes each step alone with drafts and scores the same tokens as the
    batched path, constrained tool calls and free planning steps, LoRA on and off, routers deciding."""
    from layerroute.config import EvalConfig
    from layerroute.data.build import load_steps
    from layerroute.errors import ConfigError
    from layerroute.eval.accuracy import accuracy
    from tests.test_evaluate import data_cfg

    m = lively(tiny_routed("shape:tiny-qwen2", seed=3), seed=3)
    m.tokenizer = tok
    steps = list(load_steps(data_cfg(), tok).eval)
    idx = ([i for i, s in enumerate(steps) if s.step_type == "tool_call"][:2]
           + [i for i, s in enumerate(steps) if s.step_type == "planning"][:1])
    for config in ("base", "routed"):
        plain = EvalConfig(max_new_tokens_tool=24, max_new_tokens_planning=8, constrained=True,
                           accuracy_teacher_forced=False)
        drafted = EvalConfig(max_new_tokens_tool=24, max_new_tokens_planning=8, constrained=True,
                             accuracy_teacher_forced=False, drafts=["grammar", "lookup"])
        a, b = accuracy(m, steps, idx, config, plain), accuracy(m, steps, idx, config, drafted)
        assert [s["tokens"] for s in a["samples"]] == [s["tokens"] for s in b["samples"]]
        assert [s["finish"] for s in a["samples"]] == [s["finish"] for s in b["samples"]]
    with pytest.raises(ConfigError, match="eval.drafts"):
        EvalConfig(drafts=["shallow"])
