"""The server's Prometheus metrics (``GET /metrics``, text exposition format), through `prometheus_client`.

One `ServerMetrics` per app with its own registry (not the process-global one), so several servers in one process
(tests, benchmarks) keep separate counts. Names follow vLLM's and TGI's where they mean the same thing
(``*_tokens_total``, ``time_to_first_token_seconds``, ``inter_token_latency_seconds``) under a ``layerroute_``
prefix. What each costs: a counter increment or a histogram observation per request, and one observation per
generated token for the inter-token latency (a few microseconds against milliseconds of decode).
"""

from __future__ import annotations

from collections.abc import Callable

# latency buckets in seconds: a CPU decode step is 5-100 ms, a first token 0.05-10 s under load
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


def _client():
    try:
        import prometheus_client
    except ImportError as e:  # an optional dependency of the serve extra
        raise ImportError("GET /metrics needs the 'prometheus_client' package: pip install 'layerroute[serve]' "
                          "(or pip install prometheus_client)") from e
    return prometheus_client


class ServerMetrics:
    """Counters, gauges and histograms of one server. `queue_length` and `batch_size` are read when scraped."""

    def __init__(self, queue_length: Callable[[], float], batch_size: Callable[[], float]):
        pc = _client()
        self._pc = pc
        self.registry = reg = pc.CollectorRegistry()
        p = "layerroute_"
        self.requests = pc.Counter(p + "requests", "HTTP requests answered, by endpoint and status code",
                                   ["endpoint", "status"], registry=reg)
        self.finished = pc.Counter(p + "request_finished", "Chat completions generated, by finish reason",
                                   ["finish_reason"], registry=reg)
        self.queue = pc.Gauge(p + "queue_length", "Requests waiting for a place in the running batch", registry=reg)
        self.queue.set_function(queue_length)
        self.running = pc.Gauge(p + "running_batch_size", "Requests decoding in the running batch", registry=reg)
        self.running.set_function(batch_size)
        self.ttft = pc.Histogram(p + "time_to_first_token_seconds", "From the start of a request's prefill to its "
                                 "first token (queue wait excluded: see queue_time_seconds)", buckets=_TTFT_BUCKETS,
                                 registry=reg)
        self.itl = pc.Histogram(p + "inter_token_latency_seconds", "Time between consecutive generated tokens of a "
                                "request", buckets=_ITL_BUCKETS, registry=reg)
        self.queue_time = pc.Histogram(p + "queue_time_seconds", "Time a request waited before its prefill",
                                       buckets=_TTFT_BUCKETS, registry=reg)
        self.latency = pc.Histogram(p + "e2e_request_latency_seconds", "Whole chat completion, received to answered",
                                    buckets=_LATENCY_BUCKETS, registry=reg)
        self.prompt_tokens = pc.Counter(p + "prompt_tokens", "Prompt tokens of generated requests", registry=reg)
        self.cached_tokens = pc.Counter(p + "prompt_tokens_cached", "Prompt tokens served from a session's KV cache",
                                        registry=reg)
        self.generated = pc.Counter(p + "generation_tokens", "Generated tokens", registry=reg)
        # per request, the blocks its step ran / skipped (a block skipped for a 40-token answer counts once)
        self.blocks_run = pc.Counter(p + "blocks_run", "Blocks run, summed over requests", registry=reg)
        self.blocks_skipped = pc.Counter(p + "blocks_skipped", "Blocks skipped, summed over requests", registry=reg)
        self.cache = pc.Counter(p + "session_cache", "Session KV-cache lookups by result (hit: the prompt extended "
                                "a kept conversation)", ["result"], registry=reg)
        self.rejected = pc.Counter(p + "queue_rejected", "Requests answered 429 because the queue was full",
                                   registry=reg)

    def observe_completion(self, c) -> None:
        """Record one finished `engine.Completion`."""
        self.finished.labels(c.finish_reason).inc()
        self.prompt_tokens.inc(c.prompt_tokens)
        self.cached_tokens.inc(c.cached_tokens)
        self.generated.inc(len(c.content_tokens))
        run = sum(1 for g in c.gates if g)
        self.blocks_run.inc(run)
        self.blocks_skipped.inc(len(c.gates) - run)
        self.cache.labels("hit" if c.cache.get("reused") else "miss").inc()
        if c.timings.get("ttft_s") is not None:
            self.ttft.observe(max(0.0, c.timings["ttft_s"]))
        times = c.token_times
        for a, b in zip(times, times[1:], strict=False):
            self.itl.observe(max(0.0, b - a))

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the text exposition format."""
        return self._pc.generate_latest(self.registry), self._pc.CONTENT_TYPE_LATEST


def endpoint_label(path: str) -> str:
    """A bounded label for a request path (unknown paths share one label, so a scanner cannot grow the series)."""
    known = ("/v1/chat/completions", "/v1/models", "/health", "/metrics")
    return path if path in known else "other"


class StatusMiddleware:
    """ASGI middleware counting every HTTP response by endpoint and status (streamed ones at their start)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        label = endpoint_label(scope.get("path", ""))

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(label, str(message["status"])).inc()
            await send(message)

        return await self.app(scope, receive, counting_send)


__all__ = ["ServerMetrics", "StatusMiddleware", "endpoint_label"]
