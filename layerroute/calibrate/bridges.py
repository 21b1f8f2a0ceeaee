"""The closed-form fit of the skip bridges (`layerroute.nn.bridge.SkipBridge`) on calibration tokens.

Each bridge is fitted to its block's residual update ``block(h) - h`` by reduced-rank least squares (ReplaceMe,
Shopkhoev et al. 2025, per block): one full-depth forward per batch accumulates X^T X and X^T D per block
(`fit_bridges`), then `reduced_rank_solution` gives the rank-r weights. No token is kept in memory.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..data.collate import collate_steps, length_grouped_batches
from ..nn.routed import find_routed_layers, routing


def reduced_rank_solution(gram: torch.Tensor, cross: torch.Tensor, rank: int, ridge: float = 1e-3):
    """The rank-r W minimising ||X W - D||^2 (+ ridge) from gram = X^T X and cross = X^T D, as (down, up) with
    W = down @ up (down [d, r], up [r, d]).

    Full least squares first, W = (G + lambda I)^-1 C with lambda = ridge * trace(G) / d, then the projection of its
    fitted values onto their top-r principal directions V (eigenvectors of W^T G W): W_r = W V V^T, the optimal
    rank-r fit (reduced-rank regression)."""
    gram, cross = gram.double(), cross.double()
    d = gram.shape[0]
    lam = ridge * float(torch.trace(gram)) / d
    w = torch.linalg.solve(gram + lam * torch.eye(d, dtype=gram.dtype, device=gram.device), cross)
    fitted_cov = w.T @ gram @ w
    _, vecs = torch.linalg.eigh((fitted_cov + fitted_cov.T) / 2)  # ascending eigenvalues
    v = vecs[:, -rank:]
    return w @ v, v.T


@torch.no_grad()
def fit_bridges(rm, steps, batch_size: int, pad_id: int, seed: int = 0, ridge: float = 1e-3,
                progress: bool = True) -> list[float]:
    """Fit every routed layer's bridge to its block's residual update on the tokens of `steps` (full depth, LoRA
    as it is now). Returns, per block, the fraction of the update's energy the rank-r bridge explains
    (1 - ||X W - D||^2 / ||D||^2 on the same tokens): 0 = no better than skipping, 1 = the block reproduced."""
    layers = find_routed_layers(rm.model)
    if not layers or any(layer.bridge is None for layer in layers):
        raise ValueError("fit_bridges needs a bridge on every routed layer (install_bridges first)")
    if not steps:
        raise ValueError("fit_bridges needs at least one calibration step")
    d = layers[0].bridge.down.in_features
    # accumulated where the model runs (no per-block copy of every token to the host), in float64
    acc = {"dtype": torch.float64, "device": rm.device}
    gram = [torch.zeros(d, d, **acc) for _ in layers]
    cross = [torch.zeros(d, d, **acc) for _ in layers]
    energy = [torch.zeros((), **acc) for _ in layers]  # ||D||^2 per block
    keep_now: dict = {}  # the current batch's non-padding positions, flattened

    def hook(i):
        def fn(block, args, out):
            h = args[0] if args else None
            if h is None or not torch.is_tensor(out):
                return
            keep = keep_now["keep"]
            x = block.input_layernorm(h).reshape(-1, d)[keep].double()
            delta = (out - h).reshape(-1, d)[keep].double()
            gram[i].add_(x.T @ x)
            cross[i].add_(x.T @ delta)
            energy[i].add_((delta * delta).sum())
        return fn

    handles = [layer.block.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    was_training = rm.model.training
    rm.model.eval()
    try:
        batches = length_grouped_batches(steps, batch_size, seed=seed)
        # one full-depth forward per batch: tens of seconds on a CPU for the offline default's 32 steps
        for batch_idx in tqdm(batches, desc="fit skip bridges", unit="batch", disable=not progress):
            batch = collate_steps([steps[i] for i in batch_idx], pad_id)
            mask = batch["attention_mask"].to(rm.device)
            keep_now["keep"] = mask.reshape(-1).bool()
            with routing(rm.model, "mix", forced="open"):
                rm.model(input_ids=batch["input_ids"].to(rm.device), attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
        rm.model.train(was_training)
    explained = []
    for i, layer in enumerate(layers):
        down, up = reduced_rank_solution(gram[i], cross[i], layer.bridge.rank, ridge)
        bridge = layer.bridge
        bridge.down.weight.copy_(down.T.to(bridge.down.weight.dtype))
        bridge.up.weight.copy_(up.T.to(bridge.up.weight.dtype))
        w = down @ up  # ||X W - D||^2 = tr(W^T G W) - 2 tr(W^T C) + ||D||^2: no token kept in memory
        total = float(energy[i])
        resid = float(torch.trace(w.T @ gram[i] @ w) - 2 * torch.trace(w.T @ cross[i])) + total
        explained.append(1.0 - resid / total if total > 0 else 0.0)
    return explained
