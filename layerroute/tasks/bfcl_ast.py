"""BFCL's AST checker: is a generated tool call list one of the possible answers? (Python categories)

The ``bfcl-eval`` package's checker (``bfcl_eval/eval_checker/ast_eval/ast_checker.py``) cannot be
imported here: it imports ``bfcl_eval.constants.model_config``, which imports every API client BFCL
supports (anthropic, openai, ...), none of which this project installs. So this module re-implements the
Python-language part of that file, bfcl-eval's ``ast_checker`` as of the BFCL_v4 data, rule for rule:

* Category: ``parallel`` in the name -> calls matched to the expected calls in any order (greedily, each
  expected call takes the first unmatched call that passes); else ``multiple`` in the name -> one call,
  checked against the function the answer names; else (simple) exactly one call, checked against the
  first function spec.
* A call passes when: its name is the function's name; every ``required`` parameter is present; every
  parameter it passes is both in the spec and in the possible answer; each value has the spec's type
  (``PYTHON_TYPE_MAPPING``: string/any -> str, integer -> int, float -> float, boolean -> bool,
  array/tuple -> list, dict -> dict; exact ``type()`` match, so a bool is not an int; an int is accepted
  for a float; one level of item-type checking for arrays); and the value is among the acceptable values:
  strings compared after removing `` ,./-_*^``, lower-casing and turning ``'`` into ``"``; lists compared
  element-wise with the same string rule; dicts key by key against each acceptable dict (keys whose
  acceptable list holds ``""`` may be left out); lists of dicts dict by dict in order; other values by
  ``==``. Every parameter in the possible answer that the call leaves out must list ``""`` (optional).
* "Variables": when the possible answer's values have a different type from the spec's (BFCL writes a
  variable name as a string there), a value of the answer's type passes the type check and is then
  compared with ``==``.

Deliberate differences, none of which changes a verdict on BFCL's own data: a malformed generation (no
calls, a call without a name, arguments that are not an object or a JSON object string) is scored wrong
with a reason instead of raising; a spec without ``required`` means none required; an array spec without
``items`` gets no item-type check (BFCL raises ``KeyError``); the JSON-schema type names ``number``,
``object``, ``bool``, ``list``, ``str``, ``int`` are read as their BFCL equivalents (BFCL raises
``KeyError``); function names are compared exactly (BFCL rewrites ``.`` to ``_`` for API models that
cannot emit dots; a local model emits the name it was shown). Java and JavaScript categories, relevance
and multi-turn categories are not supported (``ConfigError``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from layerroute.errors import ConfigError, DataError

__all__ = [
    "CheckResult",
    "check_tool_calls",
]


@dataclass(frozen=True)
class CheckResult:
    """Verdict on one generation. ``error`` says why it failed; ``error_type`` is BFCL's error category."""

    valid: bool
    error: str | None = None
    error_type: str | None = None


_OK = CheckResult(True)


def _fail(error_type: str, error: str) -> CheckResult:
    return CheckResult(False, error, error_type)


# ---------------------------------------------------------------------------------------------------------
# BFCL AST checker (Python). Follows bfcl_eval/eval_checker/ast_eval/ast_checker.py.
# ---------------------------------------------------------------------------------------------------------

# BFCL's PYTHON_TYPE_MAPPING: "any" is checked as a string, "tuple" as a list (JSON has no tuples).
_PYTHON_TYPES: dict[str, type] = {
    "string": str,
    "integer": int,
    "float": float,
    "boolean": bool,
    "array": list,
    "tuple": list,
    "dict": dict,
    "any": str,
}
# JSON-schema spellings found in non-BFCL tool specs; BFCL itself would raise KeyError on them.
_TYPE_ALIASES = {
    "number": "float",
    "object": "dict",
    "bool": "boolean",
    "list": "array",
    "str": "string",
    "int": "integer",
}
_NESTED = ("array", "tuple")  # the types whose items BFCL type-checks (one level deep)
_OPTIONAL = ""  # in a possible answer, "" among the acceptable values means "may be left out"


@dataclass(frozen=True)
class _ParamType:
    name: str  # BFCL type name after aliasing, e.g. "float"
    py: type  # the Python type a value must have
    item: type | None  # for array/tuple with an item type: the items' Python type


def _type_name(raw: Any, where: str) -> str:
    name = _TYPE_ALIASES.get(raw, raw) if isinstance(raw, str) else None
    if name not in _PYTHON_TYPES:
        raise DataError(
            f"{where}: type {raw!r} is not one BFCL's Python checker knows ({sorted(_PYTHON_TYPES)})"
        )
    return name


