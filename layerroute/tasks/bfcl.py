"""BFCL (the Berkeley Function Calling Leaderboard), single-turn: data from the installed bfcl-eval package.

`load_bfcl` reads the question and possible-answer files of each configured category; `bfcl_tool` /
`bfcl_schema` convert BFCL's function docs to OpenAI tool specs with JSON-schema parameters; `bfcl_gold_calls`
turns a possible answer into the gold assistant turn of a training step. Scoring: BFCL's AST checker is in
`layerroute.tasks.bfcl_ast` (kept apart for size; `check_tool_calls` and `CheckResult` are re-exported here);
`answer_to_calls` (below) makes the checker's concrete correct calls. The multi-turn tasks and their executor
are in `layerroute.tasks.bfcl_multi_turn`.

Two near-copies that differ, left as they are (unifying either would change the data or the scores):
`bfcl_gold_calls` vs `answer_to_calls` (the data's gold turn gives an argument its first real acceptable value,
optional or not, and leaves it out when it has none or, optional, when its schema forbids that value; the
checker's leaves optional arguments out unless the spec requires them, and raises when a needed argument has no
acceptable value), and `bfcl_schema` vs
`layerroute.infer.constrain.json_schema` (this one is strict: an unknown type name makes the row a `BadRow`; the
grammar's is lenient: any JSON Schema from an API client passes, with type lists and combinators). On BFCL's
function docs the two schemas agree (tests/test_constrain.py).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

from layerroute.data.config import BFCL_CATEGORIES, BFCL_DEFAULT_CATEGORIES, DataConfig, SourceConfig
from layerroute.data.records import BadRow, Conversation, Record, checked, jsonl_rows, shorten
from layerroute.data.render import TOOL_CALL
from layerroute.data.toolcalls import parse_tool_calls, to_openai_tool_calls
from layerroute.errors import ConfigError, DataError
from layerroute.tasks.base import Task
from layerroute.tasks.bfcl_ast import (
    _NESTED,
    _OPTIONAL,
    _TYPE_ALIASES,
    CheckResult,  # noqa: F401 - re-exported: BFCL's loading and scoring are imported from here
    _as_list,
    _expected_calls,
    check_tool_calls,
)


def bfcl_data_dir() -> str:
    """The `data/` folder of the installed bfcl-eval package, found without importing it."""
    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the bfcl source needs the bfcl-eval package: pip install --no-deps bfcl-eval")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


#: BFCL parameter types (Python, Java and JavaScript flavours) -> JSON schema types (None: any type).
BFCL_TYPE_MAP = {
    "string": "string",
    "integer": "integer",
    "float": "number",
    "number": "number",
    "boolean": "boolean",
    "array": "array",
    "tuple": "array",
    "dict": "object",
    "object": "object",
    "any": None,
    "": None,
    "String": "string",
    "char": "string",
    "long": "integer",
    "double": "number",
    "Boolean": "boolean",
    "Array": "array",
    "ArrayList": "array",
    "HashMap": "object",
}


def bfcl_schema(schema: Any) -> Any:
    """BFCL's parameter schema -> JSON schema (types mapped, BFCL's non-standard `optional` key dropped)."""
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k == "optional":
            continue
        if k == "type":
            if v not in BFCL_TYPE_MAP:
                raise ValueError(f"unknown BFCL type {v!r}")
            if BFCL_TYPE_MAP[v] is not None:
                out["type"] = BFCL_TYPE_MAP[v]
        elif k == "properties" and isinstance(v, dict):
            out[k] = {name: bfcl_schema(p) for name, p in v.items()}
        elif k in ("items", "additionalProperties") and isinstance(v, dict):
            out[k] = bfcl_schema(v)
        else:
            out[k] = v
    return out


def bfcl_tool(fn: dict) -> dict:
    """A BFCL function doc -> an OpenAI tool spec."""
    spec = {"name": fn["name"], "description": fn.get("description", "")}
    spec["parameters"] = bfcl_schema(fn.get("parameters") or {"type": "dict", "properties": {}})
    return {"type": "function", "function": spec}


def _first_acceptable(choices: Any) -> tuple[bool, Any]:
    """BFCL lists acceptable values per argument; '' means 'may be omitted'. (present?, first real value)."""
    if not isinstance(choices, list):
        return True, choices
    for c in choices:
        if c != "":
            return True, c
    return False, None


def _concrete_value(value: Any, schema: dict | None, within_schema: bool = False) -> Any:
    schema = schema or {}
    t = schema.get("type")
    if t in ("dict", "object", "HashMap") and isinstance(value, dict):
        return _concrete_args(value, schema.get("properties") or {}, frozenset(schema.get("required") or []),
                              within_schema)
    if t in ("array", "tuple", "Array", "ArrayList") and isinstance(value, list):
        items = schema.get("items") or {}
        if items.get("type") in ("dict", "object") and all(isinstance(v, dict) for v in value):
            return [_concrete_args(v, items.get("properties") or {}, frozenset(items.get("required") or []),
                                   within_schema) for v in value]
    return value


_PY_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "array": (list, tuple),
             "object": (dict,)}


def schema_forbids(value: Any, schema: Any) -> bool:
    """Whether a BFCL parameter schema forbids `value`: a type it is not (BFCL's type names mapped; a bool is no
    number), a value outside its enum, or (arrays) an item its `items` forbids. A narrow check, not a validator:
    what it passes the grammar may still refuse (tests/test_data_toolcalls.py walks every gold call through it)."""
    if not isinstance(schema, dict):
        return False
    t = schema.get("type")
    t = BFCL_TYPE_MAP.get(t, t) if isinstance(t, str) else None
    if t in _PY_TYPES and (not isinstance(value, _PY_TYPES[t]) or (isinstance(value, bool) and t != "boolean")):
        return True
    if isinstance(schema.get("enum"), list) and value not in schema["enum"]:
        return True
    if t == "array" and isinstance(schema.get("items"), dict):
        return any(schema_forbids(v, schema["items"]) for v in value)
    return False


def _concrete_args(possible: dict, props: dict, required: frozenset = frozenset(), within_schema: bool = False
                   ) -> dict:
    """{arg: [acceptable values]} -> {arg: value}: the first non-empty acceptable value; optional-only args omitted.
    within_schema: also omit an argument the answer marks optional ("" acceptable) and the schema does not require
    when that value is one its schema forbids (`schema_forbids`)."""
    out = {}
    for arg, choices in possible.items():
        present, v = _first_acceptable(choices)
        if not present:
            continue
        if (within_schema and arg not in required and _OPTIONAL in _as_list(choices)
                and schema_forbids(v, props.get(arg))):
            continue
        out[arg] = _concrete_value(v, props.get(arg), within_schema)
    if within_schema:  # the schema's own key order: the grammar (xgrammar) writes an object's keys in that order
        order = {k: i for i, k in enumerate(props)}
        out = dict(sorted(out.items(), key=lambda kv: order.get(kv[0], len(order))))
    return out


def bfcl_gold_calls(ground_truth: list[dict], functions: list[dict], *, within_schema: bool = True) -> list[dict]:
    """BFCL possible_answer ground truth -> one concrete call per entry, [{"name", "arguments"}].

    Each argument takes its first acceptable value. within_schema (the default since issue 36): an optional
    argument whose value its schema forbids (BFCL writes e.g. ``"unit": "N/A"`` outside the enum, ``null`` for a
    string) is left out, and the arguments (nested objects too) come in the order their schema lists them (the
    order the schema-constrained grammar writes), so the gold call is one the grammar allows; BFCL's checker
    accepts a missing argument the answer marks optional and any key order. False: the rendering before issue 36
    (adapters trained before it saw those values and the answer's key order)."""
    docs = {f["name"]: f for f in functions}
    calls = []
    for entry in ground_truth:
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ValueError(f"ground truth entry is not {{function: args}}: {shorten(entry, 80)}")
        ((name, possible),) = entry.items()
        if not isinstance(possible, dict):
            raise ValueError(f"ground truth for {name} is not an argument map")
        params = (docs.get(name) or {}).get("parameters") or {}
        props = params.get("properties") or {}
        required = frozenset(params.get("required") or [])
        calls.append({"name": name, "arguments": _concrete_args(possible, props, required, within_schema)})
    return calls


def _bfcl_file(folder: str, category: str) -> str | None:
    """The newest `BFCL_v<N>_<category>.json` (exact category: 'multiple' must not match 'live_multiple')."""
    pat = re.compile(rf"BFCL_v(\d+)_{re.escape(category)}\.json")
    found = [
        (int(m.group(1)), f)
        for f in glob.glob(os.path.join(folder, "BFCL_v*.json"))
        if (m := pat.fullmatch(os.path.basename(f)))
    ]
    return max(found)[1] if found else None


def bfcl_categories(src: SourceConfig) -> list[str]:
    """The categories a `bfcl` source reads: its `categories`, or the default single-turn Python/JSON ones."""
    return list(src.categories) if src.categories else list(BFCL_DEFAULT_CATEGORIES)


def load_bfcl(src: SourceConfig, cfg: DataConfig) -> Iterator[Record]:
    """BFCL single-turn categories: the question (+ its system turn), the functions as tools, and one gold
    assistant turn with the ground-truth calls. `limit` applies per category."""
    folder = src.path or bfcl_data_dir()
    for cat in bfcl_categories(src):
        qfile = _bfcl_file(folder, cat)
        afile = _bfcl_file(os.path.join(folder, "possible_answer"), cat)
        if qfile is None or afile is None:
            raise DataError(f"{src.source_label}: BFCL category {cat!r} not found under {folder!r}")
        answers: dict[str, Any] = {}
        with open(afile, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    a = json.loads(line)
                    answers[a["id"]] = a.get("ground_truth")
        for _, row in jsonl_rows(qfile, src.source_label, src.limit):
            if isinstance(row, BadRow):
                yield row
                continue
            yield bfcl_row(row, answers.get(row.get("id")), cat, src.source_label)


def bfcl_row(row: dict, ground_truth: Any, category: str, source: str) -> Record:
    bid = row.get("id", "?")
    row_id = f"bfcl:{bid}"
    question = row.get("question")
    if not isinstance(question, list) or len(question) != 1 or not isinstance(question[0], list):
        return BadRow(
            source, "bfcl_not_single_turn", f"{bid}: question has {len(question or [])} turns", row_id
        )
    if ground_truth is None:
        return BadRow(source, "bfcl_missing_ground_truth", f"{bid}: no possible_answer entry", row_id)
    functions = row.get("function") or []
    try:
        tools = [bfcl_tool(fn) for fn in functions]
        calls = bfcl_gold_calls(ground_truth, functions)
    except (ValueError, KeyError, TypeError) as e:
        return BadRow(source, "bfcl_unconvertible", f"{bid}: {e}", row_id)
    messages = [{"role": m.get("role"), "content": m.get("content")} for m in question[0]]
    messages.append({"role": "assistant", "content": "", "tool_calls": to_openai_tool_calls(calls)})
    meta = {"bfcl_id": bid, "possible_answer": ground_truth}
    return checked(Conversation(row_id, source, messages, tools, category=category, meta=meta))


def answer_to_calls(possible_answer: list[dict], function_specs: list[dict] | None = None) -> list[dict]:
    """One concrete correct call list from a BFCL possible answer, as ``[{"name", "arguments"}]``.

    Each argument takes its first acceptable value; an argument whose acceptable values include ``""``
    (optional) is left out, unless the spec lists it as required (BFCL's data marks a few required
    arguments optional, e.g. simple_python_17, and its checker then insists on them). With
    ``function_specs``, dict-typed arguments (and arrays of dicts), whose acceptable values are themselves
    ``{key: [acceptable values]}``, are made concrete the same way. Useful as a gold target, and to test the
    checker against BFCL's own answers. Raises ``DataError`` when an argument that must be given has no
    acceptable value at all (a few live_simple answers list ``[]``: no call can pass them).
    """
    specs = {s["name"]: s for s in function_specs or []}

    def concrete_dict(candidate: Any) -> Any:
        if not isinstance(candidate, Mapping):
            return candidate
        return {k: _first(_as_list(v), k) for k, v in candidate.items() if _OPTIONAL not in _as_list(v)}

    calls = []
    for name, params in _expected_calls(possible_answer):
        parameters = (specs.get(name) or {}).get("parameters") or {}
        properties = parameters.get("properties") or {}
        required = set(parameters.get("required") or [])
        arguments = {}
        for param, acceptable in params.items():
            acceptable = _as_list(acceptable)
            if _OPTIONAL in acceptable and param not in required:
                continue
            value = _first(acceptable, f"{name}.{param}")
            details = properties.get(param) or {}
            ptype = _TYPE_ALIASES.get(details.get("type"), details.get("type"))
            item_type = (
                (details.get("items") or {}).get("type")
                if isinstance(details.get("items"), Mapping)
                else None
            )
            if ptype == "dict":
                value = concrete_dict(value)
            elif (
                ptype in _NESTED
                and _TYPE_ALIASES.get(item_type, item_type) == "dict"
                and isinstance(value, list)
            ):
                value = [concrete_dict(v) for v in value]
            arguments[param] = value
        calls.append({"name": name, "arguments": arguments})
    return calls


def _first(acceptable: list, where: str) -> Any:
    for value in acceptable:
        if value != _OPTIONAL:
            return value
    raise DataError(f"possible answer gives {where} no acceptable value ({acceptable!r}): no call can pass")


# -- the task --------------------------------------------------------------------------------------------------
REASON_SPEC = "BFCL spec not checkable"


class Bfcl(Task):
    """BFCL single-turn: one tool-call step per question, scored by BFCL's AST checker; it also scores every
    tool-call step that names no scoring task (a chat's: no ground truth, wrong with that reason)."""

    name = "bfcl"
    loaders = {"bfcl": load_bfcl}
    takes_categories = True
    default_for = (TOOL_CALL,)

    def check_source(self, src, key: str) -> None:
        if src.categories is None:
            return
        if isinstance(src.categories, str) or not src.categories:
            raise ConfigError(f"{key}.categories: must be a non-empty list of BFCL category names")
        bad = [c for c in src.categories if c not in BFCL_CATEGORIES]
        if bad:
            raise ConfigError(
                f"{key}.categories: unsupported BFCL categories {bad}; supported: {', '.join(BFCL_CATEGORIES)} "
                "(irrelevance and multi-turn categories have no single gold assistant turn)"
            )

    def eval_only(self, conv, cfg) -> bool:
        """BFCL's categories in `data.bfcl_eval_only_categories` (live_*: functions never seen in training)."""
        return conv.category in set(cfg.bfcl_eval_only_categories)

    def score(self, step, text: str) -> tuple[bool, str | None]:
        answer = step.meta.get("possible_answer")
        functions = [t.get("function", t) for t in step.tools]  # OpenAI specs -> function docs
        if answer is None or not functions:
            return False, "no BFCL ground truth for this step"
        # bare_json: a call written without its <tool_call> wrapper (Qwen2.5-Coder's native form) still counts
        calls, _, error = parse_tool_calls(text, bare_json=True)
        if error or not calls:
            return False, f"unparsable tool call: {error or 'no call'}"
        try:
            result = check_tool_calls(calls, functions, answer, step.category or "simple_python")
        except DataError as err:  # a spec BFCL's checker cannot read (e.g. a parameter without a type: one
            # live_multiple function has one): wrong in every configuration alike, counted under its own reason
            return False, f"{REASON_SPEC}: {err}"
        return result.valid, result.error


TASKS = (Bfcl(),)
