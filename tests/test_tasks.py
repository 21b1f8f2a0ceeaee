"""Tasks as objects in one registry (issue 37): each source kind is read by one task, each step scored by one task,
and a task written in a test (below: `Echo`, one file's worth of code) is picked up by the settings checks, the data
pipeline and the evaluation's scorer and budget without any other module knowing it."""

from __future__ import annotations

import importlib
import os
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from layerroute.data.config import DataConfig, SourceConfig
from layerroute.data.records import Conversation, checked
from layerroute.data.render import PLANNING, TOOL_CALL
from layerroute.errors import ConfigError
from layerroute.tasks import registry
from layerroute.tasks.base import Task

TOK = os.path.join(os.path.dirname(__file__), "fixtures", "tokenizers", "smollm2")


def test_every_source_kind_has_one_task():
    by_kind = {k: registry.task_for_source(k).name for k in registry.source_kinds()}
    assert by_kind == {"bfcl": "bfcl", "hermes": "chats", "glaive": "chats", "jsonl": "chats",
                       "gsm8k_hub": "gsm8k", "gsm8k_jsonl": "gsm8k", "gsm_symbolic": "reasoning_gym",
                       "turing": "turing"}
    assert set(registry.tasks()) == {"bfcl", "bfcl_multi_turn", "chats", "gsm8k", "reasoning_gym", "turing"}
    from layerroute.tasks import bfcl, gsm8k, reasoning_gym, turing

    assert registry.task("bfcl").loaders["bfcl"] is bfcl.load_bfcl
    assert registry.task("gsm8k").loaders == {"gsm8k_hub": gsm8k.load_gsm8k_hub, "gsm8k_jsonl": gsm8k.load_gsm8k_jsonl}
    assert registry.task("reasoning_gym").loaders["gsm_symbolic"] is reasoning_gym.load_gsm_symbolic
    assert registry.task("turing").loaders["turing"] is turing.load_turing


def test_a_step_is_scored_by_its_task_else_by_its_step_types_default():
    def step(task, kind):
        return SimpleNamespace(task=task, step_type=kind)

    assert registry.task_for_step(step("turing", PLANNING)).name == "turing"
    assert registry.task_for_step(step(None, TOOL_CALL)).name == "bfcl"  # a hand-made step
    assert registry.task_for_step(step(None, PLANNING)).name == "gsm8k"
    assert registry.task_for_step(step("chats", TOOL_CALL)).name == "bfcl"  # chats have no gold of their own
    with pytest.raises(ConfigError, match="unknown source 'nope'; choose one of bfcl, "):
        registry.task_for_source("nope")


def test_session_reads_bfcl_call_strings_from_the_task_module():
    from layerroute.tasks.bfcl_multi_turn import bfcl_calls

    docs = {"cd": {"parameters": {"properties": {"folder": {}}}}}
    assert bfcl_calls(["cd('x')", "cd(folder='y')"], docs) == [
        {"name": "cd", "arguments": {"folder": "x"}}, {"name": "cd", "arguments": {"folder": "y"}}]


def test_agent_names_are_the_task_modules():
    agent, new = importlib.import_module("layerroute.serve.agent"), importlib.import_module(
        "layerroute.tasks.bfcl_multi_turn")
    for name in ["CATEGORY_FILE", "CLASSES", "STATELESS", "Task", "load_tasks", "Backend", "parse_call_string",
                 "bfcl_checkers"]:
        assert getattr(agent, name) is getattr(new, name)


# -- a task added in a test --------------------------------------------------------------------------------------
def load_echo(src, cfg):
    """`limit` rows 'say N' -> 'N', the odd ones through a tool call; row 0 twice (a duplicate)."""
    for i in [0, *range(src.limit)]:
        turn = {"role": "assistant", "content": str(i)}
        if i % 2:
            turn = {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "say", "arguments": {"n": i}}}]}
        yield checked(Conversation(f"echo:{i}", src.source_label, [{"role": "user", "content": f"say {i}"}, turn],
                                   category="echo", meta={"answer": str(i)}))


class Echo(Task):
    name = "echo"
    loaders = {"echo": load_echo}

    def check_source(self, src, key):
        if src.limit is None:
            raise ConfigError(f"{key}.limit: echo needs a limit")

    def step_type(self, message):
        return PLANNING  # a call to `say` is this task's answer, not a tool call

    def eval_only(self, conv, cfg):
        return conv.id == "echo:3"

    def budget(self, step, cfg):
        return 5

    def score(self, step, text):
        return text.strip() == step.meta["answer"], None if text.strip() == step.meta["answer"] else "not an echo"


@pytest.fixture
def echo():
    task = registry.register(Echo())
    yield task
    registry.unregister("echo")
    assert "echo" not in registry.source_kinds()


def test_a_task_registered_in_a_test_is_read_rendered_and_scored(echo):
    from layerroute.data.build import load_steps
    from layerroute.eval.accuracy import score_generation

    with pytest.raises(ConfigError, match=r"data.sources\[0\].limit: echo needs a limit"):
        DataConfig.from_dict({"sources": [{"name": "echo"}]})
    with pytest.raises(ConfigError, match=r"data.sources\[0\].categories: only the bfcl source has categories"):
        DataConfig.from_dict({"sources": [{"name": "echo", "limit": 2, "categories": ["x"]}]})
    cfg = DataConfig(sources=[SourceConfig("echo", limit=6)], eval_fraction=0.0, progress=False)
    data = load_steps(cfg, AutoTokenizer.from_pretrained(TOK))

    assert data.report.rows["echo"]["rows"] == 7 and data.report.rows["echo"]["duplicates"] == 1
    assert [s.conversation_id for s in data.eval] == ["echo:3"]  # the task's eval-only conversation
    assert len(data.train) == 5
    steps = data.train + data.eval
    assert {s.task for s in steps} == {"echo"} and {s.step_type for s in steps} == {PLANNING}
    assert data.stats()["counts"]["echo"][PLANNING]["train"] == 5

    step = data.eval[0]
    assert registry.task_for_step(step) is echo
    assert score_generation(step, " 3 ") == (True, None)
    assert score_generation(step, "4") == (False, "not an echo")
    assert registry.task_for_step(step).budget(step, None) == 5


def test_a_task_cannot_take_a_kind_or_name_already_read(echo):
    class Clash(Echo):
        name = "clash"

    with pytest.raises(ValueError, match="source kinds \\['echo'\\] are read by 'echo'"):
        registry.register(Clash())
    with pytest.raises(ValueError, match="a task needs a new name"):
        registry.register(Echo())
