"""The budget rule inside the draft verify loop (`layerroute.infer.verify`, ``closer``): with drafts on, the tokens of a
constrained request are the plain constrained path's (`GrammarLogitsProcessor(budgets=...)` in transformers'
generate()) at every budget: one that holds the call with room, the shortest call's length and a few tokens more
(the rule closes the call: it engages), and one below the shortest (the rule steps aside, the budget cuts).

The tools have a free string and a free array (`FREE_SETS`): the tiny random model never closes them on its own, so
at every budget here only the rule ends the call, and the drafts (grammar-forced text, prompt lookup, an oracle that
drafts the reference and then junk past the budget, drafts that are always wrong) must not move a single token.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from transformers import DynamicCache

from layerroute.data.toolcalls import parse_tool_calls
from layerroute.infer.constrain import GrammarLogitsProcessor, model_grammars
from layerroute.infer.drafts import DraftPolicy, make_drafters
from layerroute.infer.generate import inference_weights, plain_blocks, run_generate
from layerroute.infer.verify import draft_generate
from tests.helpers import lively, tiny_routed
from tests.test_constrain import EOS, FREE_SETS, NOTE, prompts, shortest
from tests.test_drafts import Oracle, Wrong
from tests.test_drafts import tok as tok  # the module-scoped tokenizer fixture


@pytest.fixture(scope="module")
def setup(tok):
    rm = lively(tiny_routed("shape:tiny-qwen2", seed=3), seed=3)
    rm.tokenizer = tok
    with torch.no_grad(), inference_weights(rm) as model, plain_blocks(model):
        yield rm, model, model_grammars(rm, [EOS])


def plain(model, prompt, grammar, budget, closer):
    """The plain constrained path: generate() under the grammar's processor with the budget rule."""
    ids = torch.tensor([prompt])
    proc = GrammarLogitsProcessor([grammar], [EOS], budgets=budget, closer=closer)
    out, _ = run_generate(model, ids, torch.ones_like(ids), cache=DynamicCache(), max_new_tokens=budget,
                          eos_token_id=[EOS], pad_token_id=EOS, logits_processor=proc)
    new = out[0, len(prompt):].tolist()
    return (new[: new.index(EOS) + 1] if EOS in new else new), proc.closed


def cases(tok, grammars):
    """(prompt, grammar, shortest call's length): tool_choice required, parallel calls allowed and not."""
    out = []
    for i, (p, tools) in enumerate(zip(prompts(tok, 3), FREE_SETS, strict=True)):
        g = grammars.for_tools(tools, "required", parallel=i != 1)
        out.append((p, g, len(shortest(grammars, g))))
    return out


def check_budgets(model, tok, grammars, constrained, extras, configs) -> tuple[int, int, int]:
    """Drafted == plain at each budget (the shortest call + extra): (budgets where the rule engaged, tokens,
    forwards of the drafted runs)."""
    engaged = tokens = forwards = 0
    for prompt, grammar, least in constrained:
        for extra in extras:
            budget = least + extra
            ref, closed = plain(model, prompt, grammar, budget, grammars.closer)
            engaged += closed > 0
            calls, _, error = parse_tool_calls(tok.decode(ref, skip_special_tokens=True), cut=ref[-1] != EOS)
            assert (error is None and calls) if extra >= 0 else not calls, (extra, ref)  # the rule closed the call
            for names, adaptive in configs:
                r = draft_generate(model, prompt, max_new_tokens=budget, stop_ids=[EOS], grammar=grammar,
                                   closer=grammars.closer, drafters=make_drafters(names, tok),
                                   policy=DraftPolicy(adaptive=adaptive))
                assert r.tokens == ref, (budget, names, adaptive)
                assert r.closed == closed  # the rule narrowed the same positions
                tokens, forwards = tokens + len(r.tokens), forwards + r.forwards
    return engaged, tokens, forwards


def test_drafted_constrained_tokens_equal_the_plain_path_at_every_budget(setup, tok):
    rm, model, grammars = setup
    constrained = cases(tok, grammars)[:2]
    engaged, tokens, forwards = check_budgets(model, tok, grammars, constrained, (-1, 0, 3),
                                              [("grammar,lookup", True), ("grammar", False)])
    assert engaged >= 2 * 2  # every budget that holds the shortest call needed the rule
    assert forwards < 0.8 * tokens  # and drafts were accepted


