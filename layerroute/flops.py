"""Analytic FLOP accounting for Llama / Qwen2-family decoders, per agent step.

What is counted
---------------
Only matrix products, with one multiply-add = 2 FLOPs. For one decoder block, ``n`` new tokens that attend
causally to ``t = past + n`` positions (``h`` hidden, ``H`` query heads, ``G`` key/value heads, ``d`` head
dim, ``I`` MLP width)::

    q, o projections        2 * n * h * H*d      each
    k, v projections        2 * n * h * G*d      each (grouped-query attention: G < H makes them small)
    scores Q K^T            2 * H*d * pairs
    probabilities * V       2 * H*d * pairs
    MLP (SwiGLU)            3 * 2 * n * h * I    (gate, up, down)

``pairs`` is the exact number of (query, key) pairs a causal mask lets through, not the rectangle
``n * t``: query ``i`` of the new tokens (0-based) sees ``past + i + 1`` keys, so
``pairs = n * past + n * (n + 1) / 2``. Every query head computes its own scores, so the attention products
scale with ``H`` even when K/V are shared across heads. Prefilling ``n`` tokens at once and decoding them
one by one with a KV cache give the same count.

Not counted, because each is O(n * h) per block and together below 0.1% of a block at Qwen2.5-0.5B's
shape: RMSNorms, bias adds (Qwen2 has q/k/v biases), rotary embeddings, softmax, SiLU and the gating
product, residual adds, and the embedding lookup (a gather, no arithmetic).

The LM head costs ``2 * h * vocab`` per position that is projected to logits.

The router of each block pools the hidden states at the context positions (masked mean: ``h`` adds per
context position plus ``h`` divisions) and applies ``Linear(h, 1)`` (``2 * h``), or a bottleneck MLP
``Linear(h, r) -> act -> Linear(r, 1)`` (``2 * h * r + 2 * r``). It runs for every block, skipped or not,
because it is what decides. A session that keeps running sums would pool only the newly seen positions;
counting the whole context is the upper bound and still a rounding error.

A block that is skipped under the *kv-preserving* cache policy still projects K and V for its tokens (from
the residual stream it would have received) so that a later step that runs the block finds a complete
cache: ``kv_only_flops = 2 * (2 * n * h * G * d)`` (plus its input norm, not counted as above). That is
about 1.5% of a block for Qwen2.5-0.5B.

Convention for one step (``step_flops``)
----------------------------------------
* Exact policy (default, ``kv_preserving=False``): the step processes its context and its own tokens in one
  causal forward (teacher-forced, which costs the same as exact-policy generation: re-prefill the context
  with this step's decisions, then decode the step's tokens with a cache), through the blocks that run.
  Every block therefore costs ``block_flops(cfg, context_length + step_length)``; a skipped block costs 0.
* Kv-preserving policy (``kv_preserving=True``): the context is already in the cache (its cost was paid by
  earlier steps), so the step processes only its own tokens, attending to the cached context:
  a running block costs ``block_flops(cfg, step_length, n_past=context_length)`` and a skipped block costs
  ``kv_only_flops(cfg, step_length)``. The dense reference is then the plain model with a cache, so both
  totals describe the same execution.
* The LM head is applied at the step's own positions (``step_length`` of them, one per generated token),
  unless ``lm_head_positions`` says otherwise. It is never skipped.
* "block FLOPs skipped" = skipped block FLOPs / all block FLOPs (the paper's measure; it ignores the LM
  head, the routers and the K/V cost of skipped blocks).
* "total FLOPs skipped" = (dense total - routed total) / dense total, where the dense total is all blocks +
  LM head, and the routed total is the blocks that ran + LM head + every router + (kv-preserving) the K/V
  cost of the skipped blocks. It can be negative when nothing is skipped (the routers cost something).

A skipped block with a skip bridge of rank ``r`` (``layerroute.nn.bridge``) spends ``bridge_flops = 2 * 2 * n * h * r``
on the tokens it would have processed (down and up projections; its input norm is not counted, as above), counted
in ``block_run``: the bridge is what stands in for the block, so "block FLOPs skipped" is net of it.

``aggregate`` sums FLOPs over steps before dividing, so long steps weigh more, as they do in wall-clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from layerroute.errors import ConfigError

__all__ = [
    "ModelShape",
    "aggregate",
    "attention_flops",
    "attention_pairs",
    "block_flops",
    "bridge_flops",
    "from_model_config",
    "kv_only_flops",
    "lm_head_flops",
    "router_flops",
    "step_flops",
]


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder config that FLOPs depend on."""

    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the SwiGLU MLP (gate and up project to it, down projects back)."""
    num_attention_heads: int
    """Query heads."""
    num_key_value_heads: int
    """Key/value heads (grouped-query attention when fewer than the query heads)."""
    head_dim: int
    """Width of one head."""
    vocab_size: int
    """Rows of the LM head."""
    num_hidden_layers: int
    """Decoder blocks."""

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model shape: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"model shape: num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )


_REQUIRED = ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size", "num_hidden_layers")


def from_model_config(cfg: Any) -> ModelShape:
    """A ``ModelShape`` from a transformers config object, a plain dict of the same keys, or a ModelShape.

    ``num_key_value_heads`` defaults to ``num_attention_heads`` (no GQA) and ``head_dim`` to
    ``hidden_size // num_attention_heads`` when the config does not set them (or sets them to None).
    """
    if isinstance(cfg, ModelShape):
        return cfg
    if isinstance(cfg, Mapping):
        get = cfg.get
    else:

        def get(key: str, default: Any = None) -> Any:
            return getattr(cfg, key, default)

    missing = [k for k in _REQUIRED if get(k) is None]
    if missing:
        raise ConfigError(f"model config {type(cfg).__name__} lacks {', '.join(missing)}: cannot count FLOPs")
    heads = get("num_attention_heads")
    kv_heads = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or get("hidden_size") // heads
    return ModelShape(
        hidden_size=get("hidden_size"),
        intermediate_size=get("intermediate_size"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=get("vocab_size"),
        num_hidden_layers=get("num_hidden_layers"),
    )


def _check_count(name: str, value: int, *, allow_zero: bool = True) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
        bound = "a non-negative" if allow_zero else "a positive"
        raise ConfigError(f"{name} must be {bound} integer, got {value!r}")


def attention_pairs(n_new: int, n_past: int = 0) -> int:
    """Causal (query, key) pairs when ``n_new`` tokens follow ``n_past`` cached ones.

    Query i (0-based among the new tokens) sees ``n_past + i + 1`` keys.
    """
    _check_count("n_new", n_new)
    _check_count("n_past", n_past)
    return n_new * n_past + n_new * (n_new + 1) // 2


def block_flops(cfg: Any, n_new: int, n_past: int = 0) -> int:
    """Matmul FLOPs of one decoder block for ``n_new`` tokens attending causally to ``n_past + n_new``."""
    s = from_model_config(cfg)
    mlp = 3 * 2 * n_new * s.hidden_size * s.intermediate_size  # gate, up (h -> I), down (I -> h)
    return attention_flops(s, n_new, n_past) + mlp


def attention_flops(cfg: Any, n_new: int, n_past: int = 0) -> int:
    """The attention sub-block's share of `block_flops`: the q, k, v, o projections and the two attention products
    (what skipping attention alone saves; the MLP is the rest)."""
    s = from_model_config(cfg)
    _check_count("n_new", n_new)
    _check_count("n_past", n_past)
    h, q_width, kv_width = (
        s.hidden_size,
        s.num_attention_heads * s.head_dim,
        s.num_key_value_heads * s.head_dim,
    )
    projections = 2 * n_new * h * (2 * q_width + 2 * kv_width)  # q, o: h <-> H*d; k, v: h -> G*d
    attention = 2 * 2 * q_width * attention_pairs(n_new, n_past)  # Q K^T and P V, every query head
    return projections + attention


def kv_only_flops(cfg: Any, n_new: int) -> int:
    """What a skipped block still spends under the kv-preserving policy: its K and V projections."""
    s = from_model_config(cfg)
    _check_count("n_new", n_new)
    return 2 * (2 * n_new * s.hidden_size * s.num_key_value_heads * s.head_dim)


def bridge_flops(cfg: Any, n_new: int, rank: int) -> int:
    """What a skipped block's rank-``rank`` skip bridge spends on ``n_new`` tokens (0 for rank 0: no bridge)."""
    s = from_model_config(cfg)
    _check_count("n_new", n_new)
    _check_count("rank", rank)
    return 2 * 2 * n_new * s.hidden_size * rank


