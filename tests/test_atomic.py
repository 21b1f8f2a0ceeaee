"""Atomic writes: a failed write leaves the old file and no temporary behind; a kill mid-append in metrics.jsonl
does not stop a training run from resuming."""

import json
import os

import matplotlib.pyplot as plt
import pytest
import torch
from safetensors.torch import save_file

from layerroute.atomic import atomic_path, write_dir_atomically, write_text_atomic
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_safetensors_written_through_atomic_writers_are_ordinary_output(tmp_path):
    """safetensors writes a private (0600) file; what layerroute leaves on disk has the umask's ordinary mode."""
    mask = _umask()
    with atomic_path(tmp_path / "cache.safetensors") as tmp:
        save_file({"x": torch.zeros(2)}, str(tmp))
    assert (tmp_path / "cache.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask

    def fill(d):
        (d / "sub").mkdir()
        save_file({"x": torch.zeros(2)}, str(d / "sub" / "w.safetensors"))
        (d / "state.json").write_text("{}")

    out = write_dir_atomically(tmp_path / "ckpt", fill)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask
    assert (out / "sub").stat().st_mode & 0o777 == 0o777 & ~mask
    assert {p.name: p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()} == {
        "w.safetensors": 0o666 & ~mask, "state.json": 0o666 & ~mask}


def test_a_folder_whose_fill_fails_leaves_the_old_folder_and_no_temporary(tmp_path):
    write_dir_atomically(tmp_path / "ckpt", lambda d: (d / "a").write_text("old"))

    def fail(d):
        (d / "a").write_text("new")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_dir_atomically(tmp_path / "ckpt", fail)
    assert (tmp_path / "ckpt" / "a").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
