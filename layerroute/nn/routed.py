"""The wrapper around one decoder block: decision, training mix, real skip, KV-cache policy.

`wrap_model` replaces every entry of the model's decoder-layer list with a `RoutedLayer` that keeps the
original block as `.block` and calls it (the pattern of PEFT's LoRA layers and torchtune's layer dropout):
the model family's own forward runs unchanged, so any Llama/Qwen2-style model works without a copied forward.

All routed layers of a model share one `RoutingState` (`layerroute.nn.state`: the settings of a forward and the
verbs that read and write the layers' per-step state), set for a forward with the `routing(...)` context manager.
Modes:

- ``off``: the wrapper is transparent (the block always runs, no router is evaluated).
- ``mix`` (training and teacher-forced evaluation): the block always runs and its contribution is mixed by the
  hard gate with a straight-through gradient, ``h + g * (block(h) - h)``. Under ``torch.no_grad`` a block whose
  gate is closed for every row is not called (the result, ``h``, is the same).
- ``skip`` (inference): a block whose gate is closed is not called. The decision is taken once per *step*, at the
  first forward after ``new_step()`` (the prefill), and reused by every later forward of the step (decode).
  With the ``kv_preserving`` policy a skipped block still writes K/V for the step's tokens into the cache, so a
  later step that runs the block finds a complete cache. With ``exact`` it writes nothing (use `layerroute.nn.kv_cache.RoutedCache`).
  When the rows of a batch disagree, the block runs on the rows that run it only (gathered; `_RowsCache` keeps
  the cache layer one entry per row), so each row gets exactly its own decisions.
- With a skip bridge (``layer.bridge``, `layerroute.nn.bridge`) a closed gate returns ``h + bridge(norm(h))`` instead
  of ``h``, in every mode.

The decision for block l reads the hidden states *entering* block l, pooled over the decision mask (context
positions only). It never sees the step's own target tokens, so a decision made in training can be made at
inference.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .blocks import decoder_layers  # blocks.py knows where each family keeps its blocks
from .router import Router, hard_gate, masked_pool
from .state import KV_POLICIES, MODES, RoutingState, row_plan


@dataclass
class GateRecord:
    """What a routed layer decided in its last decision forward (one entry per batch row)."""

    logit: torch.Tensor  # [B] router logit (float32, detached)
    prob: torch.Tensor  # [B] sigmoid(logit); carries gradient in mix mode (soft regulariser)
    gate: torch.Tensor  # [B] applied gate in {0, 1}; carries the straight-through gradient in mix mode
    forced: bool  # True when the gate came from a forced pattern, not the router


class RoutedLayer(nn.Module):
    """One decoder block plus its router. The block is kept as `.block` and called, never copied."""

    def __init__(self, block: nn.Module, router: Router, index: int, state: RoutingState, pooling: str = "mean"):
        super().__init__()
        self.block = block
        self.router = router
        self.index = index
        self.pooling = pooling
        self.state = state
        self.decision: torch.Tensor | None = None  # [B] float gate for the current step (skip mode)
        # skip mode: "all" | "none" | (rows that run [R], rows that skip [B-R]) -- computed once per step from
        # `decision`, so decode forwards never read a device tensor back to the host (one sync per block per step)
        self.plan = None
        self.record: GateRecord | None = None
        self.pool_sum: torch.Tensor | None = None  # [B, H] session running sum of context states
        self.pool_count: torch.Tensor | None = None  # [B, 1]
        # what a closed gate returns: h, or h + bridge(norm(h)) with a SkipBridge (bridge.py; None = plain skip)
        self.bridge: nn.Module | None = None

    @property
    def sums(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The running context sum and count (session pooling) as they are now, None where there is none."""
        return None if self.pool_sum is None else (self.pool_sum, self.pool_count)

    def skipped(self, hidden: torch.Tensor) -> torch.Tensor:
        """The layer's output when its block does not run."""
        if self.bridge is None:
            return hidden
        return hidden + self.bridge(self.block.input_layernorm(hidden))

    # -- decision -------------------------------------------------------------------------------------------
    def _forced_gate(self, batch: int, device) -> torch.Tensor | None:
        forced = self.state.forced
        if forced is None:
            return None
        column = forced[..., self.index].to(device=device, dtype=torch.float32)
        return column.expand(batch) if column.dim() == 0 else column

    def _pooled_context(self, hidden: torch.Tensor) -> torch.Tensor:
        st = self.state
        mask = st.decision_mask
        # pooled in fp32 on every path (masked_pool too), so a bf16 backbone's decision by re-prefill and by a
        # session's running sums read the same vector; the routers are fp32
        if mask is None and self.pooling == "mean" and not st.session_pooling:
            return hidden.float().mean(dim=1)  # no padding, no targets: every position is context (one op, not five)
        if mask is None:
            mask = torch.ones(hidden.shape[:2], device=hidden.device, dtype=hidden.dtype)
        else:
            mask = self._with_drafts(mask, hidden)
        if mask.shape != hidden.shape[:2]:
            raise ValueError(
                f"decision_mask has shape {tuple(mask.shape)} but block {self.index} received hidden states of "
                f"shape {tuple(hidden.shape[:2])}; pass one mask entry per input position"
            )
        mask = mask.to(device=hidden.device, dtype=hidden.dtype)
        if not (st.session_pooling and self.pooling == "mean"):
            marks = None
            if self.pooling == "last_turn":
                marks = st.turn_marks
                if st.drafts and marks is not None and st.decision_mask is not None:  # a turn opened in a draft
                    marks = marks * (mask > 0)  # is not the context's
                if marks is None or marks.shape != mask.shape:
                    raise ValueError("router pooling last_turn needs input_ids in every forward (the turn markers "
                                     "are read from them); inputs_embeds alone cannot be routed this way")
            return masked_pool(hidden, mask, self.pooling, turn_marks=marks)
        step_sum = torch.einsum("bth,bt->bh", hidden.detach().float(), mask.float())
        step_count = mask.float().sum(dim=1, keepdim=True)
        if self.pool_sum is not None:
            step_sum, step_count = step_sum + self.pool_sum, step_count + self.pool_count
        return step_sum / step_count.clamp_min(1.0)

    def _with_drafts(self, mask: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The decision mask padded with zeros over the drafted tokens that follow the prompt (RoutingState.drafts)."""
        if self.state.drafts and mask.shape[0] == hidden.shape[0] and mask.shape[1] < hidden.shape[1]:
            return torch.nn.functional.pad(mask, (0, hidden.shape[1] - mask.shape[1]))
        return mask

    def _accumulate_session(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Add this forward's states entering the block to the session's running sum (defined whether or not
        the block runs). Decode tokens count: they are the step's output and the next step's context."""
        if mask is None:
            mask = torch.ones(hidden.shape[:2], device=hidden.device)
        mask = self._with_drafts(mask, hidden)
        part = torch.einsum("bth,bt->bh", hidden.detach().float(), mask.float())
        count = mask.float().sum(dim=1, keepdim=True)
        if self.pool_sum is None:
            self.pool_sum, self.pool_count = part, count
        else:
            self.pool_sum, self.pool_count = self.pool_sum + part, self.pool_count + count

    def decide(self, hidden: torch.Tensor) -> torch.Tensor:
        """Gate per row [B] in {0, 1} for the current forward (straight-through gradient in mix mode)."""
        st = self.state
        logit = self.router(self._pooled_context(hidden))  # [B]
        prob = torch.sigmoid(logit)
        forced = self._forced_gate(hidden.shape[0], hidden.device)
        if forced is not None:
            gate = forced
        elif st.mode == "mix" and st.straight_through:
            gate = hard_gate(prob, st.threshold)
        else:
            gate = (prob > st.threshold).float()
        if st.keep is not None and st.mode == "mix":
            gate = gate * st.keep[:, self.index].to(device=gate.device, dtype=gate.dtype)
        self.record = GateRecord(logit=logit.detach(), prob=prob, gate=gate, forced=forced is not None)
        return gate

    # -- forward --------------------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        st = self.state
        if st.mode == "off":
            return self.block(hidden_states, *args, **kwargs)
        if st.mode == "mix":
            gate = self.decide(hidden_states)
            if not torch.is_grad_enabled() and not bool(gate.any()) and not st.prompt_full_depth:
                return self.skipped(hidden_states)  # the gate mix below at g = 0: no need to run the block
            out = self.block(hidden_states, *args, **kwargs)
            g = gate.to(hidden_states.dtype).view(-1, 1, 1)
            if st.prompt_full_depth:  # context positions always take the block's output
                context = torch.ones_like(hidden_states[..., :1]) if st.decision_mask is None else \
                    st.decision_mask.to(device=hidden_states.device, dtype=hidden_states.dtype).unsqueeze(-1)
                g = torch.maximum(g, context)
            # The straight-through gate's value is 0 or 1 only up to rounding (hard + prob - prob), and a bridge
            # under an open gate must get exactly no gradient: Adam turns a 1e-8 gradient into a full-size step.
            # So the value mixes with the exact hard gate, and `through` (exactly 0 in value) carries the router's
            # gradient, d/dg = block(h) - (h + bridge). Without a bridge this is also what makes an open gate return
            # block(h) bit for bit: h + g * (block(h) - h) rounds twice, about one bf16 ulp of h per block.
            hard = g.detach().round()
            through = g - g.detach()
            closed = self.skipped(hidden_states)
            return hard * out + (1 - hard) * closed + through * (out - closed)
        # skip mode: decide once per step (prefill), reuse during decode
        if self.decision is None:
            self.decision = self.decide(hidden_states).detach()
            self.plan = row_plan(self.decision)
            if st.session_pooling:
                self._accumulate_session(hidden_states, st.decision_mask)
            if st.prompt_full_depth:  # the prefill runs at full depth; the decision applies from the next forward
                return self.block(hidden_states, *args, **kwargs)
        elif st.session_pooling:
            self._accumulate_session(hidden_states, None)
        plan = self.plan
        if plan == "all":
            return self.block(hidden_states, *args, **kwargs)
        if plan == "none":
            if st.kv_policy == "kv_preserving":
                self._write_kv(hidden_states, kwargs)
            return self.skipped(hidden_states)
        # Rows disagree: run the block on the rows that run it only (gathered). Its compute scales with those rows;
        # its weights are read once either way (memory-bound batch decode saves little; see RESULTS.md).
        return self._forward_rows(hidden_states, plan, args, kwargs)

    def _forward_rows(self, hidden: torch.Tensor, plan, args: tuple, kwargs: dict) -> torch.Tensor:
        """Run the block for a subset of the batch rows; the others pass through unchanged.

        Every batch-first argument (the 4D attention mask, RoPE cos/sin, position ids) is gathered to those rows,
        and the cache is seen through `_RowsCache`: the block writes K/V for its rows, the cache layer keeps one
        entry per batch row (the skipping rows get their projected K/V under ``kv_preserving``, zeros under
        ``exact``, where no later forward of theirs reads this layer in the step). Costs a gather of this layer's
        cached K/V for the running rows per forward; saves the block for the other rows.
        """
        rows, others = plan
        batch = hidden.shape[0]
        sub_args = tuple(_take_rows(a, rows, batch) for a in args)
        sub_kwargs = {k: _take_rows(v, rows, batch) for k, v in kwargs.items() if k != "past_key_values"}
        cache = kwargs.get("past_key_values")
        if cache is not None:
            fill = None
            if self.state.kv_policy == "kv_preserving" and kwargs.get("use_cache", True):
                skip_kwargs = {k: _take_rows(v, others, batch) for k, v in kwargs.items()}
                fill = self._skip_kv(hidden.index_select(0, others), skip_kwargs)
            sub_kwargs["past_key_values"] = _RowsCache(cache, rows, others, batch, fill)
        out_rows = self.block(hidden.index_select(0, rows), *sub_args, **sub_kwargs)
        return self.skipped(hidden).index_copy(0, rows, out_rows)

    def _skip_kv(self, hidden: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """This block's K/V (after RoPE) for `hidden` without running it: input norm + k, v projections."""
        attn = self.block.self_attn
        x = self.block.input_layernorm(hidden)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        key = attn.k_proj(x).view(shape).transpose(1, 2)  # [B, kv_heads, T, head_dim]
        value = attn.v_proj(x).view(shape).transpose(1, 2)
        if hasattr(attn, "k_norm"):  # families that normalise keys before RoPE
            key = attn.k_norm(key)
        cos, sin = kwargs["position_embeddings"]
        rotate_half = sys.modules[type(attn).__module__].rotate_half  # the family's own RoPE helper
        key = key * cos.unsqueeze(1) + rotate_half(key) * sin.unsqueeze(1)
        return key, value

    def _write_kv(self, hidden: torch.Tensor, kwargs: dict) -> None:
        """kv_preserving: compute and cache this block's K/V for the step's tokens without running it.

        Costs the input norm plus the k and v projections (about 1.5% of a Qwen2.5-0.5B block, whose grouped-query
        attention has 2 KV heads of 14)."""
        cache = kwargs.get("past_key_values")
        if cache is None or not kwargs.get("use_cache", True):
            return
        key, value = self._skip_kv(hidden, kwargs)
        cache.update(key, value, self.block.self_attn.layer_idx)


def _take_rows(value, rows: torch.Tensor, batch: int):
    """Gather batch rows of a batch-first tensor (or a tuple of them, e.g. RoPE's (cos, sin)); leave others."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, rows) if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, tuple | list):
        return type(value)(_take_rows(v, rows, batch) for v in value)
    return value


class _RowsCache:
    """The cache as seen by a block that runs for some batch rows only (`RoutedLayer._forward_rows`).

    `update` scatters the running rows' new K/V into a full-batch tensor (the other rows get `fill`, their own
    projected K/V, or zeros), appends it to the real cache, and returns the running rows' keys and values."""

    def __init__(self, cache, rows: torch.Tensor, others: torch.Tensor, batch: int, fill=None):
        self.cache, self.rows, self.others, self.batch, self.fill = cache, rows, others, batch, fill

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        full = []
        for i, part in enumerate((key_states, value_states)):
            whole = part.new_zeros((self.batch, *part.shape[1:]))
            whole.index_copy_(0, self.rows, part)
            if self.fill is not None:
                whole.index_copy_(0, self.others, self.fill[i].to(part.dtype))
            full.append(whole)
        keys, values = self.cache.update(full[0], full[1], layer_idx, *args, **kwargs)
        return keys.index_select(0, self.rows), values.index_select(0, self.rows)

    def __getattr__(self, name):
        return getattr(self.cache, name)


# ------------------------------------------------------------------------------------------------------------
def find_routed_layers(model: nn.Module) -> list[RoutedLayer]:
    """The routed layers of a model (through any PEFT wrapper), in depth order."""
    layers = [m for m in model.modules() if isinstance(m, RoutedLayer)]
    return sorted(layers, key=lambda m: m.index)


def routing_state(model: nn.Module) -> RoutingState:
    layers = find_routed_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no routed layers; call layerroute.nn.routed.wrap_model first")
    return layers[0].state


def _as_forced(forced, num_layers: int) -> torch.Tensor | None:
    """None | 'open' | 'closed' | sequence/tensor of bools [L] or [B, L] -> bool tensor or None."""
    if forced is None:
        return None
    if isinstance(forced, str):
        if forced not in ("open", "closed"):
            raise ValueError(f"forced gates must be 'open', 'closed' or a per-layer pattern, not {forced!r}")
        return torch.full((num_layers,), forced == "open", dtype=torch.bool)
    pattern = torch.as_tensor(forced).bool()
    if pattern.shape[-1] != num_layers:
        raise ValueError(f"forced pattern has {pattern.shape[-1]} entries for a model with {num_layers} blocks")
    return pattern


@contextmanager
def routing(
    model: nn.Module,
    mode: str = "mix",
    *,
    decision_mask: torch.Tensor | None = None,
    forced=None,
    threshold: float | None = None,
    kv_policy: str = "exact",
    session_pooling: bool = False,
    keep: torch.Tensor | None = None,
    straight_through: bool = True,
    prompt_full_depth: bool = False,
    drafts: bool = False,
):
    """Set how the routed layers behave for the forwards inside the block; restores the previous state after.

    forced: None (the routers decide), 'open', 'closed', or a bool pattern [L] (per block) or [B, L] (per row).
    keep: mix mode only, [B, L] bool: training-time block dropping applied on top of the decisions.
    straight_through: mix mode only: False stops the LM loss's gradient at the hard gates.
    prompt_full_depth: the context (decision_mask == 1 in mix mode, the prefill in skip mode) runs every block;
    the decisions apply to the step's own tokens only.
    drafts: skip mode, prompt-lookup generation: the deciding forward may hold drafted tokens after the
    decision_mask's positions (see RoutingState.drafts). Not with prompt_full_depth, whose prefill would run the
    drafts at full depth; under session_pooling the running sums after the deciding forward count rejected drafts
    too, so only the prompt's checkpoint is exact.
    """
    if drafts and (mode != "skip" or prompt_full_depth):
        raise ValueError("drafts (prompt lookup) needs skip mode without prompt_full_depth")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if kv_policy not in KV_POLICIES:
        raise ValueError(f"kv_policy must be one of {KV_POLICIES}, not {kv_policy!r}")
    st = routing_state(model)
    saved = (st.mode, st.decision_mask, st.forced, st.threshold, st.kv_policy, st.session_pooling, st.keep,
             st.straight_through, st.prompt_full_depth, st.drafts)
    st.mode, st.decision_mask, st.kv_policy, st.session_pooling = mode, decision_mask, kv_policy, session_pooling
    st.keep, st.straight_through, st.prompt_full_depth, st.drafts = keep, straight_through, prompt_full_depth, drafts
    st.forced = _as_forced(forced, st.num_layers)
    if threshold is not None:
        st.threshold = threshold
    if not session_pooling:
        st.reset_session()
    st.new_step()
    try:
        yield st
    finally:
        (st.mode, st.decision_mask, st.forced, st.threshold, st.kv_policy, st.session_pooling, st.keep,
         st.straight_through, st.prompt_full_depth, st.drafts) = saved
        st.new_step()


def gate_records(model: nn.Module) -> list[GateRecord]:
    """The last decision of every routed layer, in depth order (raises if a layer has not decided yet)."""
    records = []
    for layer in find_routed_layers(model):
        if layer.record is None:
            raise RuntimeError(f"routed layer {layer.index} has not taken a decision yet")
        records.append(layer.record)
    return records


def wrap_model(model: nn.Module, router_factory, pooling: str = "mean", threshold: float = 0.5,
               turn_token_id: int | None = None) -> RoutingState:
    """Replace every decoder block of `model` in place with a RoutedLayer; returns the shared state.

    router_factory(index) -> Router builds the router for block `index` (so parameters land on the block's
    device and dtype policy is decided in one place, model.py). pooling="last_turn" also hooks the input
    embeddings to note where `turn_token_id` sits in each forward's input_ids."""
    layers = decoder_layers(model)
    if any(isinstance(layer, RoutedLayer) for layer in layers):
        raise ValueError("model is already wrapped with routed layers")
    state = RoutingState(threshold=threshold, num_layers=len(layers))
    if pooling == "last_turn":
        def note_turn_marks(_module, args):
            ids = args[0] if args else None
            state.turn_marks = None if ids is None or turn_token_id is None else ids == turn_token_id

        state.turn_hook = model.get_input_embeddings().register_forward_pre_hook(note_turn_marks)
    for i, block in enumerate(layers):
        device = next(block.parameters()).device
        router = router_factory(i).to(device)
        layers[i] = RoutedLayer(block, router, i, state, pooling=pooling)
        state.layers.append(layers[i])
    return state


def unwrap_model(model: nn.Module) -> None:
    """Put the original blocks back (routers are dropped)."""
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        if isinstance(layer, RoutedLayer):
            if layer.state.turn_hook is not None:  # last_turn pooling's hook on the input embeddings
                layer.state.turn_hook.remove()
                layer.state.turn_hook = None
            layers[i] = layer.block