def _param_type(details: Any, where: str) -> _ParamType:
    if not isinstance(details, Mapping):
        raise DataError(f"{where}: the parameter spec must be an object, got {details!r}")
    name = _type_name(details.get("type"), where)
    item = None
    if name in _NESTED and isinstance(details.get("items"), Mapping) and "type" in details["items"]:
        item = _PYTHON_TYPES[_type_name(details["items"]["type"], where + " items")]
    return _ParamType(name, _PYTHON_TYPES[name], item)


def _standardize(text: str) -> str:
    """BFCL's string normalisation: 'April 1, 2024' == 'april 1 2024'; quotes unified."""
    return re.sub(r"[ ,./\-_*^]", "", text).lower().replace("'", '"')


def _answer_type(acceptable: Sequence) -> type | None:
    """Type of the first acceptable value that is not the optional marker (BFCL: get_possible_answer_type)."""
    for value in acceptable:
        if value != _OPTIONAL:
            return type(value)
    return None


def _check_type(
    param: str, value: Any, acceptable: Sequence, expected: type, item: type | None, type_desc: str
) -> tuple[CheckResult, bool]:
    """(verdict, is_variable). BFCL: type_checker.

    A value of the spec's type passes (arrays: every item of the item type, judged against some acceptable
    list). Otherwise a value of the possible answer's type passes as a "variable".
    """
    answer_type = _answer_type(acceptable)
    is_variable = answer_type is not None and answer_type is not expected
    if type(value) is expected:
        if item is None:
            return _OK, is_variable
        for candidate in acceptable:
            # A candidate that is not a list (e.g. the optional marker) imposes nothing on the items.
            if type(candidate) is not list or all(
                _check_type(param, v, candidate, item, None, item.__name__)[0].valid for v in value
            ):
                return _OK, is_variable
        return _fail(
            "type_error:nested",
            f"Nested type checking failed for parameter {param!r}. Expected outer type {type_desc} with "
            f"inner type {item.__name__}. Parameter value: {value!r}.",
        ), is_variable
    if answer_type is not None and type(value) is answer_type:
        return _OK, True
    return _fail(
        "type_error:simple",
        f"Incorrect type for parameter {param!r}. Expected type {type_desc}, got {type(value).__name__}. "
        f"Parameter value: {value!r}.",
    ), is_variable


def _std_if_str(value: Any) -> Any:
    return _standardize(value) if type(value) is str else value


def _as_list(acceptable: Any) -> list:
    return acceptable if isinstance(acceptable, list) else [acceptable]


def _check_string(param: str, value: str, acceptable: Sequence) -> CheckResult:
    if _standardize(value) in [_standardize(a) for a in acceptable if type(a) is str]:
        return _OK
    return _fail(
        "value_error:string",
        f"Invalid value for parameter {param!r}: {value!r}. Expected one of {acceptable}. Case insensitive.",
    )


def _check_list(param: str, value: list, acceptable: Sequence) -> CheckResult:
    got = [_std_if_str(v) for v in value]
    # BFCL iterates each candidate by index, so the optional marker "" acts as an empty list.
    candidates = [[_std_if_str(v) for v in a] for a in acceptable if a == _OPTIONAL or type(a) is list]
    if got in candidates:
        return _OK
    return _fail(
        "value_error:list/tuple",
        f"Invalid value for parameter {param!r}: {value!r}. Expected one of {acceptable}.",
    )


def _check_dict(param: str, value: Any, acceptable: Sequence) -> CheckResult:
    """The value must fit one acceptable dict: known keys, acceptable values, no required key missing."""
    result = _fail("dict_checker:unclear", f"No acceptable dict for parameter {param!r}: {value!r}.")
    if not isinstance(value, dict):
        return _fail("value_error:dict_value", f"Parameter {param!r}: expected a dict, got {value!r}.")
    for candidate in acceptable:
        if candidate == _OPTIONAL:
            continue
        if not isinstance(candidate, Mapping):
            continue
        result = _OK
        for key, v in value.items():
            if key not in candidate:
                result = _fail("value_error:dict_key", f"Unexpected dict key parameter: {key!r}.")
                break
            allowed = [_std_if_str(a) for a in _as_list(candidate[key])]
            if _std_if_str(v) not in allowed:
                result = _fail(
                    "value_error:dict_value",
                    f"Invalid value for parameter {key!r}: {v!r}. Expected one of {allowed}.",
                )
                break
        if result.valid:
            for key, allowed in candidate.items():
                if key not in value and _OPTIONAL not in _as_list(allowed):
                    result = _fail("value_error:dict_key", f"Missing dict key parameter: {key!r}.")
                    break
        if result.valid:
            return _OK
    return result


