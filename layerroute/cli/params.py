"""`layerroute params`: backbone / LoRA / router / bridge parameter counts of a model name on the meta device,
without allocating weights (`count_parameters`); a loaded model's counts are `layerroute.model.parameter_counts`.

It sits above model, adapters, routed and bridge: counting a name builds the routed model with all of them.
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ..adapters import apply_lora
from ..config import LoraSettings, RouterConfig
from ..errors import ModelLoadError
from ..model import parameter_counts, router_factory, shape_config
from ..nn.bridge import install_bridges
from ..nn.routed import wrap_model
from ..packaged import gguf_config, gguf_file, hub_offline


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
            config = AutoConfig.from_pretrained(name, local_files_only=hub_offline())
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..config import add_json_argument, add_model_argument, choices
    from ..config.sections import RouterKind

    add_model_argument(parser)  # no adapter here: default the packaged offline model
    parser.add_argument("--router-kind", default="linear", choices=list(choices(RouterKind)))
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--no-lora", action="store_true", help="count routers only")
    parser.add_argument("--bridge-rank", type=int, default=0, help="skip bridges of this rank on every block (0 = none)")
    add_json_argument(parser)


def run(args: argparse.Namespace) -> int:
    from ..config import LoraSettings, RouterConfig
    from ..config.flags import OFFLINE_MODEL

    counts = count_parameters(
        args.model or OFFLINE_MODEL, RouterConfig(kind=args.router_kind, bridge_rank=args.bridge_rank),
        LoraSettings(r=args.lora_r, enabled=not args.no_lora),
    )
    if args.json:
        print(json.dumps(counts))
    else:
        for key in ("backbone", "lora", "router", "bridge", "trainable"):
            print(f"{key:>20}: {counts[key]:>15,}")
        print(f"{'trainable_fraction':>20}: {100 * counts['trainable_fraction']:>14.3f}%")
    return 0
