"""The BFCL multi-turn agent loop against the tiny server: the ground-truth calls, imposed through the scripted
hook, pass BFCL's own state/response check; wrong calls fail it; routing is reported for every step."""

from __future__ import annotations

import inspect
import json

import openai
import pytest

pytest.importorskip("bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker")

from layerroute.data.toolcalls import render_tool_calls  # noqa: E402
from layerroute.serve import BackgroundServer, create_app  # noqa: E402
from layerroute.serve.agent import Backend, bfcl_checkers, load_tasks, parse_call_string, run_task, summarize  # noqa: E402
from tests.test_serve import routed_model  # noqa: E402

TASK_ID = "multi_turn_base_1"  # GorillaFileSystem only; 4 turns of keyword-argument calls


def gold_script(task, wrong_turn: int | None = None):
    """Scripted model: at each user turn, write that turn's ground-truth calls (all in one step); after the
    tool results, answer in text. `wrong_turn` gets a harmless but wrong call instead."""
    backend = Backend(task)

    def script(messages, tools):
        if messages[-1]["role"] == "tool":
            return "Done."
        turn = sum(1 for m in messages if m["role"] == "user") - 1
        if turn == wrong_turn:
            return render_tool_calls([{"name": "pwd", "arguments": {}}])
        calls = []
        for text in task.ground_truth[turn]:
            name, args, kwargs = parse_call_string(text)
            params = list(inspect.signature(backend.methods[name]).parameters)
            calls.append({"name": name, "arguments": {**dict(zip(params, args, strict=False)), **kwargs}})
        return render_tool_calls(calls)

    return script


@pytest.mark.parametrize("wrong_turn", [None, 1])
def test_bfcl_agent_loop(wrong_turn):
    (task,) = load_tasks(ids=[TASK_ID])
    assert task.tools and all(t["type"] == "function" for t in task.tools)
    app = create_app(routed_model(seed=3, lora=False), model_name="tiny", scripted=gold_script(task, wrong_turn))
    app.state.engine.context_length = 16384  # the tools block outgrows the tiny shape's nominal 2048 (RoPE does not)
    with BackgroundServer(app) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0, timeout=300)
        res = run_task(client, "tiny", task, max_steps=3, max_tokens=128, temperature=0.0, checkers=bfcl_checkers(),
                       log=lambda m: None)
    assert len(res["turns"]) == len(task.turns)
    # every turn: one step with the calls, one text step after the results
    assert len(res["steps"]) == 2 * len(task.turns)
    assert [s["parsed_tool_call"] for s in res["steps"]] == [True, False] * len(task.turns)
    assert all(s["gate_pattern"] == "1111" for s in res["steps"])
    assert all(s["cache_reused"] for s in res["steps"][1:])  # an agent resends its conversation: sessions pay
    if wrong_turn is None:
        assert res["success"] and all(t["valid"] and t["names_match"] for t in res["turns"])
    else:
        assert not res["success"] and res["failed_turn"] == wrong_turn
        assert res["turns"][wrong_turn]["calls"] == ["pwd"] and not res["turns"][wrong_turn]["names_match"]
    summary = summarize([res], "bfcl_state_response")
    assert summary["tasks"] == 1 and summary["steps_per_type"]["tool_call"]["steps"] == len(task.turns)
    assert summary["prefilled_over_prompt"] < 0.5
    json.dumps(summary)


def test_ground_truth_calls_execute_without_eval():
    (task,) = load_tasks(ids=[TASK_ID])
    env = Backend(task)
    assert parse_call_string("mv(source='a', destination='b')") == ("mv", [], {"source": "a", "destination": "b"})
    with pytest.raises(ValueError):
        parse_call_string("__import__('os').system('true')")
    assert "Error during execution" in env.call("system", kwargs={"command": "true"})  # not a tool of the task
    assert "Error during execution" in env.call("cd", kwargs={"nope": 1})
    out = env.call(*parse_call_string(task.ground_truth[0][0]))
    assert "log.txt" in out or "workspace" in out


def test_agent_loop_constrained_required_calls_name_offered_tools():
    """No script: the tiny random model under the server's grammar, tool_choice=required. Every step is a complete
    call of one of the task's own functions: a free-string argument of a random model would outlast any budget,
    and the budget rule closes it in time (finish_reason length when the budget ends right after the call)."""
    (task,) = load_tasks(ids=[TASK_ID])
    offered = {t["function"]["name"] for t in task.tools}
    app = create_app(routed_model(seed=3, lora=False), model_name="tiny", forced=[True, False, True, True])
    app.state.engine.context_length = 16384
    with BackgroundServer(app) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0, timeout=300)
        res = run_task(client, "tiny", task, max_steps=1, max_tokens=48, temperature=0.0, checkers=bfcl_checkers(),
                       log=lambda m: None, tool_choice="required", parallel_tool_calls=False)
    assert len(res["steps"]) == len(task.turns)
    for s in res["steps"]:
        assert s["finish_reason"] in ("tool_calls", "length"), s
        assert s["parsed_tool_call"] and s["calls"] and set(s["calls"]) <= offered, s
