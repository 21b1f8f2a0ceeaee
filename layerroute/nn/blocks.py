"""Where each model family keeps its decoder blocks: the one module that knows (`decoder_layers`).

Plain torch, below everything that edits the block list: `routed.wrap_model` puts routers around the blocks it
finds here, `generate` and the tests read them.
"""

from __future__ import annotations

from torch import nn

from ..errors import ModelLoadError


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
        f"in model.layers (Llama, Qwen2, Mistral, ...). Add the path for this family in layerroute/nn/blocks.py."
    )
