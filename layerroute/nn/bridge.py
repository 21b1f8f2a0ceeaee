"""Skip bridges: a low-rank linear stand-in for a block whose gate is closed.

Without a bridge a skipped block contributes nothing: the layer returns ``h``. With one it returns
``h + up(down(norm(h)))``, where ``norm`` is the block's own (frozen) input norm and ``down``/``up`` have rank r. The
bridge is fitted in closed form to the block's residual update ``block(h) - h`` on calibration tokens (reduced-rank
least squares, the idea of ReplaceMe, Shopkhoev et al. 2025, applied per block and only when the router skips), and
it then trains with LoRA. The fit needs calibration data, so it lives in `layerroute.calibrate.bridges`. It gives the skipped path something to learn with that does not also change the full-depth
path: LoRA's weights serve both paths, a bridge acts only where its block is skipped.

Cost when a block is skipped: the norm plus 4 * hidden * r FLOPs per token (r = 16, SmolLM2's hidden 576: 37 kFLOPs
against about 7 MFLOPs for the block at short context, 0.5%). Parameters: 2 * hidden * r per block.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .routed import find_routed_layers


class SkipBridge(nn.Module):
    """h_norm -> up(down(h_norm)), rank r. Starts as zero (up = 0: the plain skip) until fitted
    (`layerroute.calibrate.bridges.fit_bridges`)."""

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, hidden_size, bias=False)
        nn.init.zeros_(self.up.weight)

    @property
    def rank(self) -> int:
        return self.down.out_features

    def forward(self, normed: torch.Tensor) -> torch.Tensor:
        # fp32 parameters like the routers (a bf16 backbone would make them train badly); the result comes back in
        # the residual stream's dtype
        return self.up(self.down(normed.to(self.down.weight.dtype))).to(normed.dtype)


def install_bridges(model: nn.Module, rank: int) -> int:
    """Give every routed layer of `model` a zero fp32 SkipBridge of rank `rank` (on its block's device).
    Call before LoRA is applied (peft then wraps the bridges with everything else). Returns the parameter count."""
    if rank < 1:
        raise ValueError(f"bridge rank must be >= 1, not {rank}")
    count = 0
    for layer in find_routed_layers(model):
        if layer.bridge is not None:
            raise ValueError(f"routed layer {layer.index} already has a bridge")
        ref = next(layer.block.parameters())
        hidden = layer.block.input_layernorm.weight.shape[0]
        if rank > hidden:
            raise ConfigError(f"router.bridge_rank {rank} exceeds the model's hidden size {hidden}")
        layer.bridge = SkipBridge(hidden, rank).to(device=ref.device)
        count += sum(p.numel() for p in layer.bridge.parameters())
    return count
