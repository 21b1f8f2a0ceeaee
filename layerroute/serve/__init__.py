"""An OpenAI-compatible chat endpoint for a routed model, with tools.

    layerroute serve --model smollm2-135m-instruct [--adapter DIR] [--host 127.0.0.1 --port 8000]

Endpoints: ``POST /v1/chat/completions`` (messages, tools, tool_choice, max_tokens / max_completion_tokens,
temperature, top_p, stop, seed, stream with stream_options.include_usage), ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus text format, `layerroute.serve.metrics`: requests by status, queue length, running batch
size, time to first token and inter-token latency histograms, prompt / generated tokens, blocks run and skipped,
session-cache hits).

* Tool calls the model writes (Hermes/Qwen ``<tool_call>{json}</tool_call>``) come back in ``tool_calls``
  (``call_...`` ids, type function, arguments as a JSON string) with finish_reason ``tool_calls``. A call that
  does not parse comes back as plain text content (finish_reason ``stop``), never as an error. A turn cut by
  ``max_tokens`` keeps the calls it completed (finish_reason ``length``; the call the budget cut is dropped).
  ``tool_choice``: ``auto`` (default), ``none`` (the tools are not shown and the output is not parsed),
  ``required`` or a named function; ``parallel_tool_calls: false`` allows one call at most.
* Constrained decoding (default; ``--no-constrain`` turns it off): every step decodes under a grammar
  (`layerroute.infer.constrain`, xgrammar) built from the request, so a call always parses, names one of the request's
  tools and has arguments valid under its parameter schema: ``auto`` = free text, and any call it opens is
  well formed; ``required`` = one or more calls and nothing else; a named function = calls of it only;
  ``none`` = text that never opens a call. Under a budget: once the tokens left approach what the shortest way
  to a valid end needs, only tokens that keep it within reach are allowed (the budget rule of
  `layerroute.infer.constrain.GrammarLogitsProcessor`), so a call or a JSON answer is complete whenever
  ``max_tokens`` holds the shortest valid one (greedy; a sampled request is checked within 32 tokens of its
  end); below that the answer is cut.
  ``response_format`` ``{"type": "json_object"}`` or ``{"type":
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
* Continuous batching (`layerroute.serve.scheduler`): up to ``--max-batch`` requests decode together, each with its own
  routing decisions, stop conditions, sampling settings and stream; a newcomer joins at the next token (its prompt
  prefilled alone, then decoded with the others) and a finished request leaves at once; so does one whose client
  hangs up (streamed or not: the handler listens for the disconnect; an unstreamed one is counted as 499). Requests
  wait FIFO for a place; with ``--max-queue`` requests already waiting, a new one gets 429 with ``Retry-After``.

Deviations from the OpenAI API: no ``temperature`` means greedy decoding (deterministic agent steps), not 1.0;
``n`` must be 1; ``logprobs`` and penalties are not supported (rejected or ignored as noted in
`schema._reject_unsupported`).

Modules (one job each; this package re-exports their names, so `from layerroute.serve import ...` works):

- ``schema``: request validation (messages, tools, tool_choice, unsupported fields), `ApiError` and the error shapes.
- ``server``: `Server`: a request into a scheduler `Job`, the bounded queue (429), the response body and extension.
- ``stream``: the streamed text of a completion, holding back what may still become a tool call or a stop string.
- ``app``: `create_app`: the FastAPI app, one function per group of routes (errors, metrics, health and models,
  chat completions as JSON or streamed).
- ``background``: `BackgroundServer`: uvicorn in a thread (tests, the agent's --spawn, benchmarks).
- ``cli``: `layerroute serve` / `python -m layerroute.serve` flags and entry point.
- ``engine``: `Engine`: one routed model behind the server (rendering, KV-cache sessions, generation, accounting).
- ``session_store``: the engine's prefix cache (`CachedSession`, `SessionStore`: which finished request a new one may
  extend, LRU).
- ``scheduler``: continuous batching: requests join the running batch at token boundaries and leave when done.
- ``admission``: which prefilled request takes a free row (`ADMISSIONS`: ``fcfs``, ``pattern``; one class each).
- ``prefill``: a request's prefill alone (optionally on its own thread and replica), ready to join the batch.
- ``batch_jobs``: what the scheduler holds per request (`Job`, its row in the batch).
- ``metrics``: `ServerMetrics`: the Prometheus metrics of ``GET /metrics``.
- ``agent``: `layerroute agent`: a BFCL multi-turn agent loop against a server (a client of this package).
"""

from .app import create_app
from .background import BackgroundServer
from .cli import add_arguments, run
from .schema import ROLE_ALIASES, ROLES, ApiError, parse_messages, parse_tools, tool_choice_prefix
from .server import Server
from .stream import TOOL_TAGS

__all__ = [
    "ROLES", "ROLE_ALIASES", "TOOL_TAGS", "ApiError", "BackgroundServer", "Server", "add_arguments", "create_app",
    "parse_messages", "parse_tools", "run", "tool_choice_prefix",
]
