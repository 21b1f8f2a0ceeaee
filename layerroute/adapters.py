"""LoRA through peft, the routed model bundle, and the adapter directory on disk.

An adapter directory holds only what trained, beside its metadata:

    adapter_config.json, adapter_model.safetensors   PEFT's own files (LoRA)
    router.safetensors                               one router per block ("layers.<i>.<param>"), and its skip
                                                     bridge when router.bridge_rank > 0 ("layers.<i>.bridge.<param>")
    layerroute.json                                  router/LoRA config, base model identity, the frozen weights'
                                                     dtype it trained in, library version, tokenizer identity and
                                                     the chat template the steps used
    tokenizer.json, tokenizer_config.json,           the tokenizer that rendered the training steps, as
    chat_template.jinja                              `tokenizer.save_pretrained` writes it

Every command that loads an adapter uses its saved tokenizer and template, whatever the base model's own are;
adapters saved before they were kept fall back to the base model's tokenizer (the old behaviour).

The dtype: LoRA, routers and bridges are saved in float32 whatever the frozen weights' dtype was; `dtype` in
layerroute.json records the frozen weights' dtype training actually used (model.dtype 'auto' resolved), as does
the training config's model.dtype. Reloading takes the caller's model.dtype: `layerroute eval` / `curve` without
--config use the training config, hence the recorded dtype; generate, bench, agent, serve and a config saying
'auto' pick this machine's dtype (bf16 where native, else float32). When that differs from the recorded one,
loading says so in one logged line (outputs then differ by bf16 rounding; pass --dtype / --set model.dtype to
reproduce the training numerics).

Writes are atomic (a temp folder renamed into place); loading refuses pickled weights, an adapter whose base
differs from the model it is loaded onto (shape, or file size and hash: `layerroute.identity`), a tokenizer
given explicitly (model.tokenizer) that is not the recorded one, and a model.chat_template that is not the
recorded template.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__, chat_template
from .atomic import write_dir_atomically
from .config import LoraSettings, ModelConfig, RouterConfig, from_dict
from .errors import AdapterError, ConfigError
from .identity import describe_base, describe_tokenizer, same_tokenizer, tokenizer_identity
from .model import LoadedModel, configure_trainable, load_base, router_factory
from .nn.bridge import install_bridges
from .nn.routed import find_routed_layers, wrap_model
from .nn.router import RouterSpec, router_spec
from .nn.state import RoutingState
from .tokenizer import load_tokenizer

log = logging.getLogger(__name__)

ROUTER_FILE = "router.safetensors"
BRIDGE_PREFIX = "bridge."  # within a block's entries of ROUTER_FILE
META_FILE = "layerroute.json"
TOKENIZER_FILE = "tokenizer_config.json"  # written by tokenizer.save_pretrained beside tokenizer.json
_PICKLED = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def peft_lora_config(cfg: LoraSettings) -> LoraConfig:
    return LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.targets),
        bias="none", task_type="CAUSAL_LM",
    )


def apply_lora(model: nn.Module, cfg: LoraSettings) -> nn.Module:
    """Add LoRA adapters with peft (returns the PeftModel); `configure_trainable` then re-enables routers."""
    model = get_peft_model(model, peft_lora_config(cfg))
    configure_trainable(model)
    return model


@dataclass
class RoutedModel:
    """A frozen base model with routers on every block and (optionally) LoRA adapters."""

    model: nn.Module  # PeftModel when LoRA is enabled, else the transformers model
    tokenizer: object | None
    identity: dict
    router_cfg: RouterConfig
    lora_cfg: LoraSettings
    state: RoutingState

    @property
    def has_lora(self) -> bool:
        return isinstance(self.model, PeftModel)

    @property
    def config(self):
        return self.base_model.config

    @property
    def base_model(self) -> nn.Module:
        """The transformers model (inside the PEFT wrapper when there is one)."""
        return self.model.get_base_model() if self.has_lora else self.model

    @property
    def num_layers(self) -> int:
        return self.state.num_layers

    @property
    def router_spec(self) -> RouterSpec:
        """The routers' kind and size: their parameter count and the FLOPs of one decision."""
        return router_spec(self.router_cfg)

    @property
    def dtype(self) -> str:
        """The frozen weights' dtype ('float32', 'bfloat16', ...): what model.dtype resolved to when loaded."""
        return str(self.base_model.get_input_embeddings().weight.dtype).removeprefix("torch.")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def routers(self) -> list[nn.Module]:
        return [layer.router for layer in find_routed_layers(self.model)]

    @contextmanager
    def lora_disabled(self):
        """Run the base model's weights (routers still act): the 'routed_no_lora' and 'base' configurations."""
        if self.has_lora:
            with self.model.disable_adapter():
                yield
        else:
            yield

    @contextmanager
    def merged(self):
        """LoRA merged into the weights (inference speed: no adapter matmuls); on exit the frozen weights are put
        back bit for bit.

        peft's unmerge subtracts BA again, which leaves float error in W: every merge/unmerge cycle drifted the
        frozen weights a little, so a figure depended on how many generations had run before it in the process (and
        an evaluation resumed part-way could not reproduce an uninterrupted one). The copy costs the memory of the
        merged matrices (q/k/v/o: about 106 MB in fp32 for SmolLM2-135M, 180 MB for Qwen2.5-0.5B)."""
        if not self.has_lora:
            yield
            return
        from peft.tuners.lora import LoraLayer

        weights = [m.get_base_layer().weight for m in self.model.modules() if isinstance(m, LoraLayer)]
        saved = [w.detach().clone() for w in weights]
        self.model.merge_adapter()
        try:
            yield
        finally:
            self.model.unmerge_adapter()  # peft's bookkeeping (merged flags); then the exact values
            with torch.no_grad():
                for w, original in zip(weights, saved, strict=True):
                    w.copy_(original)

    def save(self, directory: str | Path, extra: dict | None = None) -> Path:
        return save_adapter(self, directory, extra)


