"""The routing state the routed layers of one model share, and its verbs: the only code besides `RoutedLayer`
itself that reads or writes a layer's per-step state (decision, row plan, running context sums).

`RoutingState` holds a forward's settings (mode, decision mask, forced gates, threshold, KV policy, ...; set with
`layerroute.nn.routed.routing`) and the layers it serves; its verbs forget a step's decisions (`new_step`,
`reset_session`), read and impose them (`decisions`, `impose`, `Decisions`), keep some batch rows (`take_rows`),
and put one request's running sums on the layers and take them back (`request_sums`, `HeldSums`). `row_plan`
turns a [B] gate into the rows that run a block. Nothing outside `layerroute/nn/` assigns a routed layer's state
(tests/test_routing_state.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

MODES = ("off", "mix", "skip")
KV_POLICIES = ("exact", "kv_preserving")


@dataclass
class RoutingState:
    """What every routed layer of one model reads during a forward. Set it with `routing(...)`."""

    mode: str = "off"
    decision_mask: torch.Tensor | None = None  # [B, T] 1 = context position the router may read
    forced: torch.Tensor | None = None  # [L] or [B, L] bool: gates to apply instead of the routers'
    # [B, L] bool, mix mode only: training-time block dropping (LayerSkip-style); a False closes the block for
    # that row on top of the router's decision, so LoRA learns paths that work without it
    keep: torch.Tensor | None = None
    threshold: float = 0.5
    # mix mode: the hard gate carries the sigmoid's gradient (straight-through), so the LM loss trains the routers;
    # False = the gate is a constant for autograd and the routers learn only from the losses on their probabilities
    straight_through: bool = True
    kv_policy: str = "exact"
    # the step's context (decision_mask == 1) runs every block; the decisions apply to the step's own tokens only
    # (its generated tokens at inference, its target tokens in mix mode). Saves decode compute only; a diagnostic
    # of whether skipping hurts through the context's representation or through the output path
    prompt_full_depth: bool = False
    # keep per-block running sums of the context states so a session's next step pools over all its context
    session_pooling: bool = False
    # prompt-lookup generation: transformers' first forward holds the prompt and the first drafted tokens after it;
    # the decision reads the decision_mask's (prompt) positions only, the drafts counting as masked out. Exact:
    # under causal attention the prompt positions' states do not depend on the tokens after them
    drafts: bool = False
    # router pooling last_turn: where the turn-opening token sits in the current forward's input (set by a hook on
    # the input embeddings, so every caller's forward provides it)
    turn_marks: torch.Tensor | None = None
    turn_hook: object | None = field(default=None, repr=False)
    num_layers: int = 0
    layers: list = field(default_factory=list, repr=False)

    # -- the verbs: the only code outside RoutedLayer that reads or writes the layers' per-step state ----------
    def new_step(self) -> None:
        """Forget this step's decisions: the next forward decides again (the next agent step's prefill)."""
        for layer in self.layers:
            layer.decision = None
            layer.plan = None

    def reset_session(self) -> None:
        """Forget the running context sums too (a new conversation)."""
        self.new_step()
        self.set_sums(None)

    def decisions(self) -> Decisions:
        """This step's decisions, one [B] float gate per block (after the deciding forward, skip mode)."""
        missing = [layer.index for layer in self.layers if layer.decision is None]
        if missing:
            raise RuntimeError(f"routed layers {missing} have not decided this step")
        return Decisions([layer.decision.reshape(-1).float() for layer in self.layers])

    def impose(self, decisions: Decisions) -> None:
        """Make `decisions` this step's (skip mode): the next forwards reuse them instead of deciding, each row
        of the batch with its own gates (e.g. rows prefilled alone, then decoded together)."""
        for layer, gate, plan in zip(self.layers, decisions.gates, decisions.plans, strict=True):
            layer.decision, layer.plan = gate, plan

    def take_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows of this step's decisions (finished rows leave a running batch)."""
        for layer in self.layers:
            if layer.decision is not None:
                layer.decision = layer.decision.index_select(0, rows)
                layer.plan = row_plan(layer.decision)  # one host sync per block per drop, not per token

    def sums(self) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Each block's running context sum and count (session pooling), None where there is none yet."""
        return [None if layer.pool_sum is None else (layer.pool_sum, layer.pool_count) for layer in self.layers]

    def set_sums(self, sums: Sequence[tuple[torch.Tensor, torch.Tensor] | None] | None) -> None:
        """Put one request's running context sums on the layers (None: none, a fresh context)."""
        for i, layer in enumerate(self.layers):
            pair = sums[i] if sums else None
            layer.pool_sum, layer.pool_count = pair if pair is not None else (None, None)

    @contextmanager
    def request_sums(self, sums: Sequence[tuple[torch.Tensor, torch.Tensor] | None] | None = None):
        """The running sums of one request for the forwards inside: put on the layers at entry, taken back at exit
        (`.sums` of the yielded holder, also after an error), the layers left without any for the next request."""
        self.set_sums(sums)
        held = HeldSums()
        try:
            yield held
        finally:
            held.sums = self.sums()
            self.set_sums(None)


@dataclass
class HeldSums:
    """What `RoutingState.request_sums` took back from the layers: one (sum, count) or None per block."""

    sums: list | None = None


class Decisions:
    """Per-block gates of the rows of a batch ([B] float each), with each block's row plan derived once (one host
    sync per block, at first use), so decode forwards never read a device tensor back to the host."""

    def __init__(self, gates: Sequence[torch.Tensor]):
        self.gates = list(gates)
        self._plans: list | None = None

    @property
    def plans(self) -> list:
        if self._plans is None:
            self._plans = [row_plan(d) for d in self.gates]
        return self._plans

    def take_rows(self, rows: torch.Tensor) -> Decisions:
        return Decisions([d.index_select(0, rows) for d in self.gates])

    def concat(self, other: Decisions) -> Decisions:
        """These rows, then `other`'s (a row joining the batch)."""
        return Decisions([torch.cat([a, b]) for a, b in zip(self.gates, other.gates, strict=True)])


def row_plan(decision: torch.Tensor):
    """'all' | 'none' | (rows that run, rows that skip) as index tensors, from a [B] gate."""
    run = (decision > 0.5).tolist()  # the step's one host sync for this block
    if all(run):
        return "all"
    if not any(run):
        return "none"
    rows = [i for i, r in enumerate(run) if r]
    others = [i for i, r in enumerate(run) if not r]
    device = decision.device
    return torch.tensor(rows, device=device), torch.tensor(others, device=device)
