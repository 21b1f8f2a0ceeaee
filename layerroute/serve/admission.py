"""Admission policies of the continuous-batching scheduler: which prefilled request takes a free row next.

Each policy is a class behind one table (`ADMISSIONS`, the names ``layerroute serve --schedule`` accepts); the
scheduler (`layerroute.serve.scheduler`) owns the queue, the prefills and the prefill thread, and asks its policy
two things only: whether to prefill requests ahead of a free row (`prefills_ahead`), and which prefilled request to
admit (`pick`). Adding a policy is one class here.

- ``fcfs``: the oldest waiting request, prefilled when a row is free.
- ``pattern`` (skip-pattern-aware): up to ``lookahead`` requests prefilled ahead (each once either way; only its
  place in line changes), then the one whose routing decisions add the fewest blocks to those some running row runs:
  in memory-bound decode a block saves time only when every row skips it, so tool-call steps batch best with
  tool-call steps. A request that has waited ``max_wait_s`` goes first, oldest first (no starvation).
"""

from __future__ import annotations

from typing import ClassVar


def added_blocks(gates: list[bool], runs: list[bool]) -> int:
    """Blocks a request would run that no row of the batch runs now (each costs the whole batch a block)."""
    return sum(1 for g, r in zip(gates, runs, strict=True) if g and not r)


def _oldest(candidates: list):
    return min(candidates, key=lambda c: c[0].job.enqueued)


class Admission:
    """A policy: `pick` one of the prefilled candidates (tuples whose first item is the request's `_Row`)."""

    name: ClassVar[str]
    prefills_ahead: ClassVar[bool]  # keep up to `lookahead` requests prefilled, or prefill one when a row frees

    def pick(self, ready: list, rows: list, now: float, max_wait_s: float):
        raise NotImplementedError


class Fcfs(Admission):
    name = "fcfs"
    prefills_ahead = False

    def pick(self, ready: list, rows: list, now: float, max_wait_s: float):
        return _oldest(ready)


class Pattern(Admission):
    name = "pattern"
    prefills_ahead = True

    def pick(self, ready: list, rows: list, now: float, max_wait_s: float):
        overdue = [c for c in ready if now - c[0].job.enqueued >= max_wait_s]
        if overdue or not rows or ready[0][0].gates is None:  # starving, nothing to match, or a dense model
            return _oldest(overdue or ready)
        runs = [any(r.gates[i] for r in rows) for i in range(len(rows[0].gates))]
        return min(ready, key=lambda c: (added_blocks(c[0].gates, runs), c[0].job.enqueued))


#: --schedule name -> policy class
ADMISSIONS: dict[str, type[Admission]] = {policy.name: policy for policy in (Fcfs, Pattern)}

__all__ = ["ADMISSIONS", "Admission", "Fcfs", "Pattern", "added_blocks"]