def turn_token_id(router_cfg: RouterConfig, tokenizer) -> int | None:
    """The id of `router.experimental.turn_token` when the routers pool over the last turn (else None): a tokenizer without
    that token cannot mark turns, which is refused before any forward."""
    if router_cfg.pooling != "last_turn":
        return None
    token = router_cfg.experimental.turn_token
    found = tokenizer.convert_tokens_to_ids(token) if tokenizer is not None else None
    if found is None or (found == getattr(tokenizer, "unk_token_id", None) and token != getattr(tokenizer, "unk_token", None)):
        raise ConfigError(f"router.pooling=last_turn: router.experimental.turn_token {token!r} is not a token of this model's "
                          "tokenizer; set router.experimental.turn_token to the token that opens each chat turn")
    return int(found)


def _route(model: nn.Module, router_cfg: RouterConfig, tokenizer) -> RoutingState:
    """Wrap every block of `model` with its router (and skip bridge, when router.bridge_rank > 0), before peft, which
    then wraps them like every other module: the one construction of a new model and of a loaded adapter."""
    state = wrap_model(
        model, router_factory(model.config.hidden_size, router_cfg), pooling=router_cfg.pooling,
        threshold=router_cfg.threshold, turn_token_id=turn_token_id(router_cfg, tokenizer),
    )
    if router_cfg.bridge_rank:
        install_bridges(model, router_cfg.bridge_rank)
    return state


def build_routed_model(
    model_cfg: ModelConfig,
    router_cfg: RouterConfig | None = None,
    lora_cfg: LoraSettings | None = None,
    loaded: LoadedModel | None = None,
) -> RoutedModel:
    """Load the base model, wrap every block with a router, add LoRA; only routers and LoRA train."""
    router_cfg = router_cfg or RouterConfig()
    lora_cfg = lora_cfg or LoraSettings()
    loaded = loaded or load_base(model_cfg)
    model = loaded.model
    state = _route(model, router_cfg, loaded.tokenizer)
    if lora_cfg.enabled:
        model = apply_lora(model, lora_cfg)
    else:
        configure_trainable(model)
    return RoutedModel(model, loaded.tokenizer, loaded.identity, router_cfg, lora_cfg, state)