def _check_list_of_dicts(param: str, value: list, acceptable: Sequence) -> CheckResult:
    """Same length as an acceptable list, and each dict fits the acceptable dict at its position."""
    result = _fail("list_dict_checker:unclear", f"No acceptable list of dicts for parameter {param!r}.")
    for candidate in acceptable:
        if candidate == _OPTIONAL:
            candidate = []  # BFCL compares lengths, and len("") == 0
        if not isinstance(candidate, list) or len(candidate) != len(value):
            result = _fail("value_error:list_dict_count", "Wrong number of dictionaries in the list.")
            continue
        result = _OK  # two empty lists match
        for got, want in zip(value, candidate, strict=True):
            result = _check_dict(param, got, [want])
            if not result.valid:
                break
        if result.valid:
            return _OK
    return result


def _check_one_call(spec: Mapping, name: str, args: Mapping, answer: Mapping) -> CheckResult:
    """One call against one function spec and that function's acceptable arguments.

    BFCL: simple_function_checker (Python branch).
    """
    func_name = spec["name"]
    if name != func_name:
        return _fail(
            "simple_function_checker:wrong_func_name",
            f"Function name {func_name!r} not found in model output (got {name!r}).",
        )
    parameters = spec.get("parameters") or {}
    properties = parameters.get("properties") or {}
    for param in parameters.get("required") or []:
        if param not in args:
            return _fail(
                "simple_function_checker:missing_required", f"Missing required parameter: {param!r}."
            )

    for param, value in args.items():
        if param not in properties or param not in answer:
            return _fail("simple_function_checker:unexpected_param", f"Unexpected parameter: {param!r}.")
        acceptable = _as_list(answer[param])
        ptype = _param_type(properties[param], f"function {func_name!r} parameter {param!r}")
        if ptype.name == "tuple" and type(value) is tuple:
            value = list(value)
        if ptype.name == "float" and type(value) is int:  # Python would accept an int for a float
            value = float(value)

        verdict, is_variable = _check_type(param, value, acceptable, ptype.py, ptype.item, ptype.name)
        if not verdict.valid:
            return verdict
        if not is_variable:
            if ptype.py is dict:
                verdict = _check_dict(param, value, acceptable)
            elif ptype.py is list and ptype.item is dict:
                verdict = _check_list_of_dicts(param, value, acceptable)
            elif ptype.py is str:
                verdict = _check_string(param, value, acceptable)
            elif ptype.py is list:
                verdict = _check_list(param, value, acceptable)
            else:
                verdict = None
            if verdict is not None:
                if not verdict.valid:
                    return verdict
                continue
        if value not in acceptable:
            return _fail(
                "value_error:others",
                f"Invalid value for parameter {param!r}: {value!r}. Expected one of {acceptable}.",
            )

    for param, acceptable in answer.items():
        if param not in args and _OPTIONAL not in _as_list(acceptable):
            return _fail(
                "simple_function_checker:missing_optional",
                f"Optional parameter {param!r} not provided and not marked as optional.",
            )
    return _OK


def _normalize_calls(calls: Any) -> list[tuple[str, dict]] | CheckResult:
    """Parsed calls as (name, arguments) pairs, or a failed CheckResult saying what is malformed.

    Accepts ``{"name": ..., "arguments": {...}}`` (arguments may be a JSON object string) and the OpenAI
    ``{"type": "function", "function": {"name": ..., "arguments": ...}}`` shape.
    """
    if calls is None:
        return _fail("ast_decoder:decoder_failed", "No tool call could be parsed from the generation.")
    if isinstance(calls, (str, bytes, Mapping)) or not isinstance(calls, Sequence):
        return _fail(
            "ast_decoder:decoder_wrong_output_format",
            f"Expected a list of calls, got {type(calls).__name__}.",
        )
    out = []
    for i, call in enumerate(calls):
        if isinstance(call, Mapping) and "name" not in call and isinstance(call.get("function"), Mapping):
            call = call["function"]
        if not isinstance(call, Mapping) or not isinstance(call.get("name"), str):
            return _fail(
                "ast_decoder:decoder_wrong_output_format", f"Call {i} has no function name: {call!r}."
            )
        args = call.get("arguments", {})
        if args is None:
            args = {}
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError as exc:
                return _fail("ast_decoder:decoder_failed", f"Call {i} arguments are not valid JSON: {exc}.")
        if not isinstance(args, Mapping) or not all(isinstance(k, str) for k in args):
            return _fail(
                "ast_decoder:decoder_wrong_output_format",
                f"Call {i} arguments are not an object with string keys: {args!r}.",
            )
        out.append((call["name"], dict(args)))
    return out


