"""The per-block router and the straight-through hard gate (plain torch).

A router reads the hidden states *entering* its block at the context positions of a step, pools them
into one vector per row and outputs one logit. The gate is hard (run the block or not); its gradient is the
sigmoid's (straight-through estimator), so training sees exactly the decisions inference will take.

Router kinds are classes (`RouterSpec`: `LinearRouterSpec`, `MlpRouterSpec`, looked up by name in `ROUTER_KINDS`):
each builds its network and knows its parameter count and the FLOPs of one decision, so evaluation, the benchmark
and the serving engine all ask the spec (`router_spec(cfg)`, `RoutedModel.router_spec`) instead of deriving the
cost from the kind's name. Adding a kind is one class here plus its name in `layerroute.config.sections.RouterKind`.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
from torch import nn

from .. import flops

POOLINGS = ("mean", "last", "last_turn")


def last_turn_mask(mask: torch.Tensor, turn_marks: torch.Tensor) -> torch.Tensor:
    """The part of a decision mask [B, T] from its second-to-last turn marker on: the context's last message and
    the assistant header that opens the step (ChatML: `<|im_start|>tool ...<|im_end|> <|im_start|>assistant`).

    turn_marks [B, T] bool: where a turn-start token sits. Only marks inside the mask count; a row with fewer
    than two keeps its whole mask. Depends on the tokens from that marker on only, so a session's prefill that
    starts before it (the previous turn's end, then the new message) gets the same positions as the full context.
    """
    marks = (turn_marks.to(mask.device) & (mask > 0)).long()
    seen = marks.cumsum(dim=1)  # [B, T]: marks at or before each position
    total = seen[:, -1:]  # [B, 1]
    return mask * (seen >= total - 1).to(mask.dtype)


def masked_pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str = "mean",
                turn_marks: torch.Tensor | None = None) -> torch.Tensor:
    """Pool `hidden` [B, T, H] over the positions where `mask` [B, T] is 1 -> [B, H].

    `mask` is the *decision* mask (context positions only, never padding, never the step's targets);
    a row whose mask is empty pools to zeros rather than NaN. pooling="last_turn" is the mean over
    `last_turn_mask(mask, turn_marks)`. Pools in fp32 whatever the backbone's dtype (a bf16 mean over hundreds of
    positions keeps 2-3 significant digits, enough to move a decision near the threshold); a no-op in fp32.
    """
    hidden = hidden.float()
    mask = mask.to(hidden.dtype)
    if pooling == "last_turn":
        if turn_marks is None:
            raise ValueError("last_turn pooling needs the turn-start marks of the input (router.experimental.turn_token)")
        mask, pooling = last_turn_mask(mask, turn_marks), "mean"
    if pooling == "mean":
        total = torch.einsum("bth,bt->bh", hidden, mask)  # [B, H]
        count = mask.sum(dim=1, keepdim=True).clamp_min(1.0)  # [B, 1]
        return total / count
    if pooling == "last":
        # index of the last 1 in each row; rows without any context fall back to position 0
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask > 0, positions, torch.zeros_like(positions)).amax(dim=1)  # [B]
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")


def hard_gate(prob: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """1.0 where prob > threshold else 0.0, with the gradient of `prob` (straight-through)."""
    hard = (prob > threshold).to(prob.dtype)
    return hard + prob - prob.detach()


@dataclass(frozen=True)
class RouterSpec:
    """One router kind and its size: what `Router` builds, its parameter count, the FLOPs of one decision."""

    name: ClassVar[str]

    @classmethod
    def from_settings(cls, cfg: Any) -> RouterSpec:
        """The spec from the router settings (`layerroute.config.RouterConfig` or anything with its fields)."""
        return cls()

    def build(self, hidden_size: int) -> nn.Module:
        """The router's network: pooled [B, H] -> [B, 1]."""
        raise NotImplementedError

    def output_layer(self, net: nn.Module) -> nn.Linear:
        """The final projection of a network `build` made (its bias is what a bias-only router decides from)."""
        raise NotImplementedError

    def num_parameters(self, hidden_size: int) -> int:
        raise NotImplementedError

    @property
    def flop_width(self) -> int | None:
        """`router_hidden` of `layerroute.flops.step_flops` / `router_flops`: None for a `Linear(h, 1)` router."""
        raise NotImplementedError

    def flops(self, model_config: Any, n_context: int) -> int:
        """FLOPs of one block's router deciding once from `n_context` context positions (pooling included)."""
        return flops.router_flops(model_config, n_context, self.flop_width)


@dataclass(frozen=True)
class LinearRouterSpec(RouterSpec):
    """The paper's `Linear(hidden, 1)` (897 parameters at hidden 896)."""

    name: ClassVar[str] = "linear"

    def build(self, hidden_size: int) -> nn.Module:
        return nn.Linear(hidden_size, 1)

    def output_layer(self, net: nn.Module) -> nn.Linear:
        return net

    def num_parameters(self, hidden_size: int) -> int:
        return hidden_size + 1

    @property
    def flop_width(self) -> int | None:
        return None


@dataclass(frozen=True)
class MlpRouterSpec(RouterSpec):
    """A bottleneck MLP, hidden -> bottleneck -> SiLU -> 1 (FlexiDepth found it stronger than a linear router)."""

    bottleneck: int = 64
    name: ClassVar[str] = "mlp"

    @classmethod
    def from_settings(cls, cfg: Any) -> RouterSpec:
        return cls(bottleneck=cfg.experimental.bottleneck)

    def build(self, hidden_size: int) -> nn.Module:
        return nn.Sequential(nn.Linear(hidden_size, self.bottleneck), nn.SiLU(), nn.Linear(self.bottleneck, 1))

    def output_layer(self, net: nn.Module) -> nn.Linear:
        return net[-1]

    def num_parameters(self, hidden_size: int) -> int:
        return hidden_size * self.bottleneck + self.bottleneck + self.bottleneck + 1

    @property
    def flop_width(self) -> int | None:
        return self.bottleneck


#: router.kind -> its spec class (the names `layerroute.config.sections.RouterKind` accepts).
ROUTER_KINDS: dict[str, type[RouterSpec]] = {spec.name: spec for spec in (LinearRouterSpec, MlpRouterSpec)}


def router_spec(cfg: Any) -> RouterSpec:
    """The spec of the router settings `cfg` (`kind`, and the kind's own fields such as `experimental.bottleneck`)."""
    if cfg.kind not in ROUTER_KINDS:
        raise ValueError(f"unknown router kind {cfg.kind!r}; expected one of {sorted(ROUTER_KINDS)}")
    return ROUTER_KINDS[cfg.kind].from_settings(cfg)


class Router(nn.Module):
    """One block's router: pooled context state -> one logit (run the block when sigmoid(logit) > threshold).

    kind: a `RouterSpec` or its name in `ROUTER_KINDS` ("linear": the paper's `Linear(hidden, 1)`; "mlp": a
    bottleneck MLP of width `bottleneck`).

    The pooled vector is RMS-normalised without parameters first: the residual stream's scale grows with depth
    (tens of units in the middle of a 0.5B model), and without this one learning rate is wrong for every block.
    It adds no parameters, so the paper's counts hold.
    """

    def __init__(
        self,
        hidden_size: int,
        kind: str | RouterSpec = "linear",
        bottleneck: int = 64,
        init_bias: float = 2.0,
        normalize_input: bool = True,
        eps: float = 1e-6,
    ):
        super().__init__()
        if isinstance(kind, str):
            if kind not in ROUTER_KINDS:
                raise ValueError(f"unknown router kind {kind!r}; expected one of {sorted(ROUTER_KINDS)}")
            kind = ROUTER_KINDS[kind].from_settings(_Settings(kind, SimpleNamespace(bottleneck=bottleneck)))
        self.spec = kind
        self.kind = kind.name
        self.normalize_input = normalize_input
        self.eps = eps
        self.net = kind.build(hidden_size)
        out = kind.output_layer(self.net)
        # Start every block open and input-independent: zero weights on the output, a uniform bias
        # (sigmoid(2.0) = 0.88). The router learns input dependence from the straight-through gradient.
        nn.init.zeros_(out.weight)
        nn.init.constant_(out.bias, init_bias)

    @property
    def output_bias(self) -> torch.Tensor:
        """The bias of the final projection: what a bias-only router would decide from."""
        return self.spec.output_layer(self.net).bias

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled [B, H] -> logit [B]."""
        x = pooled.float()
        if self.normalize_input:
            x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        x = x.to(next(self.net.parameters()).dtype)  # the first layer's weight
        return self.net(x).squeeze(-1).float()


@dataclass(frozen=True)
class _Settings:
    """The fields a spec reads from router settings (`kind`, `experimental.bottleneck`), for
    `Router(hidden, kind="mlp", bottleneck=...)`."""

    kind: str
    experimental: SimpleNamespace