@pytest.mark.slow
def test_drafted_constrained_tokens_every_budget_every_drafter(setup, tok):
    """The sweep: three tool sets (parallel calls allowed and not), five budgets, four drafter configurations."""
    rm, model, grammars = setup
    configs = [(n, a) for n in ("grammar", "lookup", "grammar,lookup") for a in (True, False) if n != "lookup" or a]
    assert check_budgets(model, tok, grammars, cases(tok, grammars), (-1, 0, 1, 3, 12), configs)[0] >= 3 * 4


def test_oracle_and_wrong_drafts_under_the_budget_rule(setup, tok):
    """Drafts of the reference and then junk (past the end of turn and past the budget), and drafts that are
    never right: the same tokens, the matcher and the rule advanced over accepted tokens only."""
    rm, model, grammars = setup
    for (prompt, grammar, least), extra in zip(cases(tok, grammars)[:2], (0, 3), strict=True):
        budget = least + extra  # the tightest budget that holds the call, and one with room to spare
        ref, _ = plain(model, prompt, grammar, budget, grammars.closer)
        for drafter, max_draft in ((Oracle(ref), 8), (Wrong(ref), 3)):
            r = draft_generate(model, prompt, max_new_tokens=budget, stop_ids=[EOS], grammar=grammar,
                               closer=grammars.closer, drafters=[drafter],
                               policy=DraftPolicy(adaptive=False, max_draft=max_draft))
            assert r.tokens == ref, (budget, type(drafter).__name__)
        assert r.forwards == len(ref)  # the wrong drafts: one token per forward


def test_without_the_rule_the_drafts_follow_the_plain_grammar(setup, tok):
    """closer=None: the plain grammar (no rule), which cuts the call inside its free string, as generate() does."""
    rm, model, grammars = setup
    prompt, grammar, least = cases(tok, grammars)[0]
    ids = torch.tensor([prompt])
    out, _ = run_generate(model, ids, torch.ones_like(ids), cache=DynamicCache(), max_new_tokens=least + 3,
                          eos_token_id=[EOS], pad_token_id=EOS, logits_processor=GrammarLogitsProcessor([grammar], [EOS]))
    ref = out[0, len(prompt):].tolist()
    r = draft_generate(model, prompt, max_new_tokens=least + 3, stop_ids=[EOS], grammar=grammar,
                       drafters=make_drafters("grammar,lookup", tok))
    assert r.tokens == ref and r.closed == 0 and r.finish == "length"
    assert parse_tool_calls(tok.decode(ref, skip_special_tokens=True), cut=True)[0] == []
    with pytest.raises(ValueError, match="needs a grammar"):
        draft_generate(model, prompt, max_new_tokens=4, stop_ids=[EOS], closer=grammars.closer)


def test_json_schema_answer_under_budget_with_drafts(setup, tok):
    rm, model, grammars = setup
    note = grammars.for_tools(None, "auto", response_format={"type": "json_schema", "json_schema": {"schema": NOTE}})
    least = len(shortest(grammars, note))
    for prompt in prompts(tok, 2):
        for budget in (least, least + 9):
            ref, _ = plain(model, prompt, note, budget, grammars.closer)
            r = draft_generate(model, prompt, max_new_tokens=budget, stop_ids=[EOS], grammar=note,
                               closer=grammars.closer, drafters=make_drafters("grammar,lookup", tok))
            assert r.tokens == ref
            jsonschema.validate(json.loads(tok.decode(r.tokens, skip_special_tokens=True)), NOTE)


def test_generate_batched_drafts_apply_the_processors_budget_rule(tok):
    """generate_batched(drafts=...) with a request's processor under budgets: the batched plain path's tokens,
    the routers deciding."""
    from layerroute.infer.batched import Request, generate_batched

    rm = lively(tiny_routed("shape:tiny-qwen2", seed=3), seed=3)
    rm.tokenizer = tok
    grammars = model_grammars(rm, [EOS])

    def requests():
        return [Request(prompt=p, max_new_tokens=least + 2, stop=frozenset([EOS]),
                        logits_processor=GrammarLogitsProcessor([g], [EOS], budgets=least + 2, closer=grammars.closer))
                for p, g, least in cases(tok, grammars)]

    plain_rows = generate_batched(rm, requests(), batch_size=1, progress=False)
    drafted = generate_batched(rm, requests(), drafts=["grammar", "lookup"], progress=False)
    assert [r.tokens for r in drafted] == [r.tokens for r in plain_rows]
    assert sum(r.extra["forwards"] for r in drafted) < sum(len(r.tokens) for r in drafted)
    bad = requests()[:1]
    bad[0].logits_processor.budgets = bad[0].max_new_tokens + 1
    with pytest.raises(ValueError, match="own budget"):
        generate_batched(rm, bad, drafts=["lookup"], progress=False)
