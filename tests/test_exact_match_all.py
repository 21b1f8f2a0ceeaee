"""benchmarks/exact_match_all.py on an adapter trained for one step on the smoke config: sides, forced skips,
skip bridges and references to earlier results."""

from __future__ import annotations

import json

import pytest
import torch

from layerroute.train import Trainer
from tests.helpers import ROOT, SMOKE, smoke_cfg

# `name as name` imports: the smoke-config fixtures shared by the test_train*.py files (pytest registers an imported
# fixture as this module's own; `as` marks a re-export, so a `smoke_data` parameter does not read as shadowing).
from tests.helpers import in_repo_root as in_repo_root  # autouse: the smoke config's paths are repo-relative
from tests.helpers import one_thread as one_thread  # autouse, module: torch on one thread
from tests.helpers import smoke_data as smoke_data  # module: the smoke config's steps, loaded once


def test_exact_match_all_pairs_every_side_with_the_first(tmp_path, smoke_data, capsys):
    """benchmarks/exact_match_all.py: teacher-forced exact match of adapters on the eval split's tool-call steps."""
    import importlib.util

    from layerroute.config import EvalConfig
    from layerroute.eval.teacher_forced import teacher_forced

    spec = importlib.util.spec_from_file_location("exact_match_all", ROOT / "benchmarks" / "exact_match_all.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    trainer = Trainer(smoke_cfg("train.steps=1", "train.grad_accum=1", "train.checkpoint_every=0",
                                "train.warmup_steps=0"), tmp_path / "run", data=smoke_data)
    trainer.run()
    adapter = tmp_path / "run" / "adapter"
    out = tmp_path / "em.json"
    assert bench.main(["--config", str(SMOKE), "--side", f"{adapter}:lora_full_depth", "--side", f"{adapter}:routed",
                       "--side", f"{adapter}:lora_full_depth", "--max-steps", "4", "--output", str(out)]) == 0
    doc = json.loads(out.read_text())
    first, routed, again = doc["sides"]
    assert doc["steps"] == 4 and doc["step_ids"] == [s["conversation_id"] for s in first["samples"]]
    # the same side twice pairs to a zero difference; each verdict is "no greedy token error on this step"
    assert again["paired_vs_first"]["diff_points"] == 0 and again["errors"] == first["errors"]
    steps = [s for s in smoke_data.eval if s.step_type == "tool_call"][:4]
    trainer.rm.model.eval()
    expect = teacher_forced(trainer.rm, steps, "routed", EvalConfig(), pad_id=trainer.pad_id)
    assert routed["errors"] == [r["errors"] for r in expect]
    assert [s["correct"] for s in routed["samples"]] == [r["errors"] == 0 for r in expect]
    assert routed["paired_vs_first"]["n"] == 4
    with pytest.raises(SystemExit, match="ADAPTER_DIR:CONFIG"):
        bench.main(["--side", f"{adapter}:shortgpt"])
    # skip=BLOCKS: LoRA on, those blocks removed from every step (forced gates)
    assert bench.main(["--config", str(SMOKE), "--side", f"{adapter}:skip=0,2", "--max-steps", "4",
                       "--output", str(out)]) == 0
    forced = json.loads(out.read_text())["sides"][0]
    pattern = torch.tensor([[j not in (0, 2) for j in range(trainer.rm.num_layers)]] * 4)
    expect = teacher_forced(trainer.rm, steps, "shortgpt", EvalConfig(), patterns=pattern, pad_id=trainer.pad_id)
    assert forced["errors"] == [r["errors"] for r in expect] and forced["block_skip"] == 0.5
    with pytest.raises(SystemExit, match="skip= takes"):
        bench.main(["--side", f"{adapter}:skip=a,b"])
    # +bridge: skip bridges fitted in closed form on tool-call training steps first; --reference pairs with the
    # first side of an earlier result instead of scoring it again
    first_out = tmp_path / "em_first.json"
    assert bench.main(["--config", str(SMOKE), "--side", f"{adapter}:lora_full_depth", "--max-steps", "4",
                       "--output", str(first_out)]) == 0
    assert bench.main(["--config", str(SMOKE), "--side", f"{adapter}:skip=0,2+bridge", "--bridge-rank", "2",
                       "--bridge-steps", "3", "--max-steps", "4", "--reference", str(first_out),
                       "--output", str(out)]) == 0
    ref, bridged = json.loads(out.read_text())["sides"]
    assert ref["from"] == str(first_out) and ref["errors"] == first["errors"]
    assert bridged["bridge_rank"] == 2 and bridged["bridge_steps"] == 3 and len(bridged["bridge_explained"]) == 4
    assert bridged["paired_vs_first"]["n"] == 4 and bridged["block_skip"] == 0.5
    with pytest.raises(SystemExit, match="optionally"):
        bench.main(["--side", f"{adapter}:lora_full_depth+bridge"])
    with pytest.raises(SystemExit, match="other steps"):
        bench.main(["--config", str(SMOKE), "--side", f"{adapter}:routed", "--max-steps", "3",
                    "--reference", str(first_out)])
    # RESULT.json:N pairs with its N-th side (here the bridged one); an index it lacks fails before any scoring
    again = tmp_path / "em_again.json"
    assert bench.main(["--config", str(SMOKE), "--side", f"{adapter}:lora_full_depth", "--max-steps", "4",
                       "--reference", f"{out}:1", "--output", str(again)]) == 0
    ref_again, full = json.loads(again.read_text())["sides"]
    assert ref_again["config"] == "skip=0,2+bridge" and ref_again["errors"] == bridged["errors"]
    assert full["paired_vs_first"]["n"] == 4 and "paired_vs_first" not in ref_again
    with pytest.raises(SystemExit, match="with a side 5"):
        bench.main(["--side", "no/such/adapter:routed", "--reference", f"{out}:5"])
