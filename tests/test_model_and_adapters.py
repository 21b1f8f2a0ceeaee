"""Loading, parameter counts and the adapter directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from layerroute.adapters import load_adapter, save_adapter
from layerroute.cli.params import count_parameters
from layerroute.config import LoraSettings, ModelConfig, RouterConfig, RouterExperimental
from layerroute.errors import AdapterError, ModelLoadError
from layerroute.model import load_base
from layerroute.nn.routed import routing
from tests.helpers import TINY_SHAPES, random_batch, tiny_routed


def test_paper_parameter_counts_on_meta_device():
    counts = count_parameters("shape:qwen2.5-0.5b", RouterConfig(), LoraSettings())
    assert counts["backbone"] == 494_032_768
    assert counts["lora"] == 1_081_344
    assert counts["router"] == 21_528  # 24 x (896 + 1)
    assert counts["trainable"] == 1_102_872
    assert round(100 * counts["trainable_fraction"], 2) == 0.22


def test_params_cli_prints_json(capsys):
    from layerroute.cli import main
    from tests.helpers import run_main

    out = run_main(main, ["params", "--model", "shape:qwen2.5-0.5b", "--json"], capsys)  # in-process: no torch re-import
    assert out.returncode == 0, out.stderr
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert counts["trainable"] == 1_102_872 and counts["router"] == 21_528
    out = run_main(main, ["params", "--model", "shape:qwen2.5-0.5b", "--bridge-rank", "16", "--json"], capsys)
    assert out.returncode == 0, out.stderr
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert counts["bridge"] == 24 * 2 * 896 * 16 and counts["trainable"] == 1_102_872 + 688_128


def test_mlp_router_counts():
    counts = count_parameters("shape:tiny-llama", RouterConfig(kind="mlp", experimental=RouterExperimental(bottleneck=8)), LoraSettings(enabled=False))
    assert counts["router"] == 4 * (64 * 8 + 8 + 8 + 1)
    assert counts["lora"] == 0


@pytest.mark.parametrize("shape", TINY_SHAPES)
def test_adapter_round_trip_reproduces_logits(tmp_path, shape):
    rm = tiny_routed(shape, router=RouterConfig(init_bias=0.3))
    with torch.no_grad():
        for i, router in enumerate(rm.routers()):
            router.net.weight.normal_(0, 0.5)
            router.net.bias.fill_(0.2 * (i - 1))
    ids, mask = random_batch()
    with torch.no_grad(), routing(rm.model, "mix", decision_mask=mask):
        before = rm.model(input_ids=ids).logits
    out = save_adapter(rm, tmp_path / "adapter", extra={"note": "test"})
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "layerroute.json", "router.safetensors"
    ] or {"adapter_config.json", "adapter_model.safetensors", "layerroute.json", "router.safetensors"} <= {
        p.name for p in out.iterdir()
    }
    meta = json.loads((out / "layerroute.json").read_text())
    assert meta["base_model"]["name"] == shape and meta["note"] == "test"
    loaded = load_adapter(out, loaded=load_base(ModelConfig(name=shape, seed=0), tokenizer=False))
    with torch.no_grad(), routing(loaded.model, "mix", decision_mask=mask):
        after = loaded.model(input_ids=ids).logits
    assert torch.equal(before, after)


def test_adapter_save_is_atomic_and_overwrites(tmp_path):
    rm = tiny_routed()
    target = tmp_path / "adapter"
    save_adapter(rm, target)
    save_adapter(rm, target)  # overwriting leaves one complete directory and no temp folders behind
    assert (target / "router.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in target.iterdir()}
    assert modes and all(m == 0o666 & ~mask for m in modes.values()), modes  # ordinary output, not private files


def test_adapter_refuses_pickled_weights(tmp_path):
    rm = tiny_routed()
    out = save_adapter(rm, tmp_path / "adapter")
    (out / "adapter_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(AdapterError, match="pickled"):
        load_adapter(out, loaded=load_base(ModelConfig(name="shape:tiny-qwen2"), tokenizer=False))


def test_adapter_rejects_other_base_shape(tmp_path):
    rm = tiny_routed("shape:tiny-qwen2")
    out = save_adapter(rm, tmp_path / "adapter")
    with pytest.raises(AdapterError, match="shape differs"):
        load_adapter(out, loaded=load_base(ModelConfig(name="shape:smollm2-135m"), tokenizer=False))


def test_not_an_adapter_dir(tmp_path):
    with pytest.raises(AdapterError, match="layerroute.json"):
        load_adapter(tmp_path)


def test_offline_hub_id_fails_fast_naming_the_default(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code = (
        "from layerroute.model import load_base; from layerroute.config import ModelConfig\n"
        "load_base(ModelConfig(name='Qwen/Qwen2.5-0.5B-Instruct'))"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "smollm2-135m-instruct" in proc.stderr and "HF_HUB_OFFLINE" in proc.stderr


def test_unreachable_hub_reads_the_local_cache_only_and_says_why(tmp_path):
    """Without network huggingface_hub retries ~47 s before failing; an unreachable endpoint is detected first and
    the load goes straight to the local cache (here: empty), naming the reason."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")  # port 9 (discard): refused
    code = (
        "from layerroute.model import load_base; from layerroute.tokenizer import load_tokenizer\n"
        "from layerroute.config import ModelConfig\n"
        "import sys\n"
        "try:\n    load_tokenizer('Qwen/Qwen2.5-0.5B-Instruct')\nexcept Exception as e:\n    print(e, file=sys.stderr)\n"
        "load_base(ModelConfig(name='Qwen/Qwen2.5-0.5B-Instruct'))"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("is not reachable") == 2 and "smollm2-135m-instruct" in proc.stderr


def test_unknown_shape_and_missing_gguf():
    with pytest.raises(ModelLoadError, match="unknown shape preset"):
        load_base(ModelConfig(name="shape:nope"), tokenizer=False)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_base(ModelConfig(name="/nonexistent/model.gguf"), tokenizer=False)


@pytest.mark.slow
def test_real_offline_model_open_gates_reproduce_plain_logits():
    """SmolLM2-135M-Instruct from its package: wrapped with open gates, it gives the unwrapped logits."""
    from layerroute.adapters import build_routed_model
    from layerroute.nn.routed import unwrap_model

    cfg = ModelConfig(name="smollm2-135m-instruct")
    loaded = load_base(cfg)
    tok = loaded.tokenizer
    messages = [{"role": "user", "content": "What is the weather in Paris? Use the get_weather tool."}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    with torch.no_grad():
        plain = loaded.model(input_ids=ids).logits
    rm = build_routed_model(cfg, loaded=loaded)
    assert rm.num_layers == 30
    with torch.no_grad(), routing(rm.model, "mix"):
        routed = rm.model(input_ids=ids).logits
    assert (routed - plain).abs().max().item() < 1e-4
    unwrap_model(rm.model)


def test_demo_counts_the_parameters_its_config_trains():
    from layerroute.cli.demo import stages

    params = stages("configs/offline-smollm2.yaml", Path("runs/x"))[0][2]
    assert params[:3] == ["params", "--model", "smollm2-135m-instruct"]
    assert params[params.index("--bridge-rank") + 1] == "16" and params[params.index("--lora-r") + 1] == "8"


def test_resolve_dtype_auto_follows_native_bf16(monkeypatch):
    """`--dtype auto` (the server's default) is bf16 exactly where bf16 matmuls are native, float32 elsewhere; an
    explicit dtype is never changed."""
    import layerroute.model as model_mod

    monkeypatch.setattr(model_mod, "native_bf16", lambda device: True)
    assert model_mod.resolve_dtype("auto", "cpu") == "bfloat16"
    monkeypatch.setattr(model_mod, "native_bf16", lambda device: False)
    assert model_mod.resolve_dtype("auto", "cpu") == "float32"
    for explicit in ("float32", "bfloat16", "float16"):
        assert model_mod.resolve_dtype(explicit, "cpu") == explicit


def test_native_bf16_answers_without_raising():
    """The probe returns a bool on this machine's CPU and False for a device kind it does not know (the real probe:
    the suite pins 'auto' to float32, tests/conftest.py)."""
    import torch

    from tests.conftest import REAL_NATIVE_BF16 as native_bf16

    assert isinstance(native_bf16(torch.device("cpu")), bool)
    assert native_bf16(torch.device("meta")) is False


def test_serve_cli_defaults_to_auto_dtype_and_a_prefill_thread():
    import argparse

    from layerroute.serve.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).dtype == "auto"
    assert parser.parse_args(["--dtype", "float32"]).dtype == "float32"
    # and prefills on a second thread unless told not to (docs/results/serving_concurrency.md)
    assert parser.parse_args([]).prefill_thread is True
    assert parser.parse_args(["--no-prefill-thread"]).prefill_thread is False


@pytest.mark.parametrize("native, used", [(True, "bfloat16"), (False, "float32")])
def test_auto_dtype_resolves_by_the_probe_and_the_adapter_records_the_dtype_used(monkeypatch, tmp_path, native, used):
    """model.dtype defaults to auto: bf16 where bf16 matmuls are native, else float32; the adapter's layerroute.json
    says which one the frozen weights were in (LoRA and routers stay float32 either way)."""
    import layerroute.model as model_mod
    from layerroute.adapters import build_routed_model, read_adapter_meta

    monkeypatch.setattr(model_mod, "native_bf16", lambda device: native)
    assert ModelConfig().dtype == "auto"
    cfg = ModelConfig(name="shape:tiny-llama", device="cpu")
    assert model_mod.resolve_model_config(cfg).dtype == used
    rm = build_routed_model(cfg)
    assert rm.dtype == used and rm.base_model.get_input_embeddings().weight.dtype == getattr(torch, used)
    assert all(p.dtype == torch.float32 for p in rm.model.parameters() if p.requires_grad)
    adapter = save_adapter(rm, tmp_path / "adapter")
    assert read_adapter_meta(adapter)["dtype"] == used


def test_explicit_bf16_on_an_emulating_cpu_warns_with_the_measured_cost(monkeypatch, caplog):
    import layerroute.model as model_mod

    monkeypatch.setattr(model_mod, "native_bf16", lambda device: False)
    monkeypatch.setattr(model_mod, "_WARNED_BF16", set())
    with caplog.at_level("WARNING", logger="layerroute.model"):
        loaded = load_base(ModelConfig(name="shape:tiny-llama", dtype="bfloat16", device="cpu"), tokenizer=False)
    assert loaded.dtype == "bfloat16"  # explicit is obeyed, with a warning that names the cost
    assert "0.7 GFLOPS against 28.2 in float32" in caplog.text and "model.dtype=auto" in caplog.text
    caplog.clear()
    monkeypatch.setattr(model_mod, "native_bf16", lambda device: True)
    monkeypatch.setattr(model_mod, "_WARNED_BF16", set())
    with caplog.at_level("WARNING", logger="layerroute.model"):
        load_base(ModelConfig(name="shape:tiny-llama", dtype="bfloat16", device="cpu"), tokenizer=False)
    assert "GFLOPS" not in caplog.text  # native bf16: nothing to warn about


def test_reloading_an_adapter_in_another_dtype_says_so(monkeypatch, tmp_path, caplog):
    """An adapter trained on float32 frozen weights, reloaded with auto on a machine where auto means bf16, is
    loaded in bf16 (what auto means there), and the load logs that it differs from the training dtype."""
    import layerroute.model as model_mod

    monkeypatch.setattr(model_mod, "native_bf16", lambda device: False)
    adapter = save_adapter(tiny_routed("shape:tiny-llama"), tmp_path / "adapter")
    monkeypatch.setattr(model_mod, "native_bf16", lambda device: True)
    with caplog.at_level("WARNING", logger="layerroute.adapters"):
        same = load_adapter(adapter, ModelConfig(name="shape:tiny-llama", dtype="float32"))
    assert same.dtype == "float32" and "trained with" not in caplog.text
    with caplog.at_level("WARNING", logger="layerroute.adapters"):
        moved = load_adapter(adapter, ModelConfig(name="shape:tiny-llama"))  # auto: bf16 on this (patched) machine
    assert moved.dtype == "bfloat16"
    assert "trained with float32 frozen weights, loaded in bfloat16" in caplog.text