def _expected_calls(possible_answer: Any) -> list[tuple[str, Mapping]]:
    if not isinstance(possible_answer, Sequence) or isinstance(possible_answer, (str, bytes)):
        raise DataError(
            f"possible_answer must be a list of {{function: {{arg: [values]}}}}, got {possible_answer!r}"
        )
    expected = []
    for item in possible_answer:
        if not isinstance(item, Mapping) or len(item) != 1:
            raise DataError(f"possible_answer entries must have exactly one function name: {item!r}")
        ((name, params),) = item.items()
        if not isinstance(params, Mapping):
            raise DataError(
                f"possible_answer for {name!r} must map arguments to acceptable values: {params!r}"
            )
        expected.append((name, params))
    return expected


def _find_spec(specs: Sequence[Mapping], name: str) -> Mapping:
    for spec in specs:
        if spec.get("name") == name:
            return spec
    raise DataError(
        f"possible answer names function {name!r}, which is not among the function specs "
        f"{[s.get('name') for s in specs]}"
    )


def _category_kind(category: str) -> str:
    c = category.lower()
    if "java" in c:  # java and javascript
        raise ConfigError(f"category {category!r}: only BFCL's Python-language AST checking is implemented")
    if any(word in c for word in ("relevance", "multi_turn", "memory", "web_search", "format_sensitivity")):
        raise ConfigError(f"category {category!r} is not scored by BFCL's AST checker")
    if "parallel" in c:
        return "parallel"
    if "multiple" in c:
        return "multiple"
    return "simple"


def check_tool_calls(
    calls: list[dict] | None,
    function_specs: list[dict],
    possible_answer: list[dict],
    category: str,
) -> CheckResult:
    """Score parsed tool calls the way BFCL's AST checker does (see the module docstring).

    calls: ``[{"name": str, "arguments": dict | json-str}, ...]`` parsed from the generation, or None when
        nothing could be parsed. Anything malformed here is scored wrong, never raised.
    function_specs: BFCL function docs (``name``, ``parameters.properties``, ``parameters.required``).
    possible_answer: BFCL ground truth, ``[{"func_name": {"arg": [acceptable values, "" = optional]}}]``.
    category: BFCL test category (``simple_python``, ``live_simple``, ``multiple``, ``parallel``,
        ``parallel_multiple``, ``live_multiple``, ...); it selects simple / multiple / parallel matching.

    Raises ``DataError`` for a malformed spec or possible answer and ``ConfigError`` for an unsupported
    category: those are bugs in the evaluation data, not in the generation.
    """
    kind = _category_kind(category)
    expected = _expected_calls(possible_answer)
    specs = list(function_specs)
    if not specs or not all(isinstance(s, Mapping) and "name" in s for s in specs):
        raise DataError(f"function_specs must be a non-empty list of BFCL function docs: {function_specs!r}")
    if kind == "simple":
        targets = [specs[0]]  # BFCL checks a simple entry against its first (only) function
    else:
        targets = [_find_spec(specs, name) for name, _ in expected]
    # Validate the types of the functions the verdict can depend on up front, so that a bad spec raises
    # whatever the generation is (the other functions' specs never matter to the verdict).
    for spec in {id(s): s for s in targets}.values():
        for param, details in ((spec.get("parameters") or {}).get("properties") or {}).items():
            _param_type(details, f"function {spec['name']!r} parameter {param!r}")

    parsed = _normalize_calls(calls)
    if isinstance(parsed, CheckResult):
        return parsed
    if len(parsed) != len(expected):
        checker = {
            "simple": "simple_function_checker",
            "multiple": "multiple_function_checker",
            "parallel": "parallel_function_checker_no_order",
        }[kind]
        return _fail(
            f"{checker}:wrong_count",
            f"Wrong number of functions: expected {len(expected)}, got {len(parsed)}.",
        )

    if kind in ("simple", "multiple"):
        name, args = parsed[0]
        return _check_one_call(targets[0], name, args, expected[0][1])

    # Parallel: each expected call takes the first still-unmatched call that passes (BFCL's greedy order).
    matched: set[int] = set()
    for i, ((want_name, answer), spec) in enumerate(zip(expected, targets, strict=True)):
        errors = []
        for j, (name, args) in enumerate(parsed):
            if j in matched:
                continue
            verdict = _check_one_call(spec, name, args, answer)
            if verdict.valid:
                matched.add(j)
                break
            errors.append(f"call {j}: {verdict.error}")
        else:
            return _fail(
                "parallel_function_checker_no_order:cannot_find_match",
                f"No call matches expected call {i} ({want_name!r}). " + " | ".join(errors),
            )
    return _OK