def lm_head_flops(cfg: Any, n_positions: int) -> int:
    """FLOPs of projecting ``n_positions`` hidden states to vocabulary logits."""
    s = from_model_config(cfg)
    _check_count("n_positions", n_positions)
    return 2 * s.hidden_size * s.vocab_size * n_positions


def router_flops(cfg: Any, n_context: int, router_hidden: int | None = None) -> int:
    """FLOPs of ONE block's router deciding once from ``n_context`` context positions.

    Masked-mean pooling (``h`` adds per position, ``h`` divisions) plus ``Linear(h, 1)``, or, with
    ``router_hidden = r``, a bottleneck ``Linear(h, r) -> act -> Linear(r, 1)`` (activation not counted).
    """
    s = from_model_config(cfg)
    _check_count("n_context", n_context)
    h = s.hidden_size
    pooling = h * n_context + h
    if router_hidden is None:
        return pooling + 2 * h
    _check_count("router_hidden", router_hidden, allow_zero=False)
    return pooling + 2 * h * router_hidden + 2 * router_hidden


def step_flops(
    cfg: Any,
    context_length: int,
    step_length: int,
    run_mask: Sequence[bool],
    *,
    kv_preserving: bool = False,
    lm_head_positions: int | None = None,
    router_hidden: int | None = None,
    count_routers: bool = True,
    prompt_full_depth: bool = False,
    bridge_rank: int = 0,
) -> dict:
    """FLOPs of one agent step, dense vs routed (see the module docstring for the convention).

    ``run_mask[l]`` is True when block l runs for this step. Set ``count_routers=False`` to describe a
    model without routers (a static-removal or random-skip baseline) with the same mask.
    ``prompt_full_depth``: every block processes the context; a skipped block skips the step's own tokens only
    (kv-preserving: it still writes their K/V).
    ``bridge_rank``: each skipped block's skip bridge rank (0 = none), counted in ``block_run``.

    Returns a dict with ``block_total`` (all blocks, dense), ``block_run`` (blocks that ran),
    ``block_skipped_fraction``, ``total_dense``, ``total_routed``, ``total_skipped_fraction``,
    ``per_block`` (FLOPs spent in each block by the routed forward: its full cost if it ran, its K/V cost if
    skipped under kv-preserving, else 0), ``lm_head``, ``router`` (all blocks' routers together), ``kv``
    (K/V cost of the skipped blocks), ``n_blocks``, ``n_run``, ``policy``.
    """
    s = from_model_config(cfg)
    _check_count("context_length", context_length)
    _check_count("step_length", step_length, allow_zero=False)
    mask = [bool(m) for m in run_mask]
    if len(mask) != s.num_hidden_layers:
        raise ConfigError(f"run_mask has {len(mask)} entries but the model has {s.num_hidden_layers} blocks")
    if lm_head_positions is None:
        lm_head_positions = step_length

    # spent_anyway: what a skipped block still spends (the context under prompt_full_depth; its skip bridge)
    spent_anyway = 0
    if prompt_full_depth:
        spent_anyway = block_flops(s, context_length) if context_length else 0
        one_block = spent_anyway + block_flops(s, step_length, n_past=context_length)
        skipped_cost = kv_only_flops(s, step_length) if kv_preserving else 0
        bridged = step_length  # the tokens a skipped block's bridge processes
    elif kv_preserving:
        one_block = block_flops(s, step_length, n_past=context_length)
        skipped_cost = kv_only_flops(s, step_length)
        bridged = step_length
    else:
        one_block = block_flops(s, context_length + step_length)
        skipped_cost = 0
        bridged = context_length + step_length
    spent_anyway += bridge_flops(s, bridged, bridge_rank)
    per_block = [one_block if run else spent_anyway + skipped_cost for run in mask]
    n_run = sum(mask)

    block_total = one_block * s.num_hidden_layers
    block_run = one_block * n_run + spent_anyway * (s.num_hidden_layers - n_run)
    kv = skipped_cost * (s.num_hidden_layers - n_run)
    lm_head = lm_head_flops(s, lm_head_positions)
    router = router_flops(s, context_length, router_hidden) * s.num_hidden_layers if count_routers else 0

    total_dense = block_total + lm_head
    total_routed = block_run + kv + lm_head + router
    return {
        "block_total": block_total,
        "block_run": block_run,
        "block_skipped_fraction": (block_total - block_run) / block_total,
        "total_dense": total_dense,
        "total_routed": total_routed,
        "total_skipped_fraction": (total_dense - total_routed) / total_dense,
        "per_block": per_block,
        "lm_head": lm_head,
        "router": router,
        "kv": kv,
        "n_blocks": s.num_hidden_layers,
        "n_run": n_run,
        "policy": "kv_preserving" if kv_preserving else "exact",
    }


