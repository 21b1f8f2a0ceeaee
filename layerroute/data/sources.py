"""One small function per dataset, all yielding the same record: a `Conversation` (or a `BadRow`).

A conversation holds chat `messages` in OpenAI format (roles system / user / assistant / tool; assistant tool
calls as structured ``tool_calls=[{"type": "function", "function": {"name": ..., "arguments": {...}}}]`` with
``arguments`` a dict), `tools` as OpenAI function specs (``{"type": "function", "function": {name,
description, parameters (JSON schema)}}``), the source name and a stable id. Ids are content hashes where a
dataset has none, so an exact duplicate always lands in the same train/eval split and is read only once.

Rows that cannot be parsed are yielded as `BadRow(reason, detail)`, never raised: the builder counts them by
source and reason and stops only when too many of a source's rows are bad.

Math targets (GSM8K, gsm_symbolic, Turing): the assistant answer is the worked solution, GSM8K calculator
annotations ``<<48/2=24>>`` removed, and its ``#### N`` line replaced by a final line ``The answer is N.``
(commas dropped from N). Evaluators extract the number after the last "The answer is".
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from layerroute.data.config import DataConfig, SourceConfig
from layerroute.data.toolcalls import loads_lenient, parse_tool_calls_detailed, to_openai_tool_calls
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


def _hash(*parts: str) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(p.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def _short(text: Any, n: int = 160) -> str:
    text = str(text).replace("\n", "\\n")
    return text if len(text) <= n else text[: n - 3] + "..."


def _bad(source: str, row_id: str, err: str) -> BadRow:
    reason, _, detail = err.partition(": ")
    return BadRow(source=source, reason=reason, detail=detail, row_id=row_id)


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
            raise ValueError(f"tool spec must be an object, got {_short(t, 60)}")
        fn = t["function"] if isinstance(t.get("function"), dict) else t
        if not isinstance(fn.get("name"), str):
            raise ValueError(f"tool spec without a name: {_short(t, 60)}")
        out.append({"type": "function", "function": fn})
    return out


def assistant_message(text: str, source: str, row_id: str, repairs: list[str]) -> dict | BadRow:
    """An assistant message from raw text: tool-call blocks become structured `tool_calls`."""
    parsed = parse_tool_calls_detailed(text)
    if parsed.error:
        return _bad(source, row_id, parsed.error)
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
                    return f"tool_call_malformed: message {i}: {_short(tc, 80)}"
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


def _finish(conv: Conversation) -> Record:
    err = check_conversation(conv)
    return _bad(conv.source, conv.id, err) if err else conv


def math_target(solution: str, final: str | None = None) -> str | None:
    """GSM8K-style worked solution -> assistant text ending with 'The answer is N.' (None: no '#### N' line)."""
    lines = solution.strip().split("\n")
    m = re.match(r"^\s*####\s*(.+?)\s*$", lines[-1]) if lines else None
    if final is None:
        if m is None:
            return None
        final = m.group(1)
    if m is not None:
        lines = lines[:-1]
    final = final.strip().replace(",", "").rstrip(".")
    body = re.sub(r"<<[^<>]*>>", "", "\n".join(lines)).strip()
    return (body + "\n" if body else "") + f"The answer is {final}."


# ---------------------------------------------------------------------------------------------------------
# row readers


def _hub_rows(src: SourceConfig) -> Iterable[dict]:
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


def _jsonl_rows(path: str, source: str, limit: int | None) -> Iterator[tuple[int, dict | BadRow]]:
    if not os.path.exists(path):
        raise DataError(f"{source}: file not found: {path!r}")
    n = 0
    with open(path, encoding="utf-8") as f:
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
                        f"line {lineno}: {e}: {_short(line, 80)}",
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
    row_id = f"hermes:{row.get('id') or _hash(json.dumps(turns, sort_keys=True, default=str))}"
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
                    return BadRow(source, "tools_invalid", f"{e}: {_short(m.group(1), 80)}", row_id)
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
    return _finish(conv)


def load_hermes(src: SourceConfig, cfg: DataConfig) -> Iterator[Record]:
    """NousResearch/hermes-function-calling-v1 (set `hub_config`, e.g. func_calling_singleturn or func_calling)."""
    for row in _hub_rows(src):
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
    row_id = f"glaive:{_hash(system, str(chat))}"
    if not isinstance(chat, str) or not chat.strip():
        return BadRow(source, "missing_chat", "empty `chat` column", row_id)
    system = re.sub(r"^\s*SYSTEM:\s*", "", system)
    tools: list[dict] = []
    j = system.find("{")
    if j >= 0:
        try:
            tools = normalize_tools(parse_json_objects(system[j:]))
        except (json.JSONDecodeError, ValueError) as e:
            return BadRow(source, "tools_invalid_json", f"{e}: {_short(system[j:], 80)}", row_id)
        system = system[:j].strip()
    messages: list[dict] = [{"role": "system", "content": system.strip()}] if system.strip() else []
    repairs: list[str] = []
    marks = list(_GLAIVE_TURN.finditer(chat))
    if not marks:
        return BadRow(source, "no_turn_markers", _short(chat, 80), row_id)
    lead = chat[: marks[0].start()].strip()
    if lead:
        return BadRow(
            source, "unknown_role", f"text before the first USER/ASSISTANT marker: {_short(lead, 80)}", row_id
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
    return _finish(Conversation(row_id, source, messages, tools, category="glaive", repairs=repairs))


def load_glaive(src: SourceConfig, cfg: DataConfig) -> Iterator[Record]:
    """glaiveai/glaive-function-calling-v2."""
    for row in _hub_rows(src):
        yield glaive_row(row, src.source_label)


def gsm8k_row(row: dict, source: str, category: str = "gsm8k") -> Record:
    """{"question", "answer": "...worked solution...\\n#### N"} -> one planning step."""
    q, a = row.get("question"), row.get("answer")
    row_id = f"gsm8k:{_hash(str(q))}"
    if not isinstance(q, str) or not q.strip() or not isinstance(a, str) or not a.strip():
        return BadRow(source, "missing_field", "needs non-empty `question` and `answer` strings", row_id)
    target = math_target(a)
    if target is None:
        return BadRow(source, "no_final_answer", f"answer has no '#### N' line: {_short(a, 80)}", row_id)
    final = target.rsplit("The answer is ", 1)[1][:-1]
    msgs = [{"role": "user", "content": q.strip()}, {"role": "assistant", "content": target}]
    return _finish(Conversation(row_id, source, msgs, [], category=category, meta={"answer": final}))


def load_gsm8k_hub(src: SourceConfig, cfg: DataConfig) -> Iterator[Record]:
    """openai/gsm8k, config main (train for training; set split: test and role: eval for evaluation)."""
    for row in _hub_rows(src):
        yield gsm8k_row(row, src.source_label)


TURING_QUESTION_COLUMNS = ("question", "prompt", "problem")
TURING_ANSWER_COLUMNS = ("answer", "final_answer", "solution")
TURING_REASONING_COLUMNS = ("reasoning", "rationale", "cot", "chain_of_thought", "explanation", "thinking")


def turing_row(row: dict, source: str) -> Record:
    """A question/answer reasoning row: target = reasoning (if a reasoning column exists) + 'The answer is X.'."""
    qcol = next((c for c in TURING_QUESTION_COLUMNS if c in row), None)
    acol = next((c for c in TURING_ANSWER_COLUMNS if c in row), None)
    if qcol is None or acol is None:
        raise DataError(
            f"{source}: expected a question column ({', '.join(TURING_QUESTION_COLUMNS)}) and an answer column "
            f"({', '.join(TURING_ANSWER_COLUMNS)}), optionally a reasoning column ({', '.join(TURING_REASONING_COLUMNS)}); "
            f"the rows have columns {sorted(row)}"
        )
    q, a = row[qcol], row[acol]
    rid = row.get("conversation_id") or row.get("id")
    row_id = f"turing:{rid if rid not in (None, '') else _hash(str(q))}"
    if not isinstance(q, str) or not q.strip() or a is None or not str(a).strip():
        return BadRow(source, "missing_field", f"empty `{qcol}` or `{acol}`", row_id)
    rcol = next((c for c in TURING_REASONING_COLUMNS if c in row and c != acol), None)
    reasoning = str(row[rcol]).strip() if rcol and row[rcol] else ""
    answer = str(a).strip()
    target = (
        (reasoning + "\n" if reasoning else "")
        + f"The answer is {answer}"
        + ("" if answer.endswith(".") else ".")
    )
    domain = row.get("domain")
    msgs = [{"role": "user", "content": q.strip()}, {"role": "assistant", "content": target}]
    meta = {"answer": answer, "domain": domain, "sub_domain": row.get("sub_domain") or row.get("sub-domain")}
    return _finish(
        Conversation(row_id, source, msgs, [], category=f"turing:{domain}" if domain else "turing", meta=meta)
    )


def load_turing(src: SourceConfig, cfg: DataConfig) -> Iterator[Record]:
    """TuringEnterprises/Turing-Open-Reasoning.

    Its card (as mirrored publicly) documents rows {"conversation_id", "domain", "sub-domain", "question",
    "answer"}, the answer being a short final answer (LaTeX) without a worked solution, so these planning
    steps are short. A reasoning column is used when present.
    """
    for row in _hub_rows(src):
        yield turing_row(row, src.source_label)


# ---------------------------------------------------------------------------------------------------------
# offline sources


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


def _concrete_value(value: Any, schema: dict | None) -> Any:
    schema = schema or {}
    t = schema.get("type")
    if t in ("dict", "object", "HashMap") and isinstance(value, dict):
        return _concrete_args(value, schema.get("properties") or {})
    if t in ("array", "tuple", "Array", "ArrayList") and isinstance(value, list):
        items = schema.get("items") or {}
        if items.get("type") in ("dict", "object") and all(isinstance(v, dict) for v in value):
            return [_concrete_args(v, items.get("properties") or {}) for v in value]
    return value


def _concrete_args(possible: dict, props: dict) -> dict:
    """{arg: [acceptable values]} -> {arg: value}: the first non-empty acceptable value; optional-only args omitted."""
    out = {}
    for arg, choices in possible.items():
        present, v = _first_acceptable(choices)
        if present:
            out[arg] = _concrete_value(v, props.get(arg))
    return out


def bfcl_gold_calls(ground_truth: list[dict], functions: list[dict]) -> list[dict]:
    """BFCL possible_answer ground truth -> one concrete call per entry, [{"name", "arguments"}]."""
    docs = {f["name"]: f for f in functions}
    calls = []
    for entry in ground_truth:
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ValueError(f"ground truth entry is not {{function: args}}: {_short(entry, 80)}")
        ((name, possible),) = entry.items()
        if not isinstance(possible, dict):
            raise ValueError(f"ground truth for {name} is not an argument map")
        props = ((docs.get(name) or {}).get("parameters") or {}).get("properties") or {}
        calls.append({"name": name, "arguments": _concrete_args(possible, props)})
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


def load_bfcl(src: SourceConfig, cfg: DataConfig) -> Iterator[Record]:
    """BFCL single-turn categories: the question (+ its system turn), the functions as tools, and one gold
    assistant turn with the ground-truth calls. `limit` applies per category."""
    folder = src.path or bfcl_data_dir()
    for cat in src.resolved_categories:
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
        for _, row in _jsonl_rows(qfile, src.source_label, src.limit):
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
    return _finish(Conversation(row_id, source, messages, tools, category=category, meta=meta))


def load_gsm_symbolic(src: SourceConfig, cfg: DataConfig) -> Iterator[Record]:
    """reasoning-gym's `gsm_symbolic`: `limit` generated problems; target = metadata.answer_cot (ends '#### N')."""
    import reasoning_gym

    seed = cfg.seed if src.seed is None else src.seed
    ds = reasoning_gym.create_dataset("gsm_symbolic", size=src.limit, seed=seed)
    for i in range(len(ds)):
        x = ds[i]
        q = x.get("question")
        cot = (x.get("metadata") or {}).get("answer_cot")
        row_id = f"gsm_symbolic:{_hash(str(q))}"
        if not isinstance(q, str) or not isinstance(cot, str):
            yield BadRow(
                src.source_label, "missing_field", f"item {i} lacks question or metadata.answer_cot", row_id
            )
            continue
        target = math_target(cot, None if "####" in cot else str(x.get("answer")))
        final = target.rsplit("The answer is ", 1)[1][:-1]
        msgs = [{"role": "user", "content": q.strip()}, {"role": "assistant", "content": target}]
        yield _finish(
            Conversation(row_id, src.source_label, msgs, [], category="gsm_symbolic", meta={"answer": final})
        )


