"""Parse and render tool calls written into assistant text.

Used on dataset rows, on model generations at evaluation time and in a server, so nothing here raises on
malformed input: parsing returns an error string instead.

Accepted forms:

* Hermes/Qwen: ``<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`` (one block per call). The
  body may be JSON or a Python literal (single quotes, True/False/None), as some Hermes rows are; the keys
  may come in either order; ``parameters`` is accepted for ``arguments``.
* Glaive: ``<functioncall> {"name": "f", "arguments": '{"a": 1}'}`` up to ``<|endoftext|>`` or the end of the
  text, where the arguments are usually a JSON object written as a single-quoted string.
* Bare JSON, only when asked (``bare_json=True``): a text that is nothing but one call object
  ``{"name": "f", "arguments": {...}}`` (or several, one per line), as Qwen2.5-Coder-0.5B-Instruct writes its calls
  without the wrapper. Off by default: a dataset row or a planning answer that happens to be JSON is not a call.
  Scoring turns it on for steps that are scored as tool calls, so that the base model's native form counts.

Rendering always produces the Hermes form, byte-identical to what Qwen2.5's chat template writes for a
structured call (``json.dumps`` with ``ensure_ascii=False``, as transformers' ``tojson`` filter).
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from typing import Any

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
FUNCTIONCALL = "<functioncall>"
GLAIVE_END = "<|endoftext|>"

_TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_FUNCTIONCALL_RE = re.compile(r"<functioncall>(.*?)(?:<\|endoftext\|>|$)", re.DOTALL)


@dataclass
class ParsedCalls:
    """The full parse result: calls, the text around them, the first error, and the repairs made."""

    calls: list[dict] = field(default_factory=list)
    """Each call as {"name": str, "arguments": dict}."""
    remaining_text: str = ""
    """The text with the call blocks removed, stripped."""
    error: str | None = None
    """Why the text could not be parsed (reason:detail), or None."""
    repairs: list[str] = field(default_factory=list)
    """Non-standard forms that were accepted: 'python_literal_call', 'string_encoded_arguments', ..."""
    cut: str = ""
    """With ``cut=True``: the unclosed call the text ended in, left out of the calls and the remaining text."""


_NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


def _literal(node: ast.AST) -> Any:
    """Evaluate a JSON-or-Python literal expression tree (no names other than true/false/null/None)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool, type(None))):
        return node.value
    if isinstance(node, ast.Name) and node.id in _NAMES:
        return _NAMES[node.id]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError("dict unpacking is not a literal")
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values, strict=True)}
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _literal(node.operand)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return -v if isinstance(node.op, ast.USub) else v
    raise ValueError(f"not a literal: {type(node).__name__}")


def loads_lenient(text: str) -> tuple[Any, bool]:
    """Parse JSON, or failing that a Python literal (single quotes, True/None, tuples).

    Returns (value, was_python_literal). Raises ValueError when neither parses.
    """
    text = text.strip()
    try:
        return json.loads(text), False
    except (json.JSONDecodeError, RecursionError):
        pass
    try:
        return _literal(ast.parse(text, mode="eval").body), True
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise ValueError(str(e)) from None


def _short(text: str, n: int = 80) -> str:
    text = text.strip().replace("\n", "\\n")
    return text if len(text) <= n else text[: n - 3] + "..."


def _call_from_body(body: str, repairs: list[str]) -> tuple[dict | None, str | None]:
    try:
        obj, was_literal = loads_lenient(body)
    except ValueError:
        return None, f"tool_call_invalid_json: {_short(body)}"
    if was_literal:
        repairs.append("python_literal_call")
    if not isinstance(obj, dict):
        return None, f"tool_call_not_object: {_short(body)}"
    if "function" in obj and isinstance(obj["function"], dict):  # {"type": "function", "function": {...}}
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return None, f"tool_call_missing_name: {_short(body)}"
    if "arguments" in obj:
        args = obj["arguments"]
    elif "parameters" in obj:
        args = obj["parameters"]
    else:
        args = {}
    if isinstance(args, str):
        if not args.strip():
            args = {}
        else:
            try:
                args, was_literal = loads_lenient(args)
            except ValueError:
                return (
                    None,
                    f"tool_call_arguments_invalid_json: {_short(obj['arguments'] if 'arguments' in obj else args)}",
                )
            repairs.append("string_encoded_arguments")
            if was_literal:
                repairs.append("python_literal_arguments")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return None, f"tool_call_arguments_not_object: {_short(str(args))}"
    return {"name": name.strip(), "arguments": args}, None


def _take_calls(text: str, pattern: re.Pattern, out: ParsedCalls) -> tuple[str, str]:
    """Parse every `pattern` match's body into out.calls (first error kept in out.error).

    Returns (the text between the matches, the text after the last match)."""
    pieces: list[str] = []
    pos = 0
    while (m := pattern.search(text, pos)) is not None:
        pieces.append(text[pos : m.start()])
        pos = m.end()
        call, err = _call_from_body(m.group(1), out.repairs)
        if err is not None and pattern is _TOOL_CALL_RE:
            # a JSON string may hold the closing tag itself (a schema-constrained call can write any text in a
            # string): take the whole JSON object that starts the body, if a closing tag follows it
            longer = _json_body(text, m.start(1))
            if longer is not None:
                call2, err2 = _call_from_body(text[m.start(1) : longer[0]], out.repairs)
                if err2 is None:
                    call, err, pos = call2, None, longer[1]
        if err is not None:
            out.error = out.error or err
            continue
        out.calls.append(call)
    return "".join(pieces), text[pos:]


