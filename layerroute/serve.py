"""An OpenAI-compatible chat endpoint for a routed model, with tools.

    layerroute serve --model smollm2-135m-instruct [--adapter DIR] [--host 127.0.0.1 --port 8000]

Endpoints: ``POST /v1/chat/completions`` (messages, tools, tool_choice, max_tokens / max_completion_tokens,
temperature, top_p, stop, seed, stream with stream_options.include_usage), ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus text format, `layerroute.metrics`: requests by status, queue length, running batch
size, time to first token and inter-token latency histograms, prompt / generated tokens, blocks run and skipped,
session-cache hits).

* Tool calls the model writes (Hermes/Qwen ``<tool_call>{json}</tool_call>``) come back in ``tool_calls``
  (``call_...`` ids, type function, arguments as a JSON string) with finish_reason ``tool_calls``. A call that
  does not parse comes back as plain text content (finish_reason ``stop``), never as an error.
  ``tool_choice``: ``auto`` (default), ``none`` (the tools are not shown and the output is not parsed),
  ``required`` or a named function; ``parallel_tool_calls: false`` allows one call at most.
* Constrained decoding (default; ``--no-constrain`` turns it off): every step decodes under a grammar
  (`layerroute.constrain`, xgrammar) built from the request, so a call always parses, names one of the request's
  tools and has arguments valid under its parameter schema: ``auto`` = free text, and any call it opens is
  well formed; ``required`` = one or more calls and nothing else; a named function = calls of it only;
  ``none`` = text that never opens a call. ``response_format`` ``{"type": "json_object"}`` or ``{"type":
  "json_schema", "json_schema": {"schema": ...}}`` makes the content one JSON value valid under the schema
  (always strict: no properties the schema does not name). A schema the grammar compiler rejects is a 400
  naming the problem (``param`` tools or response_format, ``code`` invalid_schema). Without constraints,
  ``required`` and a named function start the assistant turn with the call's opening text instead, and a
  JSON ``response_format`` is a 400.
* Every response carries a ``layerroute`` extension: the gate pattern (blocks run / skipped), router
  probabilities, block and total FLOPs skipped (`layerroute.flops.step_flops`), whether the output parsed as
  a tool call, the session cache (reused, cached and prefilled tokens) and timings (queue wait, time to first
  token, decode time per token). Streaming sends it on the final chunk.
* Requests may carry ``"layerroute": {"cache": false, "ignore_eos": true}`` (``extra_body`` in the openai
  client): skip the session cache for this request; always generate ``max_tokens`` tokens (benchmarks).
* Errors use the API's shape, ``{"error": {"message", "type", "param", "code"}}``, with a 4xx status for
  the client's mistakes; anything unexpected is logged and answered 500 in the same shape; the server keeps
  running.
* Continuous batching (`layerroute.scheduler`): up to ``--max-batch`` requests decode together, each with its own
  routing decisions, stop conditions, sampling settings and stream; a newcomer joins at the next token (its prompt
  prefilled alone, then decoded with the others) and a finished or disconnected request leaves at once. Requests
  wait FIFO for a place; with ``--max-queue`` requests already waiting, a new one gets 429 with ``Retry-After``.

Deviations from the OpenAI API: no ``temperature`` means greedy decoding (deterministic agent steps), not 1.0;
``n`` must be 1; ``logprobs`` and penalties are not supported (rejected or ignored as noted in
`_reject_unsupported`).
"""

import argparse
import asyncio
import json
import logging
import math
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from .data.render import RenderError
from .data.toolcalls import FUNCTIONCALL, TOOL_CALL_OPEN, parse_tool_calls
from .engine import Completion, Engine, SamplingParams
from .scheduler import Job as _Job
from .scheduler import Scheduler

log = logging.getLogger("layerroute.serve")

ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"developer": "system"}  # newer OpenAI clients send "developer" for system instructions
TOOL_TAGS = (TOOL_CALL_OPEN, FUNCTIONCALL)


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


