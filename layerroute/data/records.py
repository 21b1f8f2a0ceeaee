"""The record every data loader yields: a `Conversation` (or a `BadRow`), its checks, and the two row readers.

A conversation holds chat `messages` in OpenAI format (roles system / user / assistant / tool; assistant tool
calls as structured ``tool_calls=[{"type": "function", "function": {"name": ..., "arguments": {...}}}]`` with
``arguments`` a dict), `tools` as OpenAI function specs (``{"type": "function", "function": {name,
description, parameters (JSON schema)}}``), the source name and a stable id. Ids are content hashes where a
dataset has none, so an exact duplicate always lands in the same train/eval split and is read only once.

Rows that cannot be parsed are yielded as `BadRow(reason, detail)`, never raised: the builder counts them by
source and reason and stops only when too many of a source's rows are bad.

The loaders themselves live in `layerroute.tasks` (one module per task, found through
`layerroute.tasks.registry`); they import this module, which imports no task.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from layerroute.data.config import SourceConfig
from layerroute.errors import DataError

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Conversation:
    """One chat with its tools; every assistant turn in it becomes one step."""

    id: str
    """Stable id, prefixed by the source kind (e.g. 'bfcl:live_simple_0-0-0', 'gsm8k:<hash>')."""
    source: str
    """Source label (SourceConfig.source_label)."""
    messages: list[dict]
    """OpenAI chat messages; assistant tool calls structured in `tool_calls` with dict arguments."""
    tools: list[dict] = field(default_factory=list)
    """OpenAI function specs: {"type": "function", "function": {"name", "description", "parameters"}}."""
    category: str | None = None
    """Finer grouping for evaluation: the BFCL category, 'gsm8k', 'gsm_symbolic', a Turing domain, ..."""
    meta: dict = field(default_factory=dict)
    """Extra gold data for evaluators, e.g. {"answer": "72"} or BFCL's {"possible_answer": [...]}."""
    repairs: list[str] = field(default_factory=list)
    """Non-standard forms accepted while parsing (single-quoted calls, string-encoded arguments, ...)."""
    task: str | None = None
    """The task that read it (`layerroute.tasks.registry`; set by `layerroute.data.sources.iter_source`)."""


@dataclass
class BadRow:
    """A row that could not be turned into a conversation, with why."""

    source: str
    reason: str
    """Short key counted in reports, e.g. 'unknown_role', 'tool_call_invalid_json', 'no_assistant_turn'."""
    detail: str
    """One line showing the offending text."""
    row_id: str


Record = Conversation | BadRow


def row_hash(*parts: str) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(p.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def shorten(text: Any, n: int = 160) -> str:
    text = str(text).replace("\n", "\\n")
    return text if len(text) <= n else text[: n - 3] + "..."


def bad_row(source: str, row_id: str, err: str) -> BadRow:
    """A `BadRow` from a 'reason: detail' message."""
    reason, _, detail = err.partition(": ")
    return BadRow(source=source, reason=reason, detail=detail, row_id=row_id)


def check_conversation(conv: Conversation) -> str | None:
    """None when `conv` can be rendered into steps, else 'reason: detail'."""
    if not conv.messages:
        return "empty_conversation: no messages"
    n_assistant = 0
    for i, m in enumerate(conv.messages):
        role = m.get("role")
        if role not in ROLES:
            return f"unknown_role: message {i} has role {role!r}"
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            return f"non_text_content: message {i} content is {type(content).__name__}"
        if role == "assistant":
            n_assistant += 1
            if not (content or "").strip() and not m.get("tool_calls"):
                return f"empty_assistant_turn: message {i}"
            for tc in m.get("tool_calls") or []:
                f = tc.get("function") if isinstance(tc, dict) else None
                if (
                    not isinstance(f, dict)
                    or not isinstance(f.get("name"), str)
                    or not isinstance(f.get("arguments"), dict)
                ):
                    return f"tool_call_malformed: message {i}: {shorten(tc, 80)}"
        elif not (content or "").strip() and role != "system":
            return f"empty_turn: message {i} ({role}) is empty"
    if n_assistant == 0:
        return "no_assistant_turn: the conversation has no assistant turn to learn"
    if conv.messages[0]["role"] == "assistant" or all(
        m["role"] == "system" for m in conv.messages[: _first_assistant(conv)]
    ):
        return "no_context: the first assistant turn has no user turn before it"
    return None


def _first_assistant(conv: Conversation) -> int:
    return next(i for i, m in enumerate(conv.messages) if m["role"] == "assistant")


def checked(conv: Conversation) -> Record:
    err = check_conversation(conv)
    return bad_row(conv.source, conv.id, err) if err else conv


# ---------------------------------------------------------------------------------------------------------
# row readers


def hub_rows(src: SourceConfig) -> Iterable[dict]:
    """Rows of a hub dataset, or of a local json/jsonl/parquet/csv file or folder, through `datasets`."""
    import datasets  # heavy import, only for the sources that need it

    path = src.resolved_path
    try:
        if os.path.exists(path):
            if os.path.isdir(path):
                ds = datasets.load_dataset(path, src.hub_config, split=src.split)
            else:
                ext = path.rsplit(".", 1)[-1].lower()
                builder = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}.get(ext)
                if builder is None:
                    raise DataError(
                        f"{src.source_label}: cannot read {path!r}: use a .json, .jsonl, .parquet or .csv file"
                    )
                ds = datasets.load_dataset(builder, data_files={src.split: path}, split=src.split)
        else:
            ds = datasets.load_dataset(path, src.resolved_hub_config, split=src.split)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types; say what to do
        raise DataError(
            f"{src.source_label}: could not load {path!r} (config {src.resolved_hub_config!r}, split {src.split!r}): "
            f"{type(e).__name__}: {e}. Without access to the hub, download the dataset elsewhere and set "
            f"`path` to the local file (HF_HUB_OFFLINE=1 makes this fail at once instead of retrying)."
        ) from e
    if src.limit is not None:
        ds = ds.select(range(min(src.limit, len(ds))))
    return ds


def jsonl_rows(path: str, source: str, limit: int | None) -> Iterator[tuple[int, dict | BadRow]]:
    if not os.path.exists(path):
        raise DataError(f"{source}: file not found: {path!r}")
    n = 0
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and n >= limit:
                return
            n += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield (
                    lineno,
                    BadRow(
                        source,
                        "invalid_json_line",
                        f"line {lineno}: {e}: {shorten(line, 80)}",
                        f"line{lineno}",
                    ),
                )
                continue
            if not isinstance(row, dict):
                yield (
                    lineno,
                    BadRow(source, "invalid_json_line", f"line {lineno} is not an object", f"line{lineno}"),
                )
                continue
            yield lineno, row