def load_gsm8k_jsonl(src: SourceConfig, cfg: DataConfig) -> Iterator[Record]:
    """A local GSM8K JSONL ({"question", "answer"} per line), e.g. ../shared/data/gsm8k/train.jsonl."""
    for _, row in _jsonl_rows(src.path, src.source_label, src.limit):
        yield row if isinstance(row, BadRow) else gsm8k_row(row, src.source_label)


def messages_row(row: dict, source: str, lineno: int) -> Record:
    """{"id"?, "messages": [...], "tools"?: [...]}: OpenAI messages; assistant text with <tool_call> blocks and
    string-encoded `arguments` are normalised to structured calls."""
    msgs = row.get("messages")
    row_id = f"jsonl:{row.get('id') or _hash(json.dumps(msgs, sort_keys=True, default=str))}"
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
                            f"line {lineno}: {_short(args, 80)}",
                            row_id,
                        )
                    repairs.append("string_encoded_arguments")
                if (
                    not isinstance(f, dict)
                    or not isinstance(f.get("name"), str)
                    or not isinstance(args, dict)
                ):
                    return BadRow(source, "tool_call_malformed", f"line {lineno}: {_short(tc, 80)}", row_id)
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
    return _finish(conv)


def load_jsonl(src: SourceConfig, cfg: DataConfig) -> Iterator[Record]:
    """Any local JSONL with `messages` (+ optional `tools`, `id`, `category`) per line."""
    for lineno, row in _jsonl_rows(src.path, src.source_label, src.limit):
        yield row if isinstance(row, BadRow) else messages_row(row, src.source_label, lineno)