def _router_state_dict(rm: RoutedModel) -> dict[str, torch.Tensor]:
    tensors = {}
    for layer in find_routed_layers(rm.model):
        parts = [("", layer.router)] + ([(BRIDGE_PREFIX, layer.bridge)] if layer.bridge is not None else [])
        for prefix, module in parts:
            for name, value in module.state_dict().items():
                tensors[f"layers.{layer.index}.{prefix}{name}"] = value.detach().to("cpu").contiguous()
    return tensors


def save_adapter(rm: RoutedModel, directory: str | Path, extra: dict | None = None) -> Path:
    """Save PEFT's adapter files + router.safetensors + the tokenizer + layerroute.json, atomically."""
    tokenizer = tokenizer_identity(rm.tokenizer)
    meta = {
        "library": "layerroute",
        "version": __version__,
        "base_model": rm.identity,
        "dtype": rm.dtype,  # the frozen weights' dtype it trained in (LoRA, routers, bridges: float32)
        "router": asdict(rm.router_cfg),
        "lora": asdict(rm.lora_cfg),
        **({"tokenizer": tokenizer, "chat_template": chat_template.template_text(rm.tokenizer)} if tokenizer else {}),
        **(extra or {}),
    }

    def fill(tmp: Path) -> None:
        if rm.has_lora:
            rm.model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer:
            rm.tokenizer.save_pretrained(str(tmp))
        save_file(_router_state_dict(rm), str(tmp / ROUTER_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))

    return write_dir_atomically(directory, fill)


def training_config(directory: str | Path) -> dict:
    """The run config (a raw dict, before overrides) an adapter was trained with, without its model.chat_template:
    the adapter carries its template, and a Jinja file named at training time need not exist any more."""
    raw = dict(read_adapter_meta(directory).get("training", {}).get("config", {}))
    raw["model"] = {k: v for k, v in (raw.get("model") or {}).items() if k != "chat_template"}
    return raw


def read_adapter_meta(directory: str | Path) -> dict:
    directory = Path(directory)
    if not (directory / META_FILE).is_file():
        raise AdapterError(f"{directory} is not a layerroute adapter directory ({META_FILE} is missing)")
    pickled = [p.name for p in directory.iterdir() if p.suffix in _PICKLED]
    if pickled:
        raise AdapterError(
            f"{directory} holds pickled weights ({', '.join(pickled)}); layerroute loads safetensors only and "
            "never unpickles"
        )
    return json.loads((directory / META_FILE).read_text())


def check_base_matches(meta: dict, identity: dict, directory) -> None:
    """Refuse a base model whose shape, or (both being local files) size and hash, differ from the recorded
    one. The name and file name may differ: a moved or renamed file is the same model."""
    saved = meta.get("base_model", {})
    mismatched = [k for k, v in identity.items() if k not in ("name", "file") and k in saved and saved[k] != v]
    plain = saved.get("plain_text_tokens", []), identity.get("plain_text_tokens", [])
    if plain[0] != plain[1]:  # absent = none: an adapter trained on the text pieces must run with them
        raise AdapterError(
            f"adapter {directory} was trained with model.plain_text_tokens={plain[0]!r}, this model has "
            f"{plain[1]!r}: set model.plain_text_tokens as in training"
        )
    if mismatched:
        detail = ", ".join(f"{k}: adapter {saved[k]} vs model {identity[k]}" for k in mismatched)
        kinds = [kind for kind, keys in (("shape", set(mismatched) - {"size", "sha256"}),
                                         ("file", set(mismatched) & {"size", "sha256"})) if keys]
        raise AdapterError(
            f"adapter {directory} was trained on {describe_base(saved)}, whose {' and '.join(kinds)} differs from "
            f"the model loaded, {describe_base(identity)} ({detail})"
        )


