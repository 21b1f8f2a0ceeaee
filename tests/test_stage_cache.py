"""Resumable stages: a stage is reused only under the key it was computed with, and an evaluation interrupted
part-way resumes to the same result as one that never stopped."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoTokenizer

import layerroute.eval.adapter as adapter_mod
from layerroute.config import EvalConfig
from layerroute.data.build import load_steps
from layerroute.eval.adapter import evaluate_adapter
from layerroute.eval.stage_cache import StageCache, directory_digest
from tests.helpers import tiny_routed
from tests.test_evaluate import TOKENIZER, data_cfg


def counted(value, calls: list):
    def fn():
        calls.append(1)
        return value
    return fn


def test_a_stage_is_reused_only_under_its_own_key_and_identity(tmp_path):
    calls: list = []
    cache = StageCache(tmp_path / "c", {"adapter": "a"}, log=None)
    assert cache.run("s", [1], counted({"x": [1.5, True]}, calls)) == {"x": [1.5, True]}
    assert cache.run("s", [1], counted({"x": "other"}, calls)) == {"x": [1.5, True]}  # reused
    assert len(calls) == 1 and cache.reused == ["s"]
    assert cache.run("s", [2], counted("new key", calls)) == "new key"  # another key: computed and stored
    assert StageCache(tmp_path / "c", {"adapter": "b"}, log=None).run("s", [2], counted("b", calls)) == "b"
    assert len(calls) == 3
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.endswith(".tmp")]  # written atomically
    cache.clear()
    assert not (tmp_path / "c").exists()


def test_a_damaged_stage_file_is_computed_again_and_bad_names_are_refused(tmp_path):
    cache = StageCache(tmp_path, "id", log=None)
    (tmp_path / "s.json").write_text('{"key": ')  # a write cut short by a crash before atomic writes
    assert cache.run("s", 0, lambda: 7) == 7 and cache.reused == []
    assert json.loads((tmp_path / "s.json").read_text())["result"] == 7
    for bad in ("", "../x", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="plain file name"):
            cache.run(bad, 0, lambda: 0)


def test_directory_digest_changes_with_any_file(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"\x00" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "meta.json").write_text("{}")
    before = directory_digest(tmp_path)
    assert directory_digest(tmp_path) == before
    (tmp_path / "sub" / "meta.json").write_text("{ }")
    assert directory_digest(tmp_path) != before


class Interrupt(Exception):
    pass


def test_an_interrupted_evaluation_resumes_from_its_finished_stages_to_the_same_result(tmp_path, monkeypatch):
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    rm = tiny_routed("shape:tiny-qwen2")
    rm.tokenizer = tok
    with torch.no_grad():
        rm.routers()[1].net.bias.fill_(-5.0)  # one block skipped on every step: the equal-FLOP baselines run too
    data = load_steps(data_cfg(), tok)
    cfg = EvalConfig(batch_size=4, max_steps_per_type=3, thresholds=[], bootstrap=20, calibration_steps=2,
                     accuracy_steps_per_type=2, max_new_tokens_tool=3, max_new_tokens_planning=3,
                     accuracy_configs=["lora_full_depth", "routed", "shortgpt", "random"])
    plain = evaluate_adapter(rm, data, cfg, {})

    real = adapter_mod.accuracy  # looked up by evaluate_adapter in its own module
    generated: list[str] = []

    def accuracy(*args, **kwargs):
        if stop_after is not None and len(generated) == stop_after:
            raise Interrupt
        generated.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(adapter_mod, "accuracy", accuracy)
    identity = {"adapter": "tiny"}
    stop_after = 1  # the process dies while generating the second configuration
    with pytest.raises(Interrupt):
        evaluate_adapter(rm, data, cfg, {}, cache=StageCache(tmp_path, identity, log=None))
    assert generated == ["lora_full_depth"]

    stop_after, generated = None, []
    cache = StageCache(tmp_path, identity, log=None)
    resumed = evaluate_adapter(rm, data, cfg, {}, cache=cache)
    assert "generate-tool_call-lora_full_depth" in cache.reused
    assert {"teacher_forced-routed", "block_influence", "teacher_forced-shortgpt"} <= set(cache.reused)
    assert generated.count("lora_full_depth") == 1  # only the planning steps' generations were left to do
    assert {"routed", "shortgpt", "random"} <= set(generated)
    assert json.dumps(resumed, sort_keys=True) == json.dumps(plain, sort_keys=True)

    # another adapter (identity) reuses nothing
    other = StageCache(tmp_path, {"adapter": "other"}, log=None)
    evaluate_adapter(rm, data, cfg, {}, cache=other)
    assert other.reused == []
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