def chain_conversations(convs: list[Conversation]) -> Conversation:
    """Consecutive single-turn question/answer conversations as one multi-turn chat (user, assistant, user, ...).

    Each assistant turn stays one step; its own gold extras are kept in meta["per_step"][step_index].
    """
    first = convs[0]
    messages = [m for c in convs for m in c.messages]
    kind = first.id.split(":", 1)[0]
    meta = {"chained_ids": [c.id for c in convs], "per_step": [c.meta for c in convs]}
    repairs = [r for c in convs for r in c.repairs]
    return Conversation(
        f"{kind}:chain:{_hash(*meta['chained_ids'])}",
        first.source,
        messages,
        [],
        first.category,
        meta,
        repairs,
    )


SOURCES = {
    "hermes": load_hermes,
    "glaive": load_glaive,
    "gsm8k_hub": load_gsm8k_hub,
    "turing": load_turing,
    "bfcl": load_bfcl,
    "gsm_symbolic": load_gsm_symbolic,
    "gsm8k_jsonl": load_gsm8k_jsonl,
    "jsonl": load_jsonl,
}


def iter_source(src: SourceConfig, cfg: DataConfig) -> Iterator[Record]:
    """Conversations and bad rows of one configured source."""
    return SOURCES[src.name](src, cfg)
