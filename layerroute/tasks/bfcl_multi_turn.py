"""BFCL multi-turn (multi_turn_base): the tasks, their executable backend and BFCL's own checkers.

`load_tasks` reads the tasks from the installed bfcl-eval package (each task's tools are the function docs of
its classes, converted by `layerroute.tasks.bfcl.bfcl_tool`); `Backend` instantiates the package's Python
implementations of those classes with the task's initial state and runs calls on them; `parse_call_string` and
`bfcl_calls` read BFCL's ground-truth call strings ("cd(folder='x')"); `bfcl_checkers` imports BFCL's
state and response checkers. Used by the agent loop (`layerroute.serve.agent`) and the session comparison
(`layerroute.infer.session.bfcl_multi_turn`).

`parse_call_string` (the agent's: positional arguments stay positional, executed as such) and `bfcl_calls` (the
session's: positional arguments named from the function doc, for a structured gold call) read the same strings;
each was moved as it was. `load_tasks` and `layerroute.infer.session.bfcl_multi_turn` also read the same files, each
its own way (the session's renders steps, so it stays with the session).
"""

from __future__ import annotations

import ast
import copy
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from layerroute.errors import DataError
from layerroute.tasks import base
from layerroute.tasks.bfcl import bfcl_data_dir, bfcl_tool

CATEGORY_FILE = "BFCL_v4_multi_turn_base.json"
# class -> (module, function doc) as in bfcl_eval/constants/executable_backend_config.py (copied, so that a
# missing or moved constants module does not stop the agent; the files are checked to exist at load)
_BACKEND = "bfcl_eval.eval_checker.multi_turn_eval.func_source_code"
CLASSES = {
    "GorillaFileSystem": ("gorilla_file_system", "gorilla_file_system.json"),
    "MathAPI": ("math_api", "math_api.json"),
    "MessageAPI": ("message_api", "message_api.json"),
    "TwitterAPI": ("posting_api", "posting_api.json"),
    "TicketAPI": ("ticket_api", "ticket_api.json"),
    "TradingBot": ("trading_bot", "trading_bot.json"),
    "TravelAPI": ("travel_booking", "travel_booking.json"),
    "VehicleControlAPI": ("vehicle_control", "vehicle_control.json"),
}
STATELESS = {"MathAPI"}


# -- data ----------------------------------------------------------------------------------------------------
@dataclass
class Task:
    id: str
    turns: list[list[dict]]  # user messages per turn
    initial_config: dict
    classes: list[str]
    excluded: list[str]
    ground_truth: list[list[str]]  # per turn, BFCL call strings
    tools: list[dict] = field(default_factory=list)


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_tasks(limit: int | None = 3, ids: list[str] | None = None) -> list[Task]:
    data = Path(bfcl_data_dir())
    rows = _jsonl(data / CATEGORY_FILE)
    answers = {r["id"]: r["ground_truth"] for r in _jsonl(data / "possible_answer" / CATEGORY_FILE)}
    if ids:
        wanted = set(ids)
        rows = [r for r in rows if r["id"] in wanted]
        missing = wanted - {r["id"] for r in rows}
        if missing:
            raise DataError(f"no BFCL multi-turn task with id {', '.join(sorted(missing))}")
    elif limit is not None:
        rows = rows[:limit]
    tasks = []
    for r in rows:
        unknown = [c for c in r["involved_classes"] if c not in CLASSES]
        if unknown:
            raise DataError(f"{r['id']}: no backend for {', '.join(unknown)}")
        excluded = list(r.get("excluded_function") or [])
        tools = []
        for cls in r["involved_classes"]:
            for fn in _jsonl(data / "multi_turn_func_doc" / CLASSES[cls][1]):
                if fn["name"] not in excluded:
                    tools.append(bfcl_tool(fn))
        tasks.append(Task(r["id"], r["question"], r["initial_config"], list(r["involved_classes"]), excluded,
                          answers[r["id"]], tools))
    return tasks


