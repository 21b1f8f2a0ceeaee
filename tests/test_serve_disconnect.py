"""Clients that hang up, over real sockets (uvicorn in a thread, `BackgroundServer`): a streamed request's row
leaves the continuous batch at its next token and the streams batched with it finish with the output they have
alone; a request whose client leaves while it waits for a row is never run, and logs no error; a JSON (unstreamed)
request's row leaves too, counted as status 499. Each time the server is left with no running or waiting job
(scheduler, /health and /metrics agree) and answers the next request.

Determinism without sleeps: the test wraps the scheduler's `submit` to see each `Job` (told apart by
`max_tokens`) and pauses the scheduler thread inside a row's token callback until an event the test waits for:
the first survivor holds the batch at its 2nd token until the disconnecting request has been submitted (so all
three decode together), and the disconnecting request holds it after its 3rd token until the server has noticed
the closed socket and cancelled the job. Every wait has a deadline; nothing asserts a duration.
"""

from __future__ import annotations

import gc
import http.client
import json
import logging
import socket
import threading
import time

import pytest

from layerroute.serve import BackgroundServer, create_app
from tests.test_serve import MODEL, _metric, raw, routed_model

DEADLINE_S = 60.0
SURVIVORS = {"a": 12, "b": 16}  # name -> max_tokens (ignore_eos: each generates exactly that many)
VICTIM = 60  # max_tokens of the request whose client goes away after its 3rd token
QUEUED = 50  # max_tokens of a request whose client goes away while it waits for a row


def body(max_tokens: int, content: str) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            "layerroute": {"cache": False, "ignore_eos": True}}  # no session reuse between the lone and batched runs


PROMPTS = {"a": "Name three colours.", "b": "Count to five, slowly.", "v": "Tell me a long story about a dog.",
           "q": "And a story about a cat."}


def stream(srv, payload: dict) -> dict:
    """One streamed completion read to its end: its content, finish reasons and usage."""
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=DEADLINE_S)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(payload), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    text = resp.read().decode()
    conn.close()
    events = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    return {"content": "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]),
            "finish": finals, "usage": chunks[-1]["usage"]}


def open_stream(srv, payload: dict) -> socket.socket:
    """A raw HTTP/1.1 streaming request on its own socket (closing it is a real disconnect)."""
    data = json.dumps(payload).encode()
    sock = socket.create_connection((srv.host, srv.port), timeout=DEADLINE_S)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return sock


def read_events(sock: socket.socket, n: int) -> bytes:
    """Read from the socket until `n` server-sent events have arrived (the deadline is the socket timeout)."""
    got = b""
    while got.count(b"data: ") < n:
        part = sock.recv(4096)
        assert part, f"the server closed the stream after {got!r}"
        got += part
    return got


def hang_up(sock: socket.socket) -> None:
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def wait_for(check, what: str):
    deadline = time.monotonic() + DEADLINE_S
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        threading.Event().wait(0.01)
    return value


class Spy:
    """Wraps `scheduler.submit`: records each job by its max_tokens and runs `hooks[max_tokens](job, n)` inside
    the job's token callback (the scheduler thread), after the token went to the stream, n = tokens so far."""

    def __init__(self, scheduler, hooks: dict):
        self.jobs, self.hooks, self.submitted = {}, hooks, threading.Condition()
        self._submit = scheduler.submit
        scheduler.submit = self.submit

    def submit(self, job):
        key = job.params.max_new_tokens
        inner, count = job.on_token, [0]

        def on_token(tok):
            if inner is not None:  # a streamed request's: the token goes to its stream first
                inner(tok)
            count[0] += 1
            if key in self.hooks:
                self.hooks[key](job, count[0])

        job.on_token = on_token
        with self.submitted:
            self.jobs[key] = job
            self.submitted.notify_all()
        return self._submit(job)

    def wait_submitted(self, key: int) -> None:
        with self.submitted:
            assert self.submitted.wait_for(lambda: key in self.jobs, DEADLINE_S), f"job {key} never submitted"


def assert_idle(srv, sched) -> None:
    """No running, prefilled or waiting job is left: the scheduler, /health and /metrics say so."""
    wait_for(lambda: sched.running == 0 and sched.queued == 0, "the scheduler to empty")
    health = raw(srv, "GET", "/health")[1]
    assert health["pending"] == 0 and health["running"] == 0, health
    metrics = raw(srv, "GET", "/metrics")[1]
    assert _metric(metrics, "layerroute_running_batch_size") == 0
    assert _metric(metrics, "layerroute_queue_length") == 0


@pytest.fixture
def errors(caplog):
    """ERROR records logged anywhere while the test runs (server thread included), read after a gc pass (asyncio
    reports a future whose exception nobody retrieved when the future is collected)."""
    caplog.set_level(logging.WARNING)

    def collect():
        gc.collect()
        return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]

    return collect


