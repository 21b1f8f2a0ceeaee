"""Function-calling chats, a task for training data: Hermes and Glaive from the hub, and any local JSONL of OpenAI
`messages` (source kinds hermes, glaive, jsonl), each row -> one `Conversation` or a `BadRow`.

These sources are not one benchmark's: they carry no gold answers to score, so their steps are scored by the task
that scores their step type (`Task.default_for`: BFCL for tool calls, GSM8K's final number for the rest), which
for want of ground truth says so in the reason.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from layerroute.data.config import DataConfig, SourceConfig
from layerroute.data.records import (
    ROLES,
    BadRow,
    Conversation,
    Record,
    bad_row,
    checked,
    hub_rows,
    jsonl_rows,
    row_hash,
    shorten,
)
from layerroute.data.toolcalls import loads_lenient, parse_tool_calls_detailed, to_openai_tool_calls
from layerroute.errors import ConfigError
from layerroute.tasks.base import Task

# ---------------------------------------------------------------------------------------------------------
# shared normalisation


def normalize_tools(tools: Any) -> list[dict]:
    """Tool specs in OpenAI form; accepts bare {"name", "parameters"} dicts or a single dict. Raises ValueError."""
    if tools is None:
        return []
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        raise ValueError(f"tools must be a list, got {type(tools).__name__}")
    out = []
    for t in tools:
        if not isinstance(t, dict):
            raise ValueError(f"tool spec must be an object, got {shorten(t, 60)}")
        fn = t["function"] if isinstance(t.get("function"), dict) else t
        if not isinstance(fn.get("name"), str):
            raise ValueError(f"tool spec without a name: {shorten(t, 60)}")
        out.append({"type": "function", "function": fn})
    return out


def assistant_message(text: str, source: str, row_id: str, repairs: list[str]) -> dict | BadRow:
    """An assistant message from raw text: tool-call blocks become structured `tool_calls`."""
    parsed = parse_tool_calls_detailed(text)
    if parsed.error:
        return bad_row(source, row_id, parsed.error)
    repairs.extend(parsed.repairs)
    if parsed.calls:
        return {
            "role": "assistant",
            "content": parsed.remaining_text,
            "tool_calls": to_openai_tool_calls(parsed.calls),
        }
    return {"role": "assistant", "content": text.replace("<|endoftext|>", "").strip()}


def _normalize_json_text(text: str, repairs: list[str]) -> str:
    """Tool results: re-serialise JSON / Python-literal objects as JSON, keep anything else verbatim."""
    s = text.strip()
    if s[:1] in "{[":
        try:
            obj, was_literal = loads_lenient(s)
        except ValueError:
            return s
        if was_literal:
            repairs.append("python_literal_tool_response")
        return json.dumps(obj, ensure_ascii=False)
    return s


# ---------------------------------------------------------------------------------------------------------
# hub sources (tested offline on fixture files in the same row format)

_HERMES_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "tool": "tool",
}
_TOOLS_BLOCK = re.compile(r"<tools>(.*?)</tools>", re.DOTALL)
_TOOL_RESPONSE = re.compile(r"<tool_response>(.*?)</tool_response>", re.DOTALL)


def parse_tools_block(text: str) -> list[dict]:
    """The function specs inside a Hermes `<tools>` block: a JSON/Python list, or one object per line."""
    text = text.strip()
    if not text:
        return []
    try:
        obj, _ = loads_lenient(text)
        return normalize_tools(obj)
    except ValueError:
        pass
    out: list[dict] = []
    for line in text.splitlines():  # several objects, one per line
        if line.strip():
            obj, _ = loads_lenient(line)  # raises ValueError on a broken line
            out.extend(normalize_tools(obj))
    return out


def hermes_row(row: dict, source: str) -> Record:
    """One NousResearch/hermes-function-calling-v1 row: {"id", "conversations": [{"from", "value"}], ...}."""
    turns = row.get("conversations")
    row_id = f"hermes:{row.get('id') or row_hash(json.dumps(turns, sort_keys=True, default=str))}"
    if not isinstance(turns, list):
        return BadRow(source, "missing_conversations", f"`conversations` is {type(turns).__name__}", row_id)
    messages: list[dict] = []
    tools: list[dict] = []
    repairs: list[str] = []
    for i, t in enumerate(turns):
        who, value = (t or {}).get("from"), (t or {}).get("value")
        role = _HERMES_ROLES.get(who)
        if role is None:
            return BadRow(source, "unknown_role", f"turn {i} is from {who!r}", row_id)
        if not isinstance(value, str):
            return BadRow(source, "non_text_content", f"turn {i} value is {type(value).__name__}", row_id)
        if role == "system":
            # The instructions mention "<tools> </tools> XML tags" before the real block: take the last
            # non-empty one.
            m = next((b for b in reversed(list(_TOOLS_BLOCK.finditer(value))) if b.group(1).strip()), None)
            if m:
                try:
                    tools = parse_tools_block(m.group(1))
                except ValueError as e:
                    return BadRow(source, "tools_invalid", f"{e}: {shorten(m.group(1), 80)}", row_id)
                # Keep the instructions before the block; the renderer writes the tools and the call format itself.
                value = value[: m.start()].strip()
            messages.append({"role": "system", "content": value})
        elif role == "assistant":
            msg = assistant_message(value, source, row_id, repairs)
            if isinstance(msg, BadRow):
                return msg
            messages.append(msg)
        elif role == "tool":
            blocks = _TOOL_RESPONSE.findall(value) or [value]
            for b in blocks:
                messages.append({"role": "tool", "content": _normalize_json_text(b, repairs)})
        else:
            messages.append({"role": "user", "content": value})
    conv = Conversation(
        row_id, source, messages, tools, category=row.get("category") or "hermes", repairs=repairs
    )
    return checked(conv)


def load_hermes(src: SourceConfig, cfg: DataConfig) -> Iterator[Record]:
    """NousResearch/hermes-function-calling-v1 (set `hub_config`, e.g. func_calling_singleturn or func_calling)."""
    for row in hub_rows(src):
        yield hermes_row(row, src.source_label)


_GLAIVE_TURN = re.compile(r"(?:^|\n)\s*(USER|ASSISTANT|FUNCTION RESPONSE):[ \t]?")


def parse_json_objects(text: str) -> list[Any]:
    """Consecutive JSON values in `text` (Glaive lists its functions as objects separated by blank lines)."""
    dec = json.JSONDecoder()
    out, i = [], 0
    while True:
        j = text.find("{", i)
        if j < 0:
            return out
        obj, i = dec.raw_decode(text, j)  # raises json.JSONDecodeError on a broken object
        out.append(obj)


def glaive_row(row: dict, source: str) -> Record:
    """One glaiveai/glaive-function-calling-v2 row: {"system": "SYSTEM: ...", "chat": "USER: ... ASSISTANT: ..."}."""
    system, chat = row.get("system") or "", row.get("chat")
    row_id = f"glaive:{row_hash(system, str(chat))}"
    if not isinstance(chat, str) or not chat.strip():
        return BadRow(source, "missing_chat", "empty `chat` column", row_id)
    system = re.sub(r"^\s*SYSTEM:\s*", "", system)
    tools: list[dict] = []
    j = system.find("{")
    if j >= 0:
        try:
            tools = normalize_tools(parse_json_objects(system[j:]))
        except (json.JSONDecodeError, ValueError) as e:
            return BadRow(source, "tools_invalid_json", f"{e}: {shorten(system[j:], 80)}", row_id)
        system = system[:j].strip()
    messages: list[dict] = [{"role": "system", "content": system.strip()}] if system.strip() else []
    repairs: list[str] = []
    marks = list(_GLAIVE_TURN.finditer(chat))
    if not marks:
        return BadRow(source, "no_turn_markers", shorten(chat, 80), row_id)
    lead = chat[: marks[0].start()].strip()
    if lead:
        return BadRow(
            source, "unknown_role", f"text before the first USER/ASSISTANT marker: {shorten(lead, 80)}", row_id
        )
    for k, m in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(chat)
        text = chat[m.end() : end].replace("<|endoftext|>", "").strip()
        who = m.group(1)
        if who == "USER":
            messages.append({"role": "user", "content": text})
        elif who == "ASSISTANT":
            msg = assistant_message(text, source, row_id, repairs)
            if isinstance(msg, BadRow):
                return msg
            messages.append(msg)
        else:
            messages.append({"role": "tool", "content": _normalize_json_text(text, repairs)})
    return checked(Conversation(row_id, source, messages, tools, category="glaive", repairs=repairs))


def load_glaive(src: SourceConfig, cfg: DataConfig) -> Iterator[Record]:
    """glaiveai/glaive-function-calling-v2."""
    for row in hub_rows(src):
        yield glaive_row(row, src.source_label)


def messages_row(row: dict, source: str, lineno: int) -> Record:
    """{"id"?, "messages": [...], "tools"?: [...]}: OpenAI messages; assistant text with <tool_call> blocks and
    string-encoded `arguments` are normalised to structured calls."""
    msgs = row.get("messages")
    row_id = f"jsonl:{row.get('id') or row_hash(json.dumps(msgs, sort_keys=True, default=str))}"
    if not isinstance(msgs, list):
        return BadRow(
            source, "missing_messages", f"line {lineno}: `messages` is {type(msgs).__name__}", row_id
        )
    try:
        tools = normalize_tools(row.get("tools"))
    except ValueError as e:
        return BadRow(source, "tools_invalid", f"line {lineno}: {e}", row_id)
    out: list[dict] = []
    repairs: list[str] = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            return BadRow(source, "malformed_message", f"line {lineno}: message {i} is not an object", row_id)
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            return BadRow(source, "unknown_role", f"line {lineno}: message {i} has role {role!r}", row_id)
        if role == "assistant" and m.get("tool_calls"):
            calls = []
            for tc in m["tool_calls"]:
                f = tc.get("function", tc) if isinstance(tc, dict) else None
                args = f.get("arguments") if isinstance(f, dict) else None
                if isinstance(args, str):
                    try:
                        args, _ = loads_lenient(args) if args.strip() else ({}, False)
                    except ValueError:
                        return BadRow(
                            source,
                            "tool_call_arguments_invalid_json",
                            f"line {lineno}: {shorten(args, 80)}",
                            row_id,
                        )
                    repairs.append("string_encoded_arguments")
                if (
                    not isinstance(f, dict)
                    or not isinstance(f.get("name"), str)
                    or not isinstance(args, dict)
                ):
                    return BadRow(source, "tool_call_malformed", f"line {lineno}: {shorten(tc, 80)}", row_id)
                calls.append({"name": f["name"], "arguments": args})
            out.append(
                {"role": "assistant", "content": content or "", "tool_calls": to_openai_tool_calls(calls)}
            )
        elif role == "assistant" and isinstance(content, str):
            msg = assistant_message(content, source, row_id, repairs)
            if isinstance(msg, BadRow):
                return msg
            out.append(msg)
        else:
            out.append({"role": role, "content": content})
    conv = Conversation(row_id, source, out, tools, category=row.get("category") or "jsonl", repairs=repairs)
    return checked(conv)


def load_jsonl(src: SourceConfig, cfg: DataConfig) -> Iterator[Record]:
    """Any local JSONL with `messages` (+ optional `tools`, `id`, `category`) per line."""
    for lineno, row in jsonl_rows(src.path, src.source_label, src.limit):
        yield row if isinstance(row, BadRow) else messages_row(row, src.source_label, lineno)


#: Where the hub kinds read from when a source names no `path`.
DEFAULT_PATHS = {
    "hermes": "NousResearch/hermes-function-calling-v1",
    "glaive": "glaiveai/glaive-function-calling-v2",
}


class Chats(Task):
    """Hermes / Glaive / JSONL function-calling chats: training data without a scorer of their own."""

    name = "chats"
    loaders = {"hermes": load_hermes, "glaive": load_glaive, "jsonl": load_jsonl}
    scores = False

    def check_source(self, src, key: str) -> None:
        if src.name == "jsonl" and not src.path:
            raise ConfigError(f"{key}.path: source {src.name!r} needs a local file path")

    def default_path(self, src) -> str | None:
        return DEFAULT_PATHS.get(src.name)


TASKS = (Chats(),)
