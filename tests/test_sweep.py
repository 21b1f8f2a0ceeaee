"""`layerroute sweep`: several seeds trained and evaluated together, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from layerroute.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
FAST_EVAL = [
    "--set", "train.steps=2", "--set", "train.checkpoint_every=0", "--set", "train.eval_every=0",
    "--set", "eval.thresholds=[0.5]", "--set", "eval.accuracy_steps_per_type=0", "--set", "eval.bootstrap=20",
    "--set", "eval.max_steps_per_type=4", "--set", "eval.calibration_steps=4",
]


@pytest.mark.slow  # trains two seeds and evaluates them: about a minute on an idle 2-core machine
def test_sweep_trains_each_seed_and_writes_one_table(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the smoke config names its fixture tokenizer relative to the repository
    out = tmp_path / "sweep"
    assert main(["sweep", "--config", str(SMOKE), "--seeds", "2", "--output-dir", str(out), *FAST_EVAL]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["seeds"] == [0, 1]
    doc = json.loads((out / "eval" / "eval.json").read_text())
    assert len(doc["seeds"]) == 2
    agg = doc["aggregate"]["full"]["skip_differential_points"]
    assert len(agg["values"]) == 2 and summary["skip_differential_points"]["mean"] == agg["mean"]
    assert "Seeds (2)" in (out / "eval" / "report.md").read_text()
    assert (out / "eval" / "seeds.png").is_file()
    assert not (out / "eval" / "partial").exists()  # resumable stages are dropped once eval.json is written
    # the two seeds really differ (LoRA init and data order are seeded)
    a, b = (out / "seed-0" / "adapter" / "router.safetensors"), (out / "seed-1" / "adapter" / "router.safetensors")
    assert a.read_bytes() != b.read_bytes()
    # rerunning finds both seeds trained and only evaluates
    assert main(["sweep", "--config", str(SMOKE), "--seeds", "2", "--output-dir", str(out), *FAST_EVAL]) == 0
    assert capsys.readouterr().out.count("already trained") == 2
