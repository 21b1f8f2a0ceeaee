"""What the continuous-batching scheduler (`layerroute.serve.scheduler`) holds per request: the validated request waiting
for a row (`Job`: its inputs and where its tokens and answer go) and its row in the running batch (`_Row`: its
cache length, gates, sampling state, tokens so far and how it finished)."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from dataclasses import dataclass, field

import torch

from .engine import SamplingParams


class ClientGone(Exception):
    """A queued request whose client disconnected before it ran (not generated)."""


@dataclass
class Job:
    """A validated request waiting for, or holding, a row: its inputs and where its tokens go."""

    prompt: list[int]
    params: SamplingParams
    reuse: bool = True
    scripted_text: str | None = None
    on_token: object | None = None  # callable(int) per generated token (streaming)
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)
    queue_s: float = 0.0
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    order: int = 0  # 1 + how many requests took a row before this one (0: not batched)


@dataclass
class _Row:
    """A request in the running batch."""

    job: Job
    processor: object | None  # LogitsProcessorList for this row, or None
    generator: torch.Generator | None  # sampling with a seed
    cached: int  # prompt tokens served from a session
    reused: bool
    length: int  # tokens in this row's cache (the real, right-aligned columns of the batch cache)
    gates: list[bool] | None
    probs: list[float]
    logits: list[float]
    at_prompt: list | None  # running sums after the prefill (session checkpoint)
    start: float
    new: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    forwards: int = 1
    finish: str | None = None
    error: Exception | None = None  # this row failed alone (its logits processor or stream callback raised)

