"""The serving scheduler's admission policies (`layerroute.serve.admission`): one class each behind one table."""

from __future__ import annotations

from types import SimpleNamespace

from layerroute.serve.admission import ADMISSIONS, Fcfs, Pattern, added_blocks
from layerroute.serve.scheduler import SCHEDULES


def cand(enqueued: float, gates):
    return (SimpleNamespace(job=SimpleNamespace(enqueued=enqueued), gates=gates), None)


def test_the_table_is_the_schedules():
    assert set(ADMISSIONS) == set(SCHEDULES) == {"fcfs", "pattern"}
    assert ADMISSIONS["fcfs"] is Fcfs and ADMISSIONS["pattern"] is Pattern
    assert not Fcfs.prefills_ahead and Pattern.prefills_ahead


def test_fcfs_takes_the_oldest():
    ready = [cand(3.0, [True, False]), cand(1.0, [True, True]), cand(2.0, [False, False])]
    assert Fcfs().pick(ready, rows=[], now=10.0, max_wait_s=100.0) is ready[1]


def test_pattern_takes_the_fewest_added_blocks_unless_one_starves():
    rows = [SimpleNamespace(gates=[True, False, False]), SimpleNamespace(gates=[True, True, False])]
    ready = [cand(1.0, [True, True, True]), cand(2.0, [True, False, True]), cand(3.0, [True, True, False])]
    assert added_blocks([True, True, True], [True, True, False]) == 1
    assert Pattern().pick(ready, rows, now=5.0, max_wait_s=10.0) is ready[2]  # adds no block
    assert Pattern().pick(ready, rows, now=11.5, max_wait_s=10.0) is ready[0]  # waited 10.5 s: goes first
    assert Pattern().pick(ready, [], now=5.0, max_wait_s=10.0) is ready[0]  # nothing running: the oldest