def adapter_base_name(directory: str | Path, meta: dict | None = None) -> str:
    """The base model an adapter was trained on, as given then; a local file that is no longer there is an
    error that says how to point at its new place (the hash check then confirms it is the same file)."""
    meta = meta if meta is not None else read_adapter_meta(directory)
    base = meta.get("base_model", {})
    name = base.get("name")
    if not name:
        raise AdapterError(f"{directory}/{META_FILE} records no base model: pass the model with --model")
    if base.get("sha256") and not Path(name).expanduser().is_file():
        raise AdapterError(
            f"adapter {directory} was trained on {describe_base(base)}, which is no longer at {name}: pass its "
            "new path with --model (or model.name)"
        )
    return name


def _check_tokenizer(meta: dict, tokenizer, given: str, directory) -> None:
    recorded = meta.get("tokenizer")
    found = tokenizer_identity(tokenizer)
    if recorded and found and not same_tokenizer(recorded, found):
        raise AdapterError(
            f"adapter {directory} was trained with tokenizer {describe_tokenizer(recorded)}, but {given} is "
            f"{describe_tokenizer(found)}: drop it to use the adapter's own tokenizer"
        )


def _check_template(meta: dict, value: str, directory) -> None:
    recorded = meta.get("chat_template")
    text = chat_template.resolve(value)
    if recorded is not None and text != recorded:
        first = recorded.strip().splitlines()[0][:60] if recorded.strip() else ""
        raise AdapterError(
            f"adapter {directory} was trained with another chat template (sha256 "
            f"{chat_template.digest(recorded)[:12]}, {first!r}...) than {chat_template.KEY}={value!r} (sha256 "
            f"{chat_template.digest(text)[:12]}): drop the setting to use the adapter's own template"
        )


