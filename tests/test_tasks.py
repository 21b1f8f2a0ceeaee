"""Each benchmark's code moved into `layerroute.tasks` (issue 25); every moved name stays importable from its old
module, as the same object, so old imports (and monkeypatching through the new home) keep working."""

from __future__ import annotations

import importlib

import pytest

# old module -> new module -> names moved between them
MOVED = {
    ("layerroute.data.sources", "layerroute.data.records"): [
        "ROLES", "Conversation", "BadRow", "Record", "row_hash", "shorten", "_bad", "check_conversation",
        "_first_assistant", "checked", "hub_rows", "jsonl_rows",
    ],
    ("layerroute.data.sources", "layerroute.tasks.bfcl"): [
        "bfcl_data_dir", "BFCL_TYPE_MAP", "bfcl_schema", "bfcl_tool", "bfcl_gold_calls", "load_bfcl",
        "bfcl_row",
    ],
    ("layerroute.data.sources", "layerroute.tasks.gsm8k"): [
        "math_target", "gsm8k_row", "load_gsm8k_hub", "load_gsm_symbolic", "load_gsm8k_jsonl",
    ],
    ("layerroute.data.sources", "layerroute.tasks.turing"): [
        "TURING_QUESTION_COLUMNS", "TURING_ANSWER_COLUMNS", "TURING_REASONING_COLUMNS", "turing_row", "load_turing",
    ],
    ("layerroute.serve.agent", "layerroute.tasks.bfcl_multi_turn"): [
        "CATEGORY_FILE", "CLASSES", "STATELESS", "Task", "load_tasks", "Backend",
        "parse_call_string", "bfcl_checkers",
    ],
}


@pytest.mark.parametrize(("old", "new"), list(MOVED))
def test_moved_names_are_the_same_objects_at_their_old_path(old, new):
    old_mod, new_mod = importlib.import_module(old), importlib.import_module(new)
    for name in MOVED[old, new]:
        assert getattr(old_mod, name) is getattr(new_mod, name), f"{old}.{name} is not {new}.{name}"
        obj = getattr(new_mod, name)
        if callable(obj) and hasattr(obj, "__module__"):
            assert obj.__module__ == new, f"{name} is defined in {obj.__module__}, not {new}"


def test_registry_uses_the_task_loaders():
    from layerroute.data import sources
    from layerroute.tasks import bfcl, gsm8k, turing

    assert sources.SOURCES["bfcl"] is bfcl.load_bfcl and sources.SOURCES["turing"] is turing.load_turing
    assert sources.SOURCES["gsm8k_hub"] is gsm8k.load_gsm8k_hub
    assert sources.SOURCES["gsm_symbolic"] is gsm8k.load_gsm_symbolic
    assert sources.SOURCES["gsm8k_jsonl"] is gsm8k.load_gsm8k_jsonl


def test_session_reads_bfcl_call_strings_from_the_task_module():
    from layerroute.tasks.bfcl_multi_turn import bfcl_calls

    docs = {"cd": {"parameters": {"properties": {"folder": {}}}}}
    assert bfcl_calls(["cd('x')", "cd(folder='y')"], docs) == [
        {"name": "cd", "arguments": {"folder": "x"}}, {"name": "cd", "arguments": {"folder": "y"}}]