_SUMMED = ("block_total", "block_run", "total_dense", "total_routed", "lm_head", "router", "kv")


def aggregate(steps_flops: Sequence[Mapping]) -> dict:
    """Sum FLOPs over steps, then take the fractions (a FLOP-weighted ratio, not a mean of ratios).

    Returns the same keys as ``step_flops`` (``per_block`` summed block by block, ``n_run`` summed over
    steps) plus ``n_steps``. An empty list gives zero totals and NaN fractions.
    """
    steps = list(steps_flops)
    out: dict = {key: sum(int(st[key]) for st in steps) for key in _SUMMED}
    widths = {len(st["per_block"]) for st in steps}
    if len(widths) > 1:
        raise ConfigError(f"aggregate: steps come from models with different block counts {sorted(widths)}")
    width = widths.pop() if widths else 0
    out["per_block"] = [sum(st["per_block"][i] for st in steps) for i in range(width)]
    out["n_blocks"] = width
    out["n_run"] = sum(int(st["n_run"]) for st in steps)
    out["n_steps"] = len(steps)
    nan = float("nan")
    bt, td = out["block_total"], out["total_dense"]
    out["block_skipped_fraction"] = (bt - out["block_run"]) / bt if bt else nan
    out["total_skipped_fraction"] = (td - out["total_routed"]) / td if td else nan
    policies = {st.get("policy") for st in steps}
    out["policy"] = policies.pop() if len(policies) == 1 else ("mixed" if policies else None)
    return out