def adapter_tokenizer(directory: str | Path, meta: dict | None = None):
    """The tokenizer saved in an adapter, with its recorded chat template; None for adapters saved before the
    tokenizer was kept (or trained without one)."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    meta = meta if meta is not None else read_adapter_meta(directory)
    recorded = meta.get("tokenizer")
    if not recorded or not (directory / TOKENIZER_FILE).is_file():
        return None
    try:
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as err:
        raise AdapterError(f"{directory}: its saved tokenizer does not load: {err}") from err
    found = tokenizer_identity(tok)
    if not same_tokenizer(recorded, found):
        raise AdapterError(f"{directory}: the saved tokenizer files ({describe_tokenizer(found)}) are not the "
                           f"recorded tokenizer {describe_tokenizer(recorded)}; were they edited?")
    if meta.get("chat_template") is not None:
        tok.chat_template = meta["chat_template"]
    return tok


def init_lora_from(rm: RoutedModel, directory: str | Path, flag: str = "train.experimental.init_lora") -> int:
    """Start `rm`'s LoRA from the LoRA of a saved adapter (its routers are not read), e.g. routed training
    warm-started from a LoRA trained at full depth. The base model's shape and the LoRA settings (r, alpha, targets)
    must match; `flag` names the setting in errors. Returns the number of LoRA tensors loaded."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"{flag}: {directory} is not a directory")
    meta = read_adapter_meta(directory)
    check_base_matches(meta, rm.identity, directory)
    _check_tokenizer(meta, rm.tokenizer, "this run's tokenizer", directory)  # its LoRA learned those token ids
    if not rm.has_lora:
        raise ConfigError(f"{flag} needs lora.enabled: this run has no LoRA to start from {directory}")
    saved = from_dict(LoraSettings, meta["lora"], "lora")
    for name in ("r", "alpha", "targets"):
        if getattr(saved, name) != getattr(rm.lora_cfg, name):
            raise ConfigError(f"{flag}: {directory} has lora.{name}={getattr(saved, name)!r}, this run "
                              f"lora.{name}={getattr(rm.lora_cfg, name)!r}")
    weights = directory / "adapter_model.safetensors"
    if not weights.is_file():
        raise AdapterError(f"{flag}: {directory} has no adapter_model.safetensors (was it trained with LoRA?)")
    state = load_file(str(weights))
    result = set_peft_model_state_dict(rm.model, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise AdapterError(f"{flag}: the LoRA of {directory} does not fit this model (unexpected "
                           f"{list(result.unexpected_keys)[:3]}, missing {missing[:3]})")
    return len(state)


def load_adapter(
    directory: str | Path,
    model_cfg: ModelConfig | None = None,
    loaded: LoadedModel | None = None,
    trainable: bool = False,
) -> RoutedModel:
    """Load a base model (the adapter's own unless `model_cfg` names another) and put the adapter on it, with the
    adapter's saved tokenizer and chat template (old adapters: the base model's tokenizer, as before).

    `model_cfg.tokenizer` and `model_cfg.chat_template`, when set, must be the recorded ones (checked, not used)."""
    directory = Path(directory)
    meta = read_adapter_meta(directory)
    router_cfg = from_dict(RouterConfig, meta["router"], "router")
    lora_cfg = from_dict(LoraSettings, meta["lora"], "lora")
    saved_tok = adapter_tokenizer(directory, meta)
    if loaded is None:
        # the text pieces the adapter was trained on come with it, unless the caller names others (then checked)
        plain = meta["base_model"].get("plain_text_tokens", [])
        if model_cfg is None:
            model_cfg = ModelConfig(name=adapter_base_name(directory, meta), plain_text_tokens=plain)
        elif plain and not model_cfg.plain_text_tokens:
            model_cfg = replace(model_cfg, plain_text_tokens=plain)
        # the base's own tokenizer is loaded only when the adapter has none (an old adapter)
        loaded = load_base(model_cfg, tokenizer=saved_tok is None)
    check_base_matches(meta, loaded.identity, directory)
    if model_cfg is not None and model_cfg.tokenizer is not None:
        given = loaded.tokenizer if saved_tok is None else load_tokenizer(model_cfg.tokenizer)
        _check_tokenizer(meta, given, f"model.tokenizer={model_cfg.tokenizer}", directory)
    if model_cfg is not None and model_cfg.chat_template:
        _check_template(meta, model_cfg.chat_template, directory)
    tokenizer = saved_tok
    if tokenizer is None:
        tokenizer = loaded.tokenizer
        if tokenizer is not None and meta.get("chat_template") is not None:  # its files were removed
            _check_tokenizer(meta, tokenizer, f"the base model's tokenizer ({meta['base_model'].get('name')})",
                             directory)
            tokenizer.chat_template = meta["chat_template"]
    model = loaded.model
    state = _route(model, router_cfg, tokenizer)
    if lora_cfg.enabled:
        if not (directory / "adapter_model.safetensors").is_file():
            raise AdapterError(f"{directory} has LoRA enabled but no adapter_model.safetensors")
        model = PeftModel.from_pretrained(model, str(directory), is_trainable=trainable)
    rm = RoutedModel(model, tokenizer, loaded.identity, router_cfg, lora_cfg, state)
    if meta.get("dtype") and meta["dtype"] != rm.dtype:
        log.warning("%s trained with %s frozen weights, loaded in %s (model.dtype=%s): outputs differ by rounding; "
                    "model.dtype=%s reproduces the training numerics", directory, meta["dtype"], rm.dtype,
                    model_cfg.dtype if model_cfg is not None else "auto", meta["dtype"])
    tensors = load_file(str(directory / ROUTER_FILE))
    for layer in find_routed_layers(rm.model):
        prefix = f"layers.{layer.index}."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        bridge = {k[len(BRIDGE_PREFIX):]: own.pop(k) for k in list(own) if k.startswith(BRIDGE_PREFIX)}
        try:
            layer.router.load_state_dict(own)
            if layer.bridge is not None:
                layer.bridge.load_state_dict(bridge)
            elif bridge:
                raise RuntimeError("the file has a skip bridge but router.bridge_rank is 0")
        except RuntimeError as err:
            raise AdapterError(f"{directory}: router of block {layer.index} does not fit: {err}") from err
    if trainable:
        configure_trainable(rm.model)
    else:
        for p in rm.model.parameters():
            p.requires_grad_(False)
    rm.model.eval()
    return rm
