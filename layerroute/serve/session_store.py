"""The serving engine's prefix cache: finished requests' KV caches and routing running sums (`CachedSession`), kept in
LRU order (`SessionStore`) for a later request whose prompt extends one's tokens.

Sessions (the ``kv_preserving`` policy)
---------------------------------------
An agent resends its whole conversation every request. Each finished request leaves a `CachedSession`: its KV
cache (prompt + generated tokens, the last generated one excepted: it was never fed back) and, per routed block, the
running sum and count of the hidden states that entered the block (`RoutedLayer.pool_sum` / `pool_count`)
at two checkpoints: the end of the prompt and the end of the cache.
A new request whose prompt extends a session's tokens past a checkpoint reuses it: the cache is cropped to
the checkpoint, the running sums are restored, and only the new tokens are prefilled. The routers then decide
from the running sums, i.e. from the mean over the *whole* context, exactly as without a cache, but the cached
positions keep the hidden states and K/V they got under the earlier steps' gates: that is what
``kv_preserving`` means (each skipped block wrote K/V for its tokens, so every block's cache is complete).
With every gate open it is the plain model with a prefix cache: same tokens as a fresh prefill.

The running sums cannot be rewound, so a routed session is reusable only at its two checkpoints; the dense
model (no routers) can reuse any common prefix. Under the ``exact`` policy a skipped block writes no K/V, so
nothing is reused (each request re-prefills its context with its own decisions). Sessions are kept in LRU
order, at most `cache_sessions` of them; a reused session is taken out of the store (its cache grows in
place) and put back under its new tokens, so memory stays bounded by the count times the context length.

A `CachedSession` is one finished request's cache, not a conversation (that is `layerroute.infer.session.Session`).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..nn.kv_cache import RoutedCache

Pools = list  # per routed block: (sum [1, H] float32, count [1, 1]) or None


@dataclass
class CachedSession:
    """A finished request's KV cache and routing running sums, reusable by a request that extends its tokens."""

    ids: list[int]  # the tokens in the cache (prompt + generated, the last generated token excepted)
    cache: RoutedCache
    checkpoints: dict[int, Pools | None]  # length -> the running sums after that many tokens (None: dense)
    key: str = ""
    last_used: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        total = 0
        for layer in self.cache.layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total


def token_key(ids: list[int]) -> str:
    """A short hash of a token sequence (the session store's key)."""
    return hashlib.sha1(torch.tensor(ids, dtype=torch.int64).numpy().tobytes()).hexdigest()[:20]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    eq = torch.tensor(a[:n]) == torch.tensor(b[:n])
    return n if bool(eq.all()) else int((~eq).nonzero()[0])


class SessionStore:
    """At most `capacity` sessions in LRU order; `take` removes the best one for a prompt."""

    def __init__(self, capacity: int, any_prefix: bool):
        self.capacity = max(0, int(capacity))
        self.any_prefix = any_prefix  # dense model: every prefix is a checkpoint
        self._items: OrderedDict[str, CachedSession] = OrderedDict()
        self.hits = self.misses = self.evictions = 0
        self._lock = threading.Lock()  # a prefill thread takes sessions while the decode thread stores them

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._items.values())

    def usable(self, session: CachedSession, prompt: list[int]) -> int:
        """The longest prefix of `prompt` this session can serve (0: none). At least one token must be new."""
        c = min(common_prefix(session.ids, prompt), len(prompt) - 1)
        if self.any_prefix:
            return c
        return max((k for k in session.checkpoints if k <= c), default=0)

    def take(self, prompt: list[int]) -> tuple[CachedSession | None, int]:
        """Remove and return the session serving the longest prefix of `prompt`, with that prefix length."""
        with self._lock:
            best, best_len = None, 0
            for key, s in self._items.items():
                n = self.usable(s, prompt)
                if n > best_len:
                    best, best_len = key, n
            if best is None:
                self.misses += 1
                return None, 0
            self.hits += 1
            return self._items.pop(best), best_len

    def put(self, session: CachedSession) -> None:
        if self.capacity == 0:
            return
        session.key = token_key(session.ids)
        session.last_used = time.monotonic()
        with self._lock:
            self._items.pop(session.key, None)
            self._items[session.key] = session
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
                self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def stats(self) -> dict:
        with self._lock:
            return {
                "sessions": len(self), "capacity": self.capacity, "bytes": self.nbytes, "hits": self.hits,
                "misses": self.misses, "evictions": self.evictions,
            }