def test_client_disconnect_mid_stream_frees_its_row_and_the_others_finish_unchanged(errors):
    app = create_app(routed_model(seed=1), model_name=MODEL, max_tokens_limit=64, max_batch=3)
    sched = app.state.server.scheduler
    with BackgroundServer(app) as srv:
        alone = {k: stream(srv, body(n, PROMPTS[k])) for k, n in SURVIVORS.items()}  # the reference: one at a time
        assert all(r["usage"]["completion_tokens"] == SURVIVORS[k] for k, r in alone.items())

        gone = threading.Event()

        def hold_for_victim(job, n):
            if n == 1:  # b is queued before a's 2nd token, so both decode together from there
                spy.wait_submitted(SURVIVORS["b"])
            if n == 2:  # pause the batch until the victim is queued: it joins while a and b decode
                spy.wait_submitted(VICTIM)

        def hang_until_noticed(job, n):
            if n == 3:  # the client hangs up now; the next token must not be generated for it
                gone.set()
                assert job.cancel.wait(DEADLINE_S), "the server never noticed the client went away"

        spy = Spy(sched, {SURVIVORS["a"]: hold_for_victim, VICTIM: hang_until_noticed})
        got: dict[str, dict] = {}
        threads = [threading.Thread(target=lambda k=k, n=n: got.__setitem__(k, stream(srv, body(n, PROMPTS[k]))))
                   for k, n in SURVIVORS.items()]
        for t in threads:
            t.start()
        spy.wait_submitted(SURVIVORS["a"])
        spy.wait_submitted(SURVIVORS["b"])
        sock = open_stream(srv, body(VICTIM, PROMPTS["v"]))
        read_events(sock, 2)  # the role chunk and at least one token's content
        assert gone.wait(DEADLINE_S)
        hang_up(sock)

        victim = spy.jobs[VICTIM].future.result(DEADLINE_S)
        assert victim.finish_reason == "cancelled" and len(victim.tokens) == 3  # left at its next token boundary
        assert spy.jobs[VICTIM].order > 0  # it had a row in the batch (not refused while waiting)
        for t in threads:
            t.join(DEADLINE_S)
        assert got == alone  # token for token what each stream has alone, finished in full
        assert_idle(srv, sched)
        assert stream(srv, body(5, PROMPTS["a"]))["usage"]["completion_tokens"] == 5  # and it serves on
    assert errors() == []


def test_client_disconnect_while_waiting_for_a_row_is_not_run_and_logs_no_error(errors):
    app = create_app(routed_model(seed=1), model_name=MODEL, max_tokens_limit=64, max_batch=2)
    sched = app.state.server.scheduler
    with BackgroundServer(app) as srv:
        alone = {k: stream(srv, body(n, PROMPTS[k])) for k, n in SURVIVORS.items()}
        queued_seen = threading.Event()

        def hold_until_queued_one_left(job, n):
            if n == 1:  # b is queued before a's 2nd token: the batch (2 rows) is full from there
                spy.wait_submitted(SURVIVORS["b"])
            if n == 3:  # the batch is full (a, b): the queued request waits; its client hangs up meanwhile
                spy.wait_submitted(QUEUED)
                queued_seen.set()
                assert spy.jobs[QUEUED].cancel.wait(DEADLINE_S), "the server never noticed the client went away"

        spy = Spy(sched, {SURVIVORS["a"]: hold_until_queued_one_left})
        got: dict[str, dict] = {}
        threads = [threading.Thread(target=lambda k=k, n=n: got.__setitem__(k, stream(srv, body(n, PROMPTS[k]))))
                   for k, n in SURVIVORS.items()]
        for t in threads:
            t.start()
        spy.wait_submitted(SURVIVORS["a"])
        spy.wait_submitted(SURVIVORS["b"])
        sock = open_stream(srv, body(QUEUED, PROMPTS["q"]))
        read_events(sock, 1)  # the role chunk: the stream is open, the request waits for a row
        assert queued_seen.wait(DEADLINE_S)
        hang_up(sock)

        for t in threads:
            t.join(DEADLINE_S)
        assert got == alone
        job = spy.jobs[QUEUED]
        wait_for(job.future.done, "the queued request to be answered")
        assert job.order == 0  # it never took a row
        assert_idle(srv, sched)
    del job
    spy.jobs.clear()  # the last references to its futures: collected now, asyncio reports an unread exception
    assert errors() == []


def test_client_disconnect_during_a_json_request_frees_its_row(errors):
    """Without streaming, nothing is written until the end: the handler listens for the disconnect itself."""
    app = create_app(routed_model(seed=1), model_name=MODEL, max_tokens_limit=64, max_batch=3)
    sched = app.state.server.scheduler
    with BackgroundServer(app) as srv:
        gone = threading.Event()

        def hang_until_noticed(job, n):
            if n == 3:
                gone.set()
                assert job.cancel.wait(DEADLINE_S), "the server never noticed the client went away"

        spy = Spy(sched, {VICTIM: hang_until_noticed})
        sock = open_stream(srv, {**body(VICTIM, PROMPTS["v"]), "stream": False, "stream_options": None})
        assert gone.wait(DEADLINE_S)
        hang_up(sock)
        victim = spy.jobs[VICTIM].future.result(DEADLINE_S)
        assert victim.finish_reason == "cancelled" and len(victim.tokens) == 3
        assert_idle(srv, sched)
        def chat_requests(status: str) -> float:
            text = raw(srv, "GET", "/metrics")[1]
            return _metric(text, "layerroute_requests_total", f'endpoint="/v1/chat/completions",status="{status}"')

        wait_for(lambda: chat_requests("499") == 1, "the hung-up request to be counted as 499")
        assert chat_requests("200") == 0
        assert stream(srv, body(5, PROMPTS["a"]))["usage"]["completion_tokens"] == 5
    assert errors() == []
