"""`layerroute agent --spawn --draft ...`: the drafters reach the in-process server, every step records the response's
draft statistics, and `summarize` aggregates them per step type (tokens per forward, accepted draft tokens per decode
forward by drafter: `layerroute.serve.agent.draft_summary`)."""

from __future__ import annotations

import argparse
import json

import pytest

pytest.importorskip("bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker")

from layerroute.errors import ConfigError  # noqa: E402
from layerroute.serve import agent  # noqa: E402
from layerroute.serve.agent import _draft_record, draft_summary, summarize  # noqa: E402
from tests.test_serve import routed_model  # noqa: E402

TASK_ID = "multi_turn_base_1"  # GorillaFileSystem only; 4 turns


def step(parsed: bool, drafts: dict | None) -> dict:
    """A step record as `run_task` writes it, the draft part from a response's `layerroute.drafts`."""
    return {"parsed_tool_call": parsed, "blocks_skipped": [], "block_flops_skipped": 0.0, "total_flops_skipped": 0.0,
            "cache_reused": True, "prefilled_tokens": 10, "prompt_tokens": 100, "latency_s": 1.0,
            "drafts": _draft_record(drafts)}


def test_draft_statistics_aggregate_per_step_type():
    steps = [
        # the server's extension: per drafter (drafted, accepted, its own per-forward ratio), forwards, tokens
        step(True, {"grammar": {"drafted": 10, "accepted": 8, "accepted_per_forward": 1.6},
                    "lookup": {"drafted": 4, "accepted": 1, "accepted_per_forward": 0.2}, "forwards": 5, "tokens": 14}),
        step(True, {"grammar": {"drafted": 6, "accepted": 6, "accepted_per_forward": 2.0},
                    "suffix": {"drafted": 3, "accepted": 0, "accepted_per_forward": 0.0}, "forwards": 3, "tokens": 9}),
        step(False, {"forwards": 10, "tokens": 10}),  # drafted, nothing proposed: one token per forward
        step(False, None),  # decoded without drafts (e.g. a batched row): left out of the ratios
    ]
    assert steps[0]["drafts"] == {"forwards": 5, "tokens": 14, "by_source": {
        "grammar": {"drafted": 10, "accepted": 8}, "lookup": {"drafted": 4, "accepted": 1}}}
    s = summarize([{"success": False, "turns": [], "steps": steps}], "call_names")
    calls = s["steps_per_type"]["tool_call"]["drafts"]
    assert (calls["steps"], calls["tokens"], calls["forwards"], calls["decode_forwards"]) == (2, 23, 8, 6)
    assert calls["tokens_per_forward"] == pytest.approx(23 / 8)
    assert calls["tokens_per_decode_forward"] == pytest.approx((23 - 2) / 6)
    src = calls["by_source"]
    assert src["grammar"] == {"drafted": 16, "accepted": 14, "accepted_per_decode_forward": pytest.approx(14 / 6),
                              "acceptance": pytest.approx(14 / 16)}
    assert src["lookup"]["accepted_per_decode_forward"] == pytest.approx(1 / 6)
    assert src["suffix"] == {"drafted": 3, "accepted": 0, "accepted_per_decode_forward": 0.0, "acceptance": 0.0}
    # no turn ended inside a draft here: each verify forward's own token plus the drafters' accepted ones
    assert calls["tokens_per_decode_forward"] == pytest.approx(1 + sum(v["accepted_per_decode_forward"]
                                                                       for v in src.values()))
    text = s["steps_per_type"]["text"]["drafts"]
    assert (text["steps"], text["tokens_per_forward"], text["tokens_per_decode_forward"], text["by_source"]) == \
        (1, 1.0, 1.0, {})
    overall = s["drafts"]
    assert (overall["steps"], overall["tokens"], overall["forwards"]) == (3, 33, 18)
    assert overall["by_source"]["grammar"]["accepted_per_decode_forward"] == pytest.approx(14 / 15)
    assert draft_summary([step(True, None)]) is None
    json.dumps(s)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    agent.add_arguments(p)
    return p


