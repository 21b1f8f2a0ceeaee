"""Parameter accounting: backbone / LoRA / router / bridge counts of a loaded model (`parameter_counts`) and of
a model name on the meta device, without allocating weights (`count_parameters`, behind `layerroute params`).

It sits above model, adapters, routed and bridge: counting a name builds the routed model with all of them.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from .adapters import apply_lora
from .bridge import install_bridges
from .config import LoraSettings, RouterConfig
from .errors import ModelLoadError
from .model import _hub_offline, gguf_config, gguf_file, router_factory, shape_config
from .routed import wrap_model


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

    Shape presets, local folders and cached hub ids give their config directly; packaged models and .gguf files
    give it from the GGUF header (`gguf_config`), so no weight is read or dequantised."""
    gguf = None if name.startswith("shape:") else gguf_file(name)
    if name.startswith("shape:"):
        config = shape_config(name.split(":", 1)[1])
    elif gguf is not None:
        config = gguf_config(gguf)
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
