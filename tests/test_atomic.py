"""Atomic writes: a failed write leaves the old file and no temporary behind; a kill mid-append in metrics.jsonl
does not stop a training run from resuming."""

import json

import matplotlib.pyplot as plt
import pytest

from layerroute.atomic import atomic_path, write_text_atomic
from layerroute.eval.report import _save
from layerroute.train import _metrics_up_to


def test_write_text_atomic_creates_folder_and_replaces(tmp_path):
    target = tmp_path / "a" / "b" / "out.json"
    assert write_text_atomic(target, "one") == target
    write_text_atomic(target, "twö")
    assert target.read_text(encoding="utf-8") == "twö"
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "eval.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half a resu")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]


def test_a_figure_that_fails_to_save_leaves_no_file(tmp_path):
    fig = plt.figure()
    with pytest.raises(ValueError):
        _save(fig, tmp_path / "plot.nosuchformat")
    assert list(tmp_path.iterdir()) == []
    assert not plt.get_fignums()  # closed even on failure
    _save(plt.figure(), tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_metrics_resume_drops_later_steps_and_counts_a_cut_line():
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (10, 20, 30)]
    text = "\n".join(lines) + '\n{"step": 40, "lo'  # killed mid-append
    kept, damaged = _metrics_up_to(text, 20)
    assert kept == lines[:2]
    assert damaged == 1
    assert _metrics_up_to("\n".join(lines) + "\n", 30) == (lines, 0)