@pytest.mark.parametrize("flag", [["--draft", "grammar"], ["--prompt-lookup", "4"]])
def test_draft_flags_need_spawn(flag):
    with pytest.raises(ConfigError, match=flag[0]):
        agent.run(parser().parse_args(["--ids", TASK_ID, *flag]))


def test_spawned_server_drafts_with_the_same_outputs(monkeypatch, tmp_path, capsys):
    """The tiny random model behind `agent --spawn`, without and with --draft grammar,lookup,suffix: the same steps
    (lossless, float32), the drafts field on every drafted response only, grammar drafts accepted under
    tool_choice=required."""
    from layerroute.infer import generate

    def tiny(*args, **kwargs):
        rm = routed_model(seed=3, lora=False)
        rm.config.max_position_embeddings = 16384  # the tools block outgrows the tiny shape's nominal 2048
        return rm

    monkeypatch.setattr(generate, "load_for_inference", tiny)
    base = ["--spawn", "--ids", TASK_ID, "--max-steps", "1", "--max-tokens", "48", "--tool-choice", "required",
            "--no-parallel-calls", "--skip-fraction", "0.25"]
    runs = {}
    for draft in (None, "grammar,lookup,suffix"):
        out = tmp_path / f"{draft}.json"
        assert agent.run(parser().parse_args(base + ["--output", str(out)] + (["--draft", draft] if draft else []))) == 0
        runs[draft] = json.loads(out.read_text())
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["draft"] == draft
    plain, drafted = runs[None], runs["grammar,lookup,suffix"]
    keys = ("calls", "arguments", "content", "finish_reason", "completion_tokens")
    steps = [[{k: s[k] for k in keys} for s in r["tasks"][0]["steps"]] for r in (plain, drafted)]
    assert len(steps[0]) == 4 and steps[0] == steps[1]
    assert all(s["drafts"] is None for s in plain["tasks"][0]["steps"]) and plain["summary"]["drafts"] is None
    for s in drafted["tasks"][0]["steps"]:
        d = s["drafts"]
        assert d["forwards"] == s["forwards"] and d["tokens"] >= s["completion_tokens"] and set(d["by_source"]) <= {
            "grammar", "lookup", "suffix"}, s
    summary = drafted["summary"]["steps_per_type"]["tool_call"]["drafts"]
    assert summary["steps"] == 4 and summary["by_source"]["grammar"]["accepted"] > 0
    assert summary["tokens_per_forward"] > 1.0 and summary["forwards"] < summary["tokens"]


def test_suffix_store_sees_the_servers_earlier_requests_with_the_same_tools():
    """The server's suffix store is keyed by the request's compiled grammar (one object per tool set and choice from
    the grammar cache): a later request with the same tools drafts from an earlier one's output, as a later turn of
    an agent session does; another tool set starts its own store."""
    from fastapi.testclient import TestClient

    from layerroute.serve import create_app
    from tests.test_constrain import GCD, WEATHER

    app = create_app(routed_model(seed=1), model_name="m", max_batch=1, drafts="grammar,lookup,suffix",
                     prefill_thread=False)
    body = {"model": "m", "tools": [WEATHER, GCD], "tool_choice": "required", "parallel_tool_calls": False,
            "max_tokens": 32, "temperature": 0}
    ask = [{"role": "user", "content": "gcd of 12 and 18?"}]
    with TestClient(app) as client:
        first, second = (client.post("/v1/chat/completions", json={**body, "messages": ask + [
            {"role": "user", "content": f"turn {i}"}]}).json() for i in range(2))
        other = client.post("/v1/chat/completions", json={**body, "tools": [GCD], "messages": ask}).json()
    said = [r["choices"][0]["message"]["content"] for r in (first, second)]  # 32 tokens: the call is not closed
    assert said[0][:40] == said[1][:40]  # the random model starts both turns alike: the second drafts from the first
    assert "suffix" not in first["layerroute"]["drafts"]  # nothing earlier to draft from
    assert second["layerroute"]["drafts"]["suffix"]["accepted"] > 0
    assert "suffix" not in other["layerroute"]["drafts"]  # another tool set: an empty store