# -- the app -------------------------------------------------------------------------------------------------
class Server:
    """Validation, the generation queue and response formatting around one `Engine`."""

    def __init__(self, engine: Engine, *, model_name: str, max_tokens_limit: int = 4096, default_max_tokens: int = 512,
                 max_queue: int = 256, scripted: Callable[[list[dict], list[dict]], str | None] | None = None,
                 constrained: bool = True, max_batch: int = 8, schedule: str = "fcfs", max_wait_s: float = 2.0):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}")
        self.engine, self.model_name = engine, model_name
        self.constrained = constrained
        self.max_tokens_limit, self.default_max_tokens, self.max_queue = max_tokens_limit, default_max_tokens, max_queue
        self.scripted = scripted
        self.created = int(time.time())
        self.max_batch = max_batch
        # continuous batching (layerroute.scheduler)
        self.scheduler = Scheduler(engine, max_batch=max_batch, schedule=schedule, max_wait_s=max_wait_s)
        self.pending = 0  # waiting or running (touched from the event loop only)
        self.served = 0
        self.failed = 0
        self.service_s: float | None = None  # moving average of a request's time in the engine (Retry-After)
        self.metrics = None  # a metrics.ServerMetrics when the app exposes /metrics

    def record(self, job: _Job, c: Completion, total_s: float) -> None:
        """A request answered: counts, metrics and the pace used for Retry-After."""
        self.served += 1
        engine_s = c.timings.get("engine_s", total_s)
        self.service_s = engine_s if self.service_s is None else 0.8 * self.service_s + 0.2 * engine_s
        if self.metrics is not None:
            self.metrics.observe_completion(c)
            self.metrics.queue_time.observe(job.queue_s)
            self.metrics.latency.observe(total_s)

    @property
    def running(self) -> int:
        """Requests decoding in the running batch now."""
        return self.scheduler.running

    def close(self) -> None:
        self.scheduler.close()
        self.engine.close()

    # -- validation -------------------------------------------------------------------------------------
    def prepare(self, payload: Any) -> tuple[_Job, dict]:
        if not isinstance(payload, dict):
            raise _bad(f"the request body must be a JSON object, got {_type_name(payload)}", code="invalid_type")
        model = _expect(payload, "model", (str,), "a string", optional=False)
        if model != self.model_name:
            raise ApiError(404, f"The model '{model}' does not exist. This server serves '{self.model_name}'.",
                           param="model", code="model_not_found")
        messages = parse_messages(payload.get("messages"))
        tools = parse_tools(payload.get("tools"))
        prefix, show_tools = tool_choice_prefix(payload.get("tool_choice"), tools)
        _reject_unsupported(payload)
        parallel = _expect(payload, "parallel_tool_calls", (bool,), "a boolean")
        scripted_text = self.scripted(messages, tools) if self.scripted is not None else None
        grammar = None
        if self.constrained and scripted_text is None:  # (a scripted test turn imposes its tokens instead)
            grammar = self._grammar(tools if show_tools else [], payload.get("tool_choice"), parallel is not False,
                                    payload.get("response_format"))
            prefix = ""  # the grammar makes the model write the call's opening itself
        elif not self.constrained and payload.get("response_format") not in (None, {"type": "text"}):
            raise _bad("response_format needs constrained decoding, which this server runs without (--no-constrain)",
                       param="response_format", code="unsupported_value")
        stream = _expect(payload, "stream", (bool,), "a boolean") or False
        stream_opts = _expect(payload, "stream_options", (dict,), "an object") or {}
        temperature = _expect(payload, "temperature", (int, float), "a number")
        if temperature is not None and not 0 <= temperature <= 2:
            raise _bad(f"'temperature' must be between 0 and 2, got {temperature}", param="temperature",
                       code="invalid_value")
        top_p = _expect(payload, "top_p", (int, float), "a number")
        if top_p is not None and not 0 < top_p <= 1:
            raise _bad(f"'top_p' must be in (0, 1], got {top_p}", param="top_p", code="invalid_value")
        seed = _expect(payload, "seed", (int,), "an integer")
        stop = payload.get("stop")
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
            raise _bad("'stop' must be a string or an array of non-empty strings", param="stop", code="invalid_type")
        ext = _expect(payload, "layerroute", (dict,), "an object") or {}
        key = "max_completion_tokens" if payload.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _expect(payload, key, (int,), "an integer")

        try:
            text = self.engine.prompts.text(messages, tools if show_tools else [])
        except RenderError as e:
            raise _bad(f"the messages cannot be rendered with this model's chat template: {e}", param="messages",
                       code="template_error") from None
        prompt = self.engine.prompts.ids(text + prefix)
        ctx = self.engine.context_length
        room = (ctx - len(prompt)) if ctx else None
        if max_tokens is not None:
            if max_tokens < 1:
                raise _bad(f"'{key}' must be at least 1, got {max_tokens}", param=key, code="invalid_value")
            if max_tokens > self.max_tokens_limit:
                raise _bad(f"'{key}' is too large: {max_tokens}. This server allows at most {self.max_tokens_limit} "
                           "completion tokens.", param=key, code="max_tokens_exceeded")
        if room is not None and room < (max_tokens or 1):
            raise _bad(f"This model's maximum context length is {ctx} tokens. However, you requested "
                       f"{len(prompt) + (max_tokens or 1)} tokens ({len(prompt)} in the messages, {max_tokens or 1} "
                       "in the completion). Please reduce the length of the messages or completion.",
                       param="messages", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(self.default_max_tokens, self.max_tokens_limit, room if room is not None else 1 << 30)

        params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature,
                                top_p=1.0 if top_p is None else float(top_p), seed=seed, stop=stop or [],
                                ignore_eos=bool(ext.get("ignore_eos", False)), grammar=grammar)
        job = _Job(prompt, params, bool(ext.get("cache", True)), scripted_text)
        info = {"stream": stream, "include_usage": bool(stream_opts.get("include_usage")), "prefix": prefix,
                "parse_tools": bool(tools) and show_tools, "stop": stop or [], "tools": tools}
        return job, info

    def _grammar(self, tools: list[dict], choice: Any, parallel: bool, response_format: Any):
        """The request's compiled grammar (cached per tool set); a 400 naming the part that cannot compile."""
        from .constrain import GrammarError

        grammars = self.engine.grammars
        try:
            return grammars.for_tools(tools, choice, parallel=parallel, response_format=response_format)
        except GrammarError as e:
            param = "tools"
            if response_format is not None:
                try:  # which part fails: the tools alone (cached if they compile) or the response format
                    grammars.for_tools(tools, "auto")
                    param = "response_format"
                except GrammarError:
                    pass
            raise _bad(f"{param}: {e}", param=param, code="invalid_schema") from None

    # -- the queue --------------------------------------------------------------------------------------
    def retry_after(self) -> int:
        """Seconds a refused client should wait: the queue ahead of it served at the recent pace (1 to 60)."""
        per_request = self.service_s if self.service_s is not None else 1.0
        return int(min(60, max(1, math.ceil(per_request * self.pending / self.max_batch))))

    def submit(self, job: _Job) -> asyncio.Future:
        waiting = self.pending - self.running
        if waiting >= self.max_queue:
            if self.metrics is not None:
                self.metrics.rejected.inc()
            raise ApiError(429, f"the server has {waiting} requests waiting (limit {self.max_queue}); retry later",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": str(self.retry_after())})
        self.pending += 1
        fut = asyncio.wrap_future(self.scheduler.submit(job))

        def done(_):
            self.pending -= 1

        fut.add_done_callback(done)
        return fut

    # -- responses --------------------------------------------------------------------------------------
    def finish(self, job: _Job, info: dict, c: Completion) -> tuple[dict, list[dict] | None, str]:
        """(assistant message, tool_calls or None, finish_reason) for a completion."""
        text = info["prefix"] + c.text
        if info["parse_tools"] and c.finish_reason != "cancelled":
            calls, remaining, error = parse_tool_calls(text)
            if calls and error is None:
                tool_calls = [
                    {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                     "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
                    for call in calls
                ]
                return {"role": "assistant", "content": remaining or None, "tool_calls": tool_calls}, tool_calls, \
                    "tool_calls"
        finish = "stop" if c.finish_reason == "cancelled" else c.finish_reason
        return {"role": "assistant", "content": text}, None, finish

    def extension(self, job: _Job, c: Completion, tool_calls, total_s: float) -> dict:
        n = len(c.gates)
        return {
            "blocks_run": [i for i in range(n) if c.gates[i]],
            "blocks_skipped": [i for i in range(n) if not c.gates[i]],
            "gate_pattern": "".join("1" if g else "." for g in c.gates),
            "router_probs": [round(p, 4) for p in c.router_probs],
            "block_flops_skipped": c.flops["block_flops_skipped"],
            "total_flops_skipped": c.flops["total_flops_skipped"],
            "flops": {"dense": c.flops["total_dense"], "routed": c.flops["total_routed"], "policy": c.flops["policy"]},
            "parsed_tool_call": tool_calls is not None,
            "constrained": job.params.grammar is not None,
            "step_type": "tool_call" if tool_calls is not None else "planning",
            "mode": "dense" if self.engine.dense else ("forced" if self.engine.forced is not None else "routed"),
            "cache": c.cache,
            "timings": {"queue_s": job.queue_s, **c.timings, "total_s": total_s},
        }

    def usage(self, c: Completion) -> dict:
        return {"prompt_tokens": c.prompt_tokens, "completion_tokens": len(c.tokens),
                "total_tokens": c.prompt_tokens + len(c.tokens),
                "prompt_tokens_details": {"cached_tokens": c.cached_tokens}}


def _error_response(err: ApiError):
    from fastapi.responses import JSONResponse

    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _internal_error_body(exc: BaseException) -> dict:
    return {"error": {"message": f"internal error: {type(exc).__name__}: {exc}", "type": "server_error",
                      "param": None, "code": "internal_error"}}


def _internal_error(exc: BaseException):
    from fastapi.responses import JSONResponse

    return JSONResponse(_internal_error_body(exc), status_code=500)


class _StreamText:
    """Incremental text for streaming: decodes the tokens so far, holds back what may still become a tool-call
    tag or a stop string (or an incomplete UTF-8 character), and stops emitting content at either."""

    def __init__(self, tokenizer, prefix: str, watch_tools: bool, stop: list[str]):
        self.tokenizer, self.prefix, self.watch_tools, self.stop = tokenizer, prefix, watch_tools, stop
        self.ids: list[int] = []
        self.emitted = 0
        self.closed = bool(prefix)  # a forced call: nothing to stream as content

    def _safe_end(self, text: str) -> int:
        markers = (list(TOOL_TAGS) if self.watch_tools else []) + self.stop
        end = len(text)
        for m in markers:
            i = text.find(m)
            if i >= 0:
                self.closed = True
                end = min(end, i)
        if self.closed:
            return end
        for m in markers:  # a suffix that is the start of a marker: wait for more tokens
            for k in range(min(len(m) - 1, len(text)), 0, -1):
                if text.endswith(m[:k]):
                    end = min(end, len(text) - k)
                    break
        while end > 0 and text[end - 1] == "\ufffd":
            end -= 1
        return end

    def push(self, token: int) -> str:
        if self.closed:
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        end = self._safe_end(text)
        out = text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out


def create_app(
    rm=None,
    *,
    engine: Engine | None = None,
    model_name: str = "layerroute",
    max_tokens_limit: int = 4096,
    default_max_tokens: int = 512,
    cache_sessions: int = 16,
    kv_policy: str = "kv_preserving",
    dense: bool = False,
    forced=None,
    threshold: float | None = None,
    max_queue: int = 256,
    scripted: Callable[[list[dict], list[dict]], str | None] | None = None,
    constrained: bool = True,
    prompt_lookup: int = 0,
    max_batch: int = 8,
    schedule: str = "fcfs",
    max_wait_s: float = 2.0,
    metrics: bool = True,
):
    """The FastAPI app serving `rm` (a RoutedModel with a tokenizer) or a ready `engine`.

    scripted(messages, tools) -> text | None: test/demo hook that imposes the generated text (the real
    generation path still runs; only the token choice is forced). None = the model decides.
    constrained: decode under the request's grammar (tools, tool_choice, response_format); see the module doc."""
    from contextlib import asynccontextmanager

    # FastAPI reads the handlers' annotations at definition time: this module has no `from __future__ import
    # annotations`, so `Request` below is the class, not a string it would have to resolve in module globals
    # (fastapi stays an optional dependency, imported only when an app is built)
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    if engine is None:
        if rm is None:
            raise ValueError("create_app needs a routed model or an engine")
        engine = Engine(rm, kv_policy=kv_policy, cache_sessions=cache_sessions, dense=dense, forced=forced,
                        threshold=threshold, prompt_lookup=prompt_lookup)
    server = Server(engine, model_name=model_name, max_tokens_limit=max_tokens_limit,
                    default_max_tokens=default_max_tokens, max_queue=max_queue, scripted=scripted,
                    constrained=constrained, max_batch=max_batch, schedule=schedule, max_wait_s=max_wait_s)

    @asynccontextmanager
    async def lifespan(app):
        yield
        server.close()

    app = FastAPI(title="layerroute", lifespan=lifespan)
    app.state.server = server
    app.state.engine = engine
    if metrics:
        from .metrics import ServerMetrics, StatusMiddleware

        server.metrics = ServerMetrics(queue_length=lambda: server.scheduler.queued,
                                       batch_size=lambda: server.running)
        app.add_middleware(StatusMiddleware, metrics=server.metrics)

        @app.get("/metrics")
        async def prometheus_metrics():
            from fastapi.responses import Response

            body, content_type = server.metrics.render()
            return Response(body, media_type=content_type)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                        code=code))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return _error_response(_bad(f"invalid request: {exc.errors()}"))

    @app.exception_handler(Exception)
    async def unexpected(request, exc):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _internal_error(exc)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "pending": server.pending, "running": server.running,
                "max_batch": server.max_batch, "schedule": server.scheduler.schedule, "served": server.served,
                "failed": server.failed, "cache": engine.sessions.stats(), "kv_policy": engine.kv_policy,
                "dense": engine.dense}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": model_name, "object": "model", "created": server.created, "owned_by": "layerroute"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        t0 = time.perf_counter()
        try:
            raw = await request.body()
            try:
                payload = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise _bad(f"We could not parse the JSON body of your request: {e}", code="invalid_json") from None
            job, info = server.prepare(payload)
            if info["stream"]:
                return await _stream(job, info, t0)
            fut = server.submit(job)
            try:
                c = await fut
            except asyncio.CancelledError:  # the client went away while waiting
                job.cancel.set()
                raise
            message, tool_calls, finish = server.finish(job, info, c)
            server.record(job, c, time.perf_counter() - t0)
            return JSONResponse({
                "id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", "created": int(time.time()),
                "model": model_name,
                "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
                "usage": server.usage(c),
                "layerroute": server.extension(job, c, tool_calls, time.perf_counter() - t0),
            })
        except ApiError as err:
            return _error_response(err)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the server answers every request
            server.failed += 1
            log.exception("chat completion failed")
            return _internal_error(exc)

    async def _stream(job: _Job, info: dict, t0: float):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        job.on_token = lambda tok: loop.call_soon_threadsafe(queue.put_nowait, ("token", tok))
        fut = server.submit(job)  # may raise ApiError(429) before any byte is sent
        fut.add_done_callback(lambda f: loop.call_soon_threadsafe(queue.put_nowait, ("done", None)))
        rid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
        text = _StreamText(engine.tokenizer, info["prefix"], info["parse_tools"], info["stop"])

        def chunk(delta: dict, finish=None, **extra) -> str:
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, tok = await queue.get()
                    if kind == "done":
                        break
                    piece = text.push(tok)
                    if piece:
                        yield chunk({"content": piece})
                try:
                    c = fut.result()
                except Exception as exc:  # noqa: BLE001 - reported in the stream, the server goes on
                    server.failed += 1
                    log.exception("streamed chat completion failed")
                    yield f"data: {json.dumps(_internal_error_body(exc))}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                message, tool_calls, finish = server.finish(job, info, c)
                rest = None
                if tool_calls is not None:
                    deltas = [{"index": i, "id": tc["id"], "type": "function", "function": tc["function"]}
                              for i, tc in enumerate(tool_calls)]
                    yield chunk({"tool_calls": deltas})
                else:  # everything not streamed yet (held-back text; a malformed call comes back as text)
                    rest = message["content"] if info["prefix"] else message["content"][text.emitted:]
                if rest:
                    yield chunk({"content": rest})
                server.record(job, c, time.perf_counter() - t0)
                ext = server.extension(job, c, tool_calls, time.perf_counter() - t0)
                yield chunk({}, finish, layerroute=ext)
                if info["include_usage"]:
                    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                            "choices": [], "usage": server.usage(c)}
                    yield f"data: {json.dumps(body)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                job.cancel.set()  # a no-op when finished; stops generation when the client went away

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


