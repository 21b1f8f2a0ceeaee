"""Continuous batching for the server: requests join the running batch at token boundaries and leave when done.

One scheduler thread owns the model (`Engine`). Each turn of its loop, under the engine's lock:

1. **Admit.** While the batch has room (``max_batch``), a waiting request is prefilled *alone* (batch 1: its own
   routing decision per block from its own context, exactly as a lone request, a kept session's cache and running
   sums reused the same way; `layerroute.serve.prefill`) and its first token chosen; then its cache is merged into the
   batch's cache. With ``prefill_thread`` the prefill runs on a second thread, on a module tree that shares the
   weights (`layerroute.serve.prefill.side_replica`), while this loop keeps decoding; prefilled requests wait in ``ready``.
2. **Decode.** One forward of every running row's last token. Each block runs on the rows that run it
   (`RoutedLayer._forward_rows`, as `layerroute.infer.batched` does for evaluation): the per-row decisions are held here
   and handed to the routed layers for each forward, so a row keeps its own gates for its whole turn.
3. **Leave.** A row that chose an end-of-turn token, hit a stop string, its ``max_tokens`` or was cancelled (its
   client went away) is answered and dropped at once: its cache rows, decisions and running sums are gathered away,
   and leading cache columns that no remaining row uses are cut.

Rows of different lengths share the cache by left padding (the attention mask hides the pad, positions count from
each row's first token), as in `generate_batched`; greedy outputs equal a lone run's token for token up to float
rounding from the batch shape (tests/test_scheduler.py checks equality on the tiny fp32 models).

Per row: the request's stop tokens and strings, ``max_tokens``, ``ignore_eos``, a grammar or scripted-text logits
processor (called with that row's ids ``[1, T]``), greedy or sampled decoding (temperature, top_p; a seeded request
gets its own generator, so a seed reproduces on a lone run of this engine, not across batch compositions of HF's
generate), streaming (``on_token`` per token). A finished row leaves a session (its own cache rows, its running
sums at the prompt's end and at the cache's end), so the next request of the conversation reuses it.

What costs: the merge copies the batch's cache once per newcomer (``O(B * T)`` per layer) and a row's leaving
gathers it once; both are per request, not per token. A decode step writes its K/V in place (`layerroute.nn.kv_cache`:
concatenating copied the whole cache every step: a batch-8 step 7% slower). Without a prefill thread a newcomer's
prefill runs while the batch waits, so a long prompt delays the running rows' next token by its prefill time; with
one, prefill and decode share the CPU instead (on SmolLM2 bf16, a decode step 79 -> 99 ms and a prefill 215 -> 264 ms
when they overlap; `benchmarks/prefill_decode_overlap.py`).

Admission order (``schedule``): a policy class of `layerroute.serve.admission` (``fcfs``: the oldest waiting
request; ``pattern``: among up to ``lookahead`` requests prefilled ahead, the one whose routing decisions add the
fewest blocks to those the batch runs, a request waiting ``max_wait_s`` first). Prefilled requests hold their KV
cache while they wait; a request's time to first token counts the wait.

Prompt-lookup drafting (``Engine.prompt_lookup``) and lossless drafts (``Engine.drafts``) need a batch of one: a
request that arrives while nothing else runs or waits goes through `Engine.generate` alone, with drafts; a batched
row decodes without drafts (on this CPU a verification forward of a few tokens costs ~1.6x a one-token forward,
about what a second batch row costs, so a full batch gains little from drafting its rows; not measured).

A request's records, `Job` (waiting) and `_Row` (in the batch), live in `layerroute.serve.batch_jobs`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from contextlib import ExitStack

import torch
import torch.nn.functional as F
from transformers import TopPLogitsWarper

from ..infer.generate import synchronize
from ..infer.stop import FINISH_CANCELLED, FINISH_ERROR
from ..nn.kv_cache import RoutedCache
from ..nn.routed import routing
from ..nn.state import Decisions
from .admission import ADMISSIONS
from .batch_jobs import ClientGone, Job, _Row
from .engine import Completion, Engine
from .prefill import own_replica, prefill_alone, side_replica

log = logging.getLogger(__name__)


SCHEDULES = tuple(ADMISSIONS)  # the admission policies' names (`layerroute.serve.admission`)


class Scheduler:
    """The continuous-batching loop around one `Engine` (see the module doc). `submit` is thread-safe."""

    def __init__(self, engine: Engine, max_batch: int = 8, *, schedule: str = "fcfs", max_wait_s: float = 2.0,
                 lookahead: int | None = None, prefill_thread: bool = False):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if schedule not in ADMISSIONS:
            raise ValueError(f"schedule must be one of {SCHEDULES}, not {schedule!r}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.engine, self.max_batch, self.schedule, self.max_wait_s = engine, max_batch, schedule, max_wait_s
        self.admission = ADMISSIONS[schedule]()
        # pattern schedule: requests prefilled ahead (their decisions known), waiting for a place in the batch
        self.lookahead = max(1, lookahead if lookahead is not None else max_batch)
        self.ready: list[tuple] = []  # (row, cache, first logits, decisions, running sums) from `_prefill`
        self.admitted = 0  # requests that took a row so far (Job.order)
        self.waiting: deque[Job] = deque()
        self.rows: list[_Row] = []
        self._wake = threading.Condition()
        self._stop = False
        self._admitting: Job | None = None  # popped from the queue, not yet a row (answered if the turn fails)
        self._reset_batch()
        cfg = engine.rm.config
        attn = next(m for m in engine.model.modules() if hasattr(m, "head_dim") and hasattr(m, "k_proj"))
        self._kv_shape = (int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads), int(attn.head_dim))
        self._dtype = next(engine.model.parameters()).dtype
        self.forwards = 0  # decode forwards run (all rows together)
        self._own = own_replica(engine)
        # prefill thread: newcomers are prefilled on a second module tree (shared weights) while the batch decodes
        # (not with max_batch 1 or prompt lookup: those run requests alone, where the prefill has nothing to overlap)
        self._side = None
        if prefill_thread and max_batch > 1 and not (engine.prompt_lookup or engine.drafts):
            self._side = side_replica(engine)
            if self._side is None:
                log.warning("no prefill thread: last_turn pooling's hook writes the engine's own routing state")
        self.prefill_thread = None
        if self._side is not None:
            self.prefill_thread = threading.Thread(target=self._prefill_loop, name="layerroute-prefill", daemon=True)
            self.prefill_thread.start()
        self.thread = threading.Thread(target=self._loop, name="layerroute-batch", daemon=True)
        self.thread.start()

    @property
    def running(self) -> int:
        return len(self.rows)

    @property
    def queued(self) -> int:
        """Requests without a row: waiting, or prefilled ahead by the pattern schedule."""
        return len(self.waiting) + len(self.ready)

    def submit(self, job: Job) -> concurrent.futures.Future:
        # Running from here on: `future.cancel()` (what asyncio does to a wrapped future when the task awaiting it
        # is cancelled) returns False instead of cancelling, else the loop's later set_result / set_exception would
        # raise InvalidStateError and fail every row of the batch. A caller stops a job with `job.cancel`.
        job.future.set_running_or_notify_cancel()
        with self._wake:
            self.waiting.append(job)
            self._wake.notify_all()
        return job.future

    def close(self, timeout: float = 30.0) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        self.thread.join(timeout)
        if self.prefill_thread is not None:
            self.prefill_thread.join(timeout)
        for job in [*self.waiting, *(r.job for r in self.rows), *(c[0].job for c in self.ready)]:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))

    # -- the loop -------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:  # with a prefill thread, waiting requests are its work, not this loop's
                while not self._stop and not self.rows and not self.ready and (self._side is not None or not self.waiting):
                    self._wake.wait()
                if self._stop:
                    return
            with self.engine.lock:
                try:
                    self._turn()
                except Exception as exc:  # noqa: BLE001 - a failed decode fails its rows; the loop goes on
                    log.exception("batched decode failed; %d rows answered with the error", len(self.rows))
                    jobs = [r.job for r in self.rows] + ([self._admitting] if self._admitting is not None else [])
                    for job in jobs:
                        if not job.future.done():
                            job.future.set_exception(exc)
                    self.rows = []
                    self._reset_batch()
                finally:
                    self._admitting = None

    def _next_job(self) -> Job | None:
        with self._wake:
            self._admitting = self.waiting.popleft() if self.waiting else None
            return self._admitting

    def _turn(self) -> None:
        drafting = self.engine.prompt_lookup > 0 or bool(self.engine.drafts)
        lone = self.max_batch == 1 or (drafting and not self.rows and not self.ready
                                       and len(self.waiting) == 1)
        if lone:  # one request, the engine's own path (prompt-lookup drafts when configured)
            job = self._next_job()
            if job is not None:
                self._run_alone(job)
            return
        while len(self.rows) < self.max_batch:
            cand = self._candidate()
            if cand is None:
                break
            row, cache, first_logits, decisions, pools = cand
            self._admitting = row.job
            self.admitted += 1
            row.job.order = self.admitted
            self._join(row, cache, decisions, pools)
            self._choose([row], first_logits)
            self._leave()
        if self.rows:
            self._decode()
            self._leave()

    def _prefill_job(self, job: Job, replica):
        """`prefill_alone`'s tuple for a popped job; None when its client went away or its prefill failed (answered)."""
        job.queue_s = time.perf_counter() - job.enqueued
        if job.cancel.is_set():
            job.future.set_exception(ClientGone("the client went away before its request was run"))
            return None
        try:
            return prefill_alone(self.engine, job, replica)
        except Exception as exc:  # noqa: BLE001 - this request fails alone
            log.exception("prefill failed")
            job.future.set_exception(exc)
            return None

    def _prefill_next(self):
        """Pop and prefill the oldest waiting request (this thread): the tuple, or None when nothing waits."""
        while True:
            job = self._next_job()
            if job is None:
                return None
            cand = self._prefill_job(job, self._own)
            if cand is not None:
                return cand

    def _prefill_loop(self) -> None:
        """The prefill thread: keeps up to `lookahead` requests prefilled in `ready`, oldest first, on its own
        module tree, while the batch decodes (the two share the CPU's cores, not the modules' state)."""
        while True:
            with self._wake:
                while not self._stop and (not self.waiting or len(self.ready) >= self.lookahead):
                    self._wake.wait()
                if self._stop:
                    return
                job = self.waiting.popleft()
            cand = self._prefill_job(job, self._side)
            if cand is not None:
                with self._wake:
                    self.ready.append(cand)
                    self._wake.notify_all()

    def _candidate(self):
        """The next request to join the batch, prefilled, as the admission policy picks it among those prefilled
        (`layerroute.serve.admission`: fcfs the oldest; pattern, among up to `lookahead` prefilled ahead, the one
        whose gates add the fewest blocks to those the batch runs)."""
        ahead = self.admission.prefills_ahead
        if self._side is not None and not ahead and not self.ready and len(self.waiting) > len(self.rows):
            # more requests waiting than running (a burst, a batch drained): prefill is the bottleneck and the
            # batch has little to decode, so this thread prefills too
            return self._prefill_next()
        if self._side is None:  # this thread prefills
            if not ahead:
                return self._prefill_next()
            while len(self.ready) < self.lookahead:
                cand = self._prefill_next()
                if cand is None:
                    break
                self.ready.append(cand)
        with self._wake:  # `ready` is shared with the prefill thread, when there is one
            for cand in [c for c in self.ready if c[0].job.cancel.is_set()]:
                self.ready.remove(cand)
                cand[0].job.future.set_exception(ClientGone("the client went away before its request was run"))
            if not self.ready:
                return None
            pick = self.admission.pick(self.ready, self.rows, time.perf_counter(), self.max_wait_s)
            self.ready.remove(pick)
            self._wake.notify_all()  # room in `ready` for the prefill thread
        return pick

    def _run_alone(self, job: Job) -> None:
        job.queue_s = time.perf_counter() - job.enqueued
        if job.cancel.is_set():
            job.future.set_exception(ClientGone("the client went away before its request was run"))
            return
        try:
            job.future.set_result(self.engine.generate(job.prompt, job.params, on_token=job.on_token,
                                                       cancel=job.cancel, reuse=job.reuse,
                                                       scripted_text=job.scripted_text))
        except Exception as exc:  # noqa: BLE001
            job.future.set_exception(exc)

    # -- the batch's state ------------------------------------------------------------------------------------
    def _reset_batch(self) -> None:
        self.cache: RoutedCache | None = None
        self.mask: torch.Tensor | None = None  # [B, T] 1 = a real token of that row
        self.pos: torch.Tensor | None = None  # [B] position of the token each row feeds next
        self.last: torch.Tensor | None = None  # [B] the token each row feeds next
        self.decisions: Decisions | None = None  # per block [B] gate (and its row plan)
        self.pools: list | None = None  # per block (sum [B, H], count [B, 1]) when sessions keep running sums

    def _layer_kv(self, cache: RoutedCache, i: int, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's keys and values [batch, kv_heads, length, head_dim]; zeros where the layer holds nothing
        current (exact policy: a block every row skipped writes no K/V, and no row reads it)."""
        if i < len(cache.layers):
            layer = cache.layers[i]
            k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
            if isinstance(k, torch.Tensor) and k.dim() == 4 and k.shape[0] == batch and k.shape[2] == length:
                return k, v
        zeros = torch.zeros((batch, *self._kv_shape[:1], length, self._kv_shape[1]), dtype=self._dtype,
                            device=self.engine.device)
        return zeros, zeros

    def _join(self, row: _Row, cache: RoutedCache, decisions, pools) -> None:
        """Merge a prefilled row into the batch: caches left-padded to one width, decisions and sums appended."""
        eng = self.engine
        n_layers = eng.rm.num_layers
        first_token_pos = torch.tensor([row.length], device=eng.device)
        if self.cache is None:
            batch_len, width = 0, row.length
        else:
            batch_len, width = self.mask.shape[1], max(self.mask.shape[1], row.length)
        merged = RoutedCache()
        for i in range(n_layers):
            rk, rv = self._layer_kv(cache, i, 1, row.length)
            parts_k, parts_v = [F.pad(rk, (0, 0, width - row.length, 0))], [F.pad(rv, (0, 0, width - row.length, 0))]
            if self.cache is not None:
                bk, bv = self._layer_kv(self.cache, i, len(self.rows), batch_len)
                parts_k.insert(0, F.pad(bk, (0, 0, width - batch_len, 0)))
                parts_v.insert(0, F.pad(bv, (0, 0, width - batch_len, 0)))
            merged.update(torch.cat(parts_k), torch.cat(parts_v), i)
        row_mask = torch.zeros(1, width, dtype=torch.long, device=eng.device)
        row_mask[:, width - row.length:] = 1
        if self.cache is None:
            self.mask, self.pos = row_mask, first_token_pos
            self.last = torch.zeros(1, dtype=torch.long, device=eng.device)  # set by _choose
            self.decisions = decisions
            self.pools = list(pools) if pools is not None else None
        else:
            self.mask = torch.cat([F.pad(self.mask, (width - batch_len, 0)), row_mask])
            self.pos = torch.cat([self.pos, first_token_pos])
            self.last = torch.cat([self.last, self.last.new_zeros(1)])
            if decisions is not None:
                self.decisions = self.decisions.concat(decisions)
            if pools is not None:
                self.pools = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]))
                              for a, b in zip(self.pools, pools, strict=True)]
        self.cache = merged
        self.rows.append(row)

    # -- decoding ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _decode(self) -> None:
        """One forward of every row's last chosen token, then each row chooses its next."""
        eng = self.engine
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=-1)
        with ExitStack() as stack:
            if not eng.dense:
                state = stack.enter_context(routing(eng.rm.model, "skip", kv_policy=eng.kv_policy,
                                                    session_pooling=eng._pooling))
                state.impose(self.decisions)  # each row's own decisions, taken at its prefill
                stack.enter_context(state.request_sums(self.pools))  # the rows' running sums, taken back after
            logits = eng.model(input_ids=self.last.view(-1, 1), attention_mask=self.mask,
                               position_ids=self.pos.view(-1, 1), past_key_values=self.cache, use_cache=True,
                               logits_to_keep=1).logits[:, -1, :]
            if self.pools is not None:
                self.pools = state.sums()
        self.forwards += 1
        self.pos = self.pos + 1
        for row in self.rows:
            row.length += 1
            row.forwards += 1
        self._choose(self.rows, logits)

    def _choose(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Each row picks its next token from its logits row (logits [len(rows), V], the batch's last rows)."""
        eng = self.engine
        offset = len(self.rows) - len(rows)
        scores_all = logits.float()
        synchronize(eng.device)
        now = time.perf_counter()
        for j, row in enumerate(rows):
            b = offset + j
            p = row.job.params
            try:
                tok = self._pick(row, scores_all[j : j + 1])
                if row.job.on_token is not None:
                    row.job.on_token(tok)
            except Exception as exc:  # noqa: BLE001 - a row's processor or stream failing fails that row only
                log.exception("choosing a token failed for one row")
                row.error, row.finish = exc, FINISH_ERROR
                continue
            row.new.append(tok)
            row.times.append(now)
            self.last[b] = tok
            row.finish = eng.stop_rule(p).finish(row.new, cancelled=row.job.cancel.is_set())  # the one rule

    def _pick(self, row: _Row, scores: torch.Tensor) -> int:
        """The row's next token from its scores [1, V]: its logits processor, then greedy or seeded sampling."""
        p = row.job.params
        if row.processor is not None:
            ctx = torch.tensor([row.job.prompt + row.new], device=scores.device)
            scores = row.processor(ctx, scores)
        if row.generator is None:
            return int(scores.argmax(dim=-1))
        scores = scores / p.temperature
        if p.top_p < 1.0:
            scores = TopPLogitsWarper(p.top_p)(None, scores)
        return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=row.generator))

    def _leave(self) -> None:
        """Answer the finished rows and drop them from the batch (cache rows, decisions, running sums)."""
        if all(r.finish is None and not r.job.cancel.is_set() for r in self.rows):
            return
        eng = self.engine
        keep = []
        for b, row in enumerate(self.rows):
            if row.finish is None and row.job.cancel.is_set():  # the client went away: free the row now
                row.finish = FINISH_CANCELLED
            if row.finish is None:
                keep.append(b)
                continue
            if row.error is not None:
                row.job.future.set_exception(row.error)
                continue
            try:
                if eng.sessions.capacity and row.finish != FINISH_CANCELLED:
                    self._keep_session(b, row)
                row.job.future.set_result(self._completion(row))
            except Exception as exc:  # noqa: BLE001 - this row fails alone
                log.exception("finishing a batched request failed")
                row.job.future.set_exception(exc)
        if not keep:
            self.rows = []
            self._reset_batch()
            return
        idx = torch.tensor(keep, device=eng.device)
        self.rows = [self.rows[b] for b in keep]
        self.mask, self.pos, self.last = self.mask[idx], self.pos[idx], self.last[idx]
        if self.decisions is not None:
            self.decisions = self.decisions.take_rows(idx)
        if self.pools is not None:
            self.pools = [(s.index_select(0, idx), c.index_select(0, idx)) for s, c in self.pools]
        used = self.mask.any(dim=0).nonzero()
        cut = int(used[0]) if len(used) else self.mask.shape[1]  # leading columns no remaining row uses
        self.mask = self.mask[:, cut:]
        for layer in self.cache.layers:
            k = getattr(layer, "keys", None)
            if isinstance(k, torch.Tensor) and k.dim() == 4:
                layer.keys, layer.values = layer.keys[idx, :, cut:], layer.values[idx, :, cut:]

    def _keep_session(self, b: int, row: _Row) -> None:
        """Store row b's own cache columns and running sums as a session (the lone path's checkpoints)."""
        eng = self.engine
        width = self.mask.shape[1]
        cache = RoutedCache()
        for i in range(eng.rm.num_layers):
            k, v = self._layer_kv(self.cache, i, len(self.rows), width)
            cache.update(k[b : b + 1, :, width - row.length:].clone(), v[b : b + 1, :, width - row.length:].clone(), i)
        final = None if self.pools is None else [(s[b : b + 1], c[b : b + 1]) for s, c in self.pools]
        eng.keep_session(row.job.prompt, row.new, cache, row.at_prompt, final)

    def _completion(self, row: _Row) -> Completion:
        times = row.times
        end = times[-1] if times else time.perf_counter()
        timings = {
            "ttft_s": times[0] - row.start if times else None,
            "decode_s_per_token": (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None,
            "generate_s": end - row.start,
            "engine_s": time.perf_counter() - row.start,
            "forwards": row.forwards,
            "batched": True,
        }
        return self.engine.completion(row.job.prompt, row.new, row.job.params, cancelled=row.finish == FINISH_CANCELLED,
                                      cached=row.cached, reused=row.reused, gates=row.gates, probs=row.probs,
                                      logits=row.logits, timings=timings, token_times=times)


__all__ = ["SCHEDULES", "ClientGone", "Job", "Scheduler"]