def _json_body(text: str, start: int) -> tuple[int, int] | None:
    """(end of the body, end of its closing tag) when `text[start:]` opens with one JSON object followed by
    TOOL_CALL_CLOSE (whitespace around allowed); None otherwise."""
    i = start
    while i < len(text) and text[i].isspace():
        i += 1
    try:
        _, end = json.JSONDecoder().raw_decode(text, i)
    except ValueError:
        return None
    j = end
    while j < len(text) and text[j].isspace():
        j += 1
    return (j, j + len(TOOL_CALL_CLOSE)) if text.startswith(TOOL_CALL_CLOSE, j) else None


def _bare_json_calls(text: str, out: ParsedCalls) -> bool:
    """Fill out.calls from a text that is only call objects (one JSON object, or one per line); else False."""
    text = text.strip()
    if not text.startswith("{"):
        return False
    try:  # one object (possibly pretty-printed over several lines), else one object per line
        loads_lenient(text)
        bodies = [text]
    except ValueError:
        bodies = [line for line in text.splitlines() if line.strip()]
    calls = []
    for body in bodies:
        try:
            obj, _ = loads_lenient(body)
        except ValueError:
            return False
        if not isinstance(obj, dict) or set(obj) != {"name", "arguments"} or not isinstance(obj["arguments"], dict):
            return False  # only the exact call shape: any other JSON is an answer, not a call
        call, err = _call_from_body(body, [])
        if err is not None:
            return False
        calls.append(call)
    out.calls, out.remaining_text = calls, ""
    out.repairs.append("bare_json_call")
    return True


def parse_tool_calls_detailed(text: str, *, bare_json: bool = False, cut: bool = False) -> ParsedCalls:
    """Parse every tool call in `text`; see the module docstring for the accepted forms.

    cut: the text was cut by a token budget, so a call it opens and does not close is the one the budget cut:
    it is left out (in `ParsedCalls.cut`) and the calls before it stand. Without it an unclosed call is an
    error that voids every call (a complete text that opens a call and never closes it is malformed)."""
    out = ParsedCalls()
    if not isinstance(text, str):
        out.error = f"tool_call_not_text: {type(text).__name__}"
        return out
    before, rest = _take_calls(text, _TOOL_CALL_RE, out)
    if TOOL_CALL_OPEN in rest:  # an opening tag without its closing tag: a truncated generation or row
        i = rest.index(TOOL_CALL_OPEN)
        if cut:
            out.cut = rest[i:]
        else:
            out.error = out.error or f"tool_call_unclosed: {_short(rest[i:])}"
        rest = rest[:i]
    text_wo = before + rest

    if FUNCTIONCALL in text_wo:
        before, rest = _take_calls(text_wo, _FUNCTIONCALL_RE, out)
        text_wo = before + rest

    out.remaining_text = text_wo.replace(GLAIVE_END, "").strip()
    if out.error is not None:
        out.calls = []
    elif bare_json and not out.calls:
        _bare_json_calls(out.remaining_text, out)
    return out


def parse_tool_calls(text: str, *, bare_json: bool = False, cut: bool = False) -> tuple[list[dict], str, str | None]:
    """Parse tool calls from assistant text.

    Returns (calls, remaining_text, error): calls as [{"name": str, "arguments": dict}], the text with the call
    blocks removed, and None or a reason string such as "tool_call_invalid_json: ..." (then calls is []).
    cut: the text was cut by a token budget (see `parse_tool_calls_detailed`). Never raises on malformed input.
    """
    r = parse_tool_calls_detailed(text, bare_json=bare_json, cut=cut)
    return r.calls, r.remaining_text, r.error


def render_tool_call(name: str, arguments: dict) -> str:
    """One call in the Hermes/Qwen2.5 form (what Qwen2.5's template writes for a structured call)."""
    return (
        TOOL_CALL_OPEN
        + "\n"
        + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
        + "\n"
        + TOOL_CALL_CLOSE
    )


def render_tool_calls(calls: list[dict]) -> str:
    """Render calls ({"name", "arguments"} or OpenAI {"type": "function", "function": {...}}) joined by newlines."""
    out = []
    for c in calls:
        if "function" in c and isinstance(c["function"], dict):
            c = c["function"]
        args = c.get("arguments") or {}
        if isinstance(args, str):
            args = json.loads(args)
        out.append(render_tool_call(c["name"], args))
    return "\n".join(out)


def to_openai_tool_calls(calls: list[dict]) -> list[dict]:
    """[{"name", "arguments"}] -> the structured `tool_calls` field of an assistant message."""
    return [{"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]


def from_openai_tool_calls(tool_calls: list[dict]) -> list[dict]:
    """The structured `tool_calls` field -> [{"name", "arguments"}] (arguments as dict)."""
    out = []
    for tc in tool_calls:
        f = tc.get("function", tc)
        args = f.get("arguments") or {}
        if isinstance(args, str):
            args = json.loads(args) if args.strip() else {}
        out.append({"name": f["name"], "arguments": args})
    return out
