"""`create_app`: the FastAPI app around one `Server`, one function per group of routes: `add_error_handlers` (the
API's error shape for every error), `add_metrics_route` (/metrics), `add_info_routes` (health, models) and
`add_chat_route` (chat completions, JSON or a server-sent event stream: `chat_json`, `chat_stream`).

FastAPI reads the handlers' annotations at definition time: this module has no `from __future__ import annotations`,
so `Request` in a handler is the class, not a string to resolve in module globals (fastapi stays an optional
dependency, imported only when an app is built)."""

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable

from .batch_jobs import Job as _Job
from .engine import Engine
from .schema import ApiError, _bad, _error_response, _internal_error, _internal_error_body
from .server import Server
from .stream import _StreamText

log = logging.getLogger("layerroute.serve")


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
    drafts=None,
    max_batch: int = 8,
    schedule: str = "fcfs",
    max_wait_s: float = 2.0,
    prefill_thread: bool = False,
    metrics: bool = True,
):
    """The FastAPI app serving `rm` (a RoutedModel with a tokenizer) or a ready `engine`.

    scripted(messages, tools) -> text | None: test/demo hook that imposes the generated text (the real
    generation path still runs; only the token choice is forced). None = the model decides.
    constrained: decode under the request's grammar (tools, tool_choice, response_format); see the package doc."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    if engine is None:
        if rm is None:
            raise ValueError("create_app needs a routed model or an engine")
        engine = Engine(rm, kv_policy=kv_policy, cache_sessions=cache_sessions, dense=dense, forced=forced,
                        threshold=threshold, prompt_lookup=prompt_lookup, drafts=drafts)
    server = Server(engine, model_name=model_name, max_tokens_limit=max_tokens_limit,
                    default_max_tokens=default_max_tokens, max_queue=max_queue, scripted=scripted,
                    constrained=constrained, max_batch=max_batch, schedule=schedule, max_wait_s=max_wait_s,
                    prefill_thread=prefill_thread)

    @asynccontextmanager
    async def lifespan(app):
        yield
        server.close()

    app = FastAPI(title="layerroute", lifespan=lifespan)
    app.state.server = server
    app.state.engine = engine
    if metrics:
        add_metrics_route(app, server)
    add_error_handlers(app)
    add_info_routes(app, server, model_name)
    add_chat_route(app, server, model_name)
    return app


def add_metrics_route(app, server: Server) -> None:
    """GET /metrics (Prometheus text format) and the middleware that counts every response by status."""
    from fastapi.responses import Response

    from .metrics import ServerMetrics, StatusMiddleware

    server.metrics = ServerMetrics(queue_length=lambda: server.scheduler.queued, batch_size=lambda: server.running)
    app.add_middleware(StatusMiddleware, metrics=server.metrics)

    @app.get("/metrics")
    async def prometheus_metrics():
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)


def add_error_handlers(app) -> None:
    """The API's error shape for routing errors (404, 405), invalid requests and anything unexpected (500)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

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


def add_info_routes(app, server: Server, model_name: str) -> None:
    """GET /health (queue, batch, cache and policy state) and GET /v1/models."""
    engine = server.engine

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "pending": server.pending, "running": server.running,
                "max_batch": server.max_batch, "schedule": server.scheduler.schedule, "served": server.served,
                "failed": server.failed, "cache": engine.sessions.stats(), "kv_policy": engine.kv_policy,
                "dense": engine.dense, "prefill_thread": server.scheduler.prefill_thread is not None}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": model_name, "object": "model", "created": server.created, "owned_by": "layerroute"}]}


def add_chat_route(app, server: Server, model_name: str) -> None:
    """POST /v1/chat/completions: the request validated into a job, answered as JSON (`chat_json`) or as a stream
    of server-sent events (`chat_stream`); 4xx in the API's shape for the client's mistakes, 500 for the rest."""
    from fastapi import Request

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
                return await chat_stream(server, model_name, job, info, t0)
            return await chat_json(server, model_name, request, job, info, t0)
        except ApiError as err:
            return _error_response(err)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the server answers every request
            server.failed += 1
            log.exception("chat completion failed")
            return _internal_error(exc)


async def chat_json(server: Server, model_name: str, request, job: _Job, info: dict, t0: float):
    """One chat completion answered as one JSON body; a client that hangs up first frees its row (499)."""
    from fastapi.responses import JSONResponse, Response

    fut = server.submit(job)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        # not `await fut`: nothing here would notice a client that hangs up, and its request would hold a
        # row of the batch to its last token for nobody (measured: 60 of 60 tokens generated after the
        # socket closed). asyncio.wait also leaves `fut` alone when this handler is cancelled.
        done, _ = await asyncio.wait({fut, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server is shutting down
        job.cancel.set()
        raise
    finally:
        gone.cancel()
    if fut not in done:  # the client went away: its row leaves the batch at the next token
        job.cancel.set()
        return Response(status_code=499)  # nginx's "client closed request"; sent to nobody, counted
    c = fut.result()
    message, tool_calls, finish = server.finish(job, info, c)
    server.record(job, c, time.perf_counter() - t0)
    return JSONResponse({
        "id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", "created": int(time.time()),
        "model": model_name,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": server.usage(c),
        "layerroute": server.extension(job, c, tool_calls, time.perf_counter() - t0),
    })


async def _disconnected(request) -> None:
    """Returns once the client has hung up: with the body read, the next ASGI message of the request is
    http.disconnect (the way StreamingResponse listens for it)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def chat_stream(server: Server, model_name: str, job: _Job, info: dict, t0: float):
    """One chat completion as server-sent events: the role, the text as it comes (held back where it may still
    become a tool call or a stop string), the tool calls or the rest, the extension, usage, [DONE]."""
    from fastapi.responses import StreamingResponse

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    job.on_token = lambda tok: loop.call_soon_threadsafe(queue.put_nowait, ("token", tok))
    fut = server.submit(job)  # may raise ApiError(429) before any byte is sent
    fut.add_done_callback(lambda f: loop.call_soon_threadsafe(queue.put_nowait, ("done", None)))
    rid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
    text = _StreamText(server.engine.tokenizer, info["prefix"], info["parse_tools"], info["stop"])

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
