"""The OpenAI chat-completions request schema and error shapes.

Validation turns a request's ``messages``, ``tools`` and ``tool_choice`` into the renderer's form, or refuses it with
an `ApiError`: a 4xx answered in the API's shape, ``{"error": {"message", "type", "param", "code"}}``. Anything
unexpected is answered 500 in the same shape (`_internal_error`).
"""

import json
from typing import Any

from ..data.toolcalls import TOOL_CALL_OPEN

ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"developer": "system"}  # newer OpenAI clients send "developer" for system instructions


# -- errors --------------------------------------------------------------------------------------------------
class ApiError(Exception):
    """A request the server refuses, answered in the OpenAI error shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers  # e.g. Retry-After on a 429

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _type_name(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number" if isinstance(v, int | float) else type(v).__name__
    )


def _expect(payload: dict, key: str, kinds: tuple, what: str, optional: bool = True):
    """payload[key] if it has one of `kinds` (bool is never accepted as a number), else a 400 naming it."""
    if key not in payload or payload[key] is None:
        if optional:
            return None
        raise _bad(f"'{key}' is required", param=key, code="missing_required_parameter")
    v = payload[key]
    is_bool = isinstance(v, bool)
    ok = isinstance(v, kinds) and not (is_bool and bool not in kinds)
    if not ok:
        raise _bad(f"'{key}' must be {what}, got {_type_name(v)}: {json.dumps(v)[:60]}", param=key,
                   code="invalid_type")
    return v


# -- request parsing -----------------------------------------------------------------------------------------
def _text_content(content: Any, where: str) -> str:
    """Message content: a string, null, or a list of text parts (joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else _type_name(part)
                raise _bad(f"{where}.content[{j}]: only text content parts are supported, got {kind!r}",
                           param=f"{where}.content", code="invalid_type")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(f"{where}.content must be a string or a list of text parts, got {_type_name(content)}",
               param=f"{where}.content", code="invalid_type")


def _arguments(raw: Any, where: str) -> dict:
    if isinstance(raw, dict):
        return raw
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return {}
    if isinstance(raw, str):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as e:
            raise _bad(f"{where}.function.arguments is not valid JSON: {e}", param=f"{where}.function.arguments",
                       code="invalid_type") from None
        if isinstance(value, dict):
            return value
    raise _bad(f"{where}.function.arguments must be a JSON object (as a string)", param=f"{where}.function.arguments",
               code="invalid_type")


def parse_messages(raw: Any) -> list[dict]:
    """OpenAI messages -> the renderer's form (text content, structured tool calls with dict arguments)."""
    if raw is None:
        raise _bad("'messages' is required", param="messages", code="missing_required_parameter")
    if not isinstance(raw, list):
        raise _bad(f"'messages' must be an array, got {_type_name(raw)}", param="messages", code="invalid_type")
    if not raw:
        raise _bad("'messages' must contain at least one message", param="messages", code="empty_array")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{where} must be an object, got {_type_name(m)}", param=where, code="invalid_type")
        role = m.get("role")
        if not isinstance(role, str):
            raise _bad(f"{where}.role is required (a string)", param=f"{where}.role", code="invalid_type")
        role = ROLE_ALIASES.get(role, role)
        if role not in ROLES:
            raise _bad(f"{where}.role {m.get('role')!r} is not one of {', '.join(ROLES)} (or developer)",
                       param=f"{where}.role", code="invalid_value")
        msg = {"role": role, "content": _text_content(m.get("content"), where)}
        if role == "assistant" and m.get("tool_calls"):
            calls = m["tool_calls"]
            if not isinstance(calls, list):
                raise _bad(f"{where}.tool_calls must be an array", param=f"{where}.tool_calls", code="invalid_type")
            structured = []
            for j, tc in enumerate(calls):
                w = f"{where}.tool_calls[{j}]"
                fn = tc.get("function") if isinstance(tc, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                    raise _bad(f"{w} needs function.name", param=w, code="invalid_type")
                structured.append({"type": "function",
                                   "function": {"name": fn["name"], "arguments": _arguments(fn.get("arguments"), w)}})
            msg["tool_calls"] = structured
        elif role == "tool":  # the OpenAI API requires the id of the call a tool result answers
            tid = m.get("tool_call_id")
            if tid is None:
                raise _bad(f"{where}.tool_call_id is required for a message with role 'tool'",
                           param=f"{where}.tool_call_id", code="missing_required_parameter")
            if not isinstance(tid, str) or not tid:
                raise _bad(f"{where}.tool_call_id must be a non-empty string", param=f"{where}.tool_call_id",
                           code="invalid_type")
        out.append(msg)
    return out


def parse_tools(raw: Any) -> list[dict]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _bad(f"'tools' must be an array, got {_type_name(raw)}", param="tools", code="invalid_type")
    out = []
    for i, t in enumerate(raw):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise _bad(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", param=f"tools[{i}]",
                       code="invalid_type")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _bad(f"tools[{i}].function.name is required", param=f"tools[{i}].function.name",
                       code="invalid_type")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise _bad(f"tools[{i}].function.parameters must be an object", param=f"tools[{i}].function.parameters",
                       code="invalid_type")
        out.append({"type": "function", "function": fn})
    return out


def tool_choice_prefix(choice: Any, tools: list[dict]) -> tuple[str, bool]:
    """(text that starts the assistant turn, whether tools are shown). Raises ApiError on a bad choice."""
    if choice is None or choice == "auto":
        return "", True
    if choice == "none":
        return "", False
    if not tools:
        raise _bad("'tool_choice' is only allowed when 'tools' are specified", param="tool_choice")
    if choice == "required":
        return TOOL_CALL_OPEN + '\n{"name": "', True
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        names = [t["function"]["name"] for t in tools]
        if name not in names:
            raise _bad(f"tool_choice names function {name!r}, which is not in tools ({', '.join(names)})",
                       param="tool_choice", code="invalid_value")
        return TOOL_CALL_OPEN + "\n" + json.dumps({"name": name})[:-1] + ', "arguments": ', True
    raise _bad("'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
               param="tool_choice", code="invalid_value")


def _reject_unsupported(payload: dict) -> None:
    n = _expect(payload, "n", (int,), "an integer")
    if n is not None and n != 1:
        raise _bad("only n=1 is supported", param="n", code="unsupported_value")
    if payload.get("logprobs"):
        raise _bad("logprobs are not supported", param="logprobs", code="unsupported_value")
    # frequency/presence penalties, logit_bias, user, metadata... are accepted and ignored


# -- error responses -----------------------------------------------------------------------------------------
def _error_response(err: ApiError):
    from fastapi.responses import JSONResponse

    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _internal_error_body(exc: BaseException) -> dict:
    return {"error": {"message": f"internal error: {type(exc).__name__}: {exc}", "type": "server_error",
                      "param": None, "code": "internal_error"}}


def _internal_error(exc: BaseException):
    from fastapi.responses import JSONResponse

    return JSONResponse(_internal_error_body(exc), status_code=500)
