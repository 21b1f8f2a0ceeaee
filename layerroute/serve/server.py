"""`Server`: request validation into a scheduler `Job`, the bounded queue in front of the continuous-batching
`Scheduler` (429 with Retry-After), and the response's message, tool calls, usage and ``layerroute`` extension."""

import asyncio
import json
import math
import time
import uuid
from collections.abc import Callable
from typing import Any

from ..data.render import RenderError
from ..data.toolcalls import parse_tool_calls
from ..infer.stop import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP
from .batch_jobs import Job as _Job
from .engine import Completion, Engine, SamplingParams
from .scheduler import Scheduler
from .schema import (
    ApiError,
    _bad,
    _expect,
    _reject_unsupported,
    _type_name,
    parse_messages,
    parse_tools,
    tool_choice_prefix,
)


class Server:
    """Validation, the generation queue and response formatting around one `Engine`."""

    def __init__(self, engine: Engine, *, model_name: str, max_tokens_limit: int = 4096, default_max_tokens: int = 512,
                 max_queue: int = 256, scripted: Callable[[list[dict], list[dict]], str | None] | None = None,
                 constrained: bool = True, max_batch: int = 8, schedule: str = "fcfs", max_wait_s: float = 2.0,
                 prefill_thread: bool = False):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}")
        self.engine, self.model_name = engine, model_name
        self.constrained = constrained
        self.max_tokens_limit, self.default_max_tokens, self.max_queue = max_tokens_limit, default_max_tokens, max_queue
        self.scripted = scripted
        self.created = int(time.time())
        self.max_batch = max_batch
        # continuous batching (layerroute.serve.scheduler)
        self.scheduler = Scheduler(engine, max_batch=max_batch, schedule=schedule, max_wait_s=max_wait_s,
                                   prefill_thread=prefill_thread)
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
        from ..infer.constrain import GrammarError

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

        def done(f: asyncio.Future):
            self.pending -= 1
            # Mark the outcome read. A handler whose client is still there reads it itself; when the client hung
            # up first (a stream cancelled, a request dropped while it waited: ClientGone), nobody does, and
            # asyncio would log "Future exception was never retrieved" as an ERROR when the future is collected.
            # Real failures are logged where they happen (the scheduler, the handlers).
            if not f.cancelled():
                f.exception()

        fut.add_done_callback(done)
        return fut

    # -- responses --------------------------------------------------------------------------------------
    def finish(self, job: _Job, info: dict, c: Completion) -> tuple[dict, list[dict] | None, str]:
        """(assistant message, tool_calls or None, finish_reason) for a completion."""
        text = info["prefix"] + c.text
        if info["parse_tools"] and c.finish_reason != FINISH_CANCELLED:
            # a turn cut by its budget keeps the calls it completed (finish_reason stays "length"): an agent that
            # repeats calls until the budget cuts the last one loses only that one
            length = c.finish_reason == FINISH_LENGTH
            calls, remaining, error = parse_tool_calls(text, cut=length)
            if calls and error is None:
                tool_calls = [
                    {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                     "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
                    for call in calls
                ]
                return {"role": "assistant", "content": remaining or None, "tool_calls": tool_calls}, tool_calls, \
                    FINISH_LENGTH if length else "tool_calls"
        finish = FINISH_STOP if c.finish_reason == FINISH_CANCELLED else c.finish_reason  # the API has no cancelled
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
            # per drafter (drafted, accepted), the request's forwards (the prefill's included) and generated tokens
            # (the end-of-turn token included; usage leaves it out): tokens per forward = tokens / forwards
            **({"drafts": {**c.drafts, "forwards": c.timings.get("forwards"), "tokens": len(c.tokens)}}
               if c.timings.get("drafting") else {}),
            "timings": {"queue_s": job.queue_s, **c.timings, "total_s": total_s},
        }

    def usage(self, c: Completion) -> dict:
        return {"prompt_tokens": c.prompt_tokens, "completion_tokens": len(c.content_tokens),
                "total_tokens": c.prompt_tokens + len(c.content_tokens),
                "prompt_tokens_details": {"cached_tokens": c.cached_tokens}}