# -- running in a thread (tests, the agent's --spawn, benchmarks) ---------------------------------------------
class BackgroundServer:
    """uvicorn in a daemon thread on a loopback port chosen by the OS; `stop()` (or the context) shuts it down."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# -- CLI: `layerroute serve` ---------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .chat_template import add_chat_template_argument

    parser.add_argument("--model", default=None, help="model name (default: the adapter's base, else the offline one)")
    parser.add_argument("--adapter", default=None, help="adapter directory (routers + LoRA)")
    add_chat_template_argument(parser)
    parser.add_argument("--served-model-name", default=None, help="the id clients send as `model` (default: --model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask")
    parser.add_argument("--default-max-tokens", type=int, default=512, help="max_tokens when a request gives none")
    parser.add_argument("--cache-sessions", type=int, default=16, help="conversations whose KV cache is kept (LRU)")
    parser.add_argument("--kv-policy", default="kv_preserving", choices=["kv_preserving", "exact"],
                        help="kv_preserving: reuse caches across requests; exact: re-prefill every request")
    parser.add_argument("--dense", action="store_true", help="serve the plain model (no routers): the baseline")
    parser.add_argument("--skip-fraction", type=float, default=None,
                        help="force a gate pattern skipping this fraction of blocks (speed tests without training)")
    parser.add_argument("--threshold", type=float, default=None, help="router threshold (default: the adapter's)")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="requests waiting or running beyond this get 429 with Retry-After")
    parser.add_argument("--max-batch", type=int, default=8,
                        help="requests decoded together (continuous batching); 1 = one request at a time")
    parser.add_argument("--schedule", default="fcfs", choices=["fcfs", "pattern"],
                        help="which waiting request joins the batch: the oldest, or (pattern) the one whose skip "
                             "pattern adds the fewest blocks to the batch's (prefilled ahead; bounded by --max-wait)")
    parser.add_argument("--max-wait", type=float, default=2.0, metavar="S",
                        help="pattern schedule: a request waiting this long joins first (no starvation)")
    parser.add_argument("--prompt-lookup", type=int, default=0, metavar="K",
                        help="draft up to K tokens per forward from the prompt's n-grams, verified by the model "
                             "(outputs unchanged; not under a grammar; 0 = off)")
    parser.add_argument("--no-constrain", action="store_true",
                        help="decode freely: no grammar for tool calls or response_format (malformed calls possible)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--log-level", default="info")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from .errors import ConfigError
    from .generate import load_for_inference, skip_pattern

    if args.dense and args.skip_fraction is not None:
        raise ConfigError("--dense and --skip-fraction exclude each other")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rm = load_for_inference(args.model, args.adapter, args.dtype, args.device, chat_template=args.chat_template)
    if rm.tokenizer is None:
        raise ConfigError("this model has no tokenizer; serving needs one")
    forced = skip_pattern(rm.num_layers, args.skip_fraction) if args.skip_fraction is not None else None
    name = args.served_model_name or args.model or rm.identity.get("name") or "layerroute"
    app = create_app(rm, model_name=name, max_tokens_limit=args.max_tokens_limit,
                     default_max_tokens=args.default_max_tokens, cache_sessions=args.cache_sessions,
                     kv_policy=args.kv_policy, dense=args.dense, forced=forced, threshold=args.threshold,
                     max_queue=args.max_queue, constrained=not args.no_constrain, prompt_lookup=args.prompt_lookup,
                     max_batch=args.max_batch, schedule=args.schedule, max_wait_s=args.max_wait)
    log.info("serving %r on http://%s:%d/v1 (%s)", name, args.host, args.port,
             "dense" if args.dense else f"routed, {args.kv_policy}")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":  # `python -m layerroute.serve ...` (same as `layerroute serve ...`)
    import sys

    _parser = argparse.ArgumentParser(prog="layerroute serve", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))


__all__ = ["ApiError", "BackgroundServer", "Server", "create_app", "parse_messages", "parse_tools"]