# -- executing calls -----------------------------------------------------------------------------------------
class Backend:
    """The task's classes, instantiated from bfcl-eval's implementations with the task's initial state."""

    def __init__(self, task: Task):
        self.instances: dict[str, object] = {}
        self.methods: dict[str, object] = {}
        for cls in task.classes:
            module = importlib.import_module(f"{_BACKEND}.{CLASSES[cls][0]}")
            inst = getattr(module, cls)()
            if cls not in STATELESS:
                inst._load_scenario(copy.deepcopy(task.initial_config.get(cls, {})), long_context=False)
            self.instances[cls] = inst
            for name in dir(inst):
                if not name.startswith("_") and callable(getattr(inst, name)):
                    self.methods[name] = getattr(inst, name)  # a later class wins a name clash, as in BFCL
        self.allowed = {t["function"]["name"] for t in task.tools}

    def call(self, name: str, args: list | None = None, kwargs: dict | None = None) -> str:
        """Run one call; the result as BFCL's executor formats it (str, JSON for dicts, else str())."""
        if name not in self.allowed or name not in self.methods:
            return f"Error during execution: function {name!r} is not available"
        try:
            result = self.methods[name](*(args or []), **(kwargs or {}))
        except Exception as e:  # noqa: BLE001 - a failing tool is a tool result, as in BFCL
            return f"Error during execution: {e}"
        if isinstance(result, str):
            return result
        if isinstance(result, dict):
            try:
                return json.dumps(result)
            except (TypeError, ValueError):
                return str(result)
        return str(result)


def parse_call_string(text: str) -> tuple[str, list, dict]:
    """BFCL's ground-truth call string, e.g. "mv(source='a', destination='b')", -> (name, args, kwargs)."""
    node = ast.parse(text.strip(), mode="eval").body
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise ValueError(f"not a plain function call: {text}")
    args = [ast.literal_eval(a) for a in node.args]
    kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    return node.func.id, args, kwargs


def bfcl_checkers():
    """BFCL's own state and response checkers (pure functions over instances / result lists), or None."""
    try:
        from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import response_checker, state_checker
    except Exception:  # noqa: BLE001 - the package's import chain may need extras; fall back to call matching
        return None
    return state_checker, response_checker


def bfcl_calls(call_strings: list[str], docs: dict) -> list[dict]:
    """BFCL multi-turn ground truth ("cd(folder='x')") -> [{"name", "arguments"}] (positional args named from
    the function doc's parameter order)."""
    calls = []
    for text in call_strings:
        node = ast.parse(text, mode="eval").body
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
            raise DataError(f"not a function call: {text!r}")
        name = node.func.id
        params = list(((docs.get(name) or {}).get("parameters") or {}).get("properties") or {})
        args = {}
        for i, arg in enumerate(node.args):
            if i >= len(params):
                raise DataError(f"{text!r}: more positional arguments than {name} has parameters")
            args[params[i]] = ast.literal_eval(arg)
        for kw in node.keywords:
            args[kw.arg] = ast.literal_eval(kw.value)
        calls.append({"name": name, "arguments": args})
    return calls


# -- the task ------------------------------------------------------------------------------------------------
class BfclMultiTurn(base.Task):
    """BFCL multi-turn (multi_turn_base) in the registry: no step-data source and no per-step score. Its tasks are
    agent episodes (`load_tasks`), run against `Backend` and judged by BFCL's state and response checkers
    (`bfcl_checkers`) over a whole run, in `layerroute.serve.agent` and `layerroute.infer.session`."""

    name = "bfcl_multi_turn"
    scores = False

    def episodes(self, limit: int | None = 3, ids: list[str] | None = None) -> list[Task]:
        """The multi-turn tasks (`load_tasks`)."""
        return load_tasks(limit, ids)


TASKS = (BfclMultiTurn(),)
