"""ShortGPT block influence (1 - cos(h_in, h_out) of each block), measured three ways from one hook:

- `block_influence`: the mean over a set of steps at full depth: the equal-FLOP ShortGPT baseline (evaluate)
  and the influence-ordered router initialisation (train, `router.init_bias_spread`).
- `RowInfluence`: per batch row, during a training forward: the per-step targets of `router_loss=targets` with `oracle_source=influence`.
- `influence_targets`: the k least influential blocks of each row as skip targets.

The hook sits on each routed layer's inner block, so it sees the block's own output whatever its gate: a hook on
the routed layer would see h_out = h_in for a closed gate (influence 0) and call every closed block skippable
forever. What it costs: one cosine over [B, T, H] per block, no extra forward.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..data.collate import collate_steps, length_grouped_batches
from ..nn.losses import row_argmax_errors, sliced_lm_loss
from ..nn.routed import find_routed_layers, routing
from ..special_tokens import pad_token_id


class RowInfluence:
    """Context manager: while active, every forward of the routed model's blocks adds each row's token-mean
    1 - cos(h_in, block(h_in)) over `mask`. `.value` is [L, B] float32 (detached) once the forward ran."""

    def __init__(self, model: torch.nn.Module, mask: torch.Tensor):
        self.layers = find_routed_layers(model)
        self.mask = mask.float()  # [B, T]: 1 on the tokens that count
        self.rows: list[torch.Tensor | None] = [None] * len(self.layers)
        self._handles = []

    def _hook(self, index: int):
        def hook(block, args, out):
            h_in = args[0] if args else None
            if h_in is None or not torch.is_tensor(out):
                return
            with torch.no_grad():
                cos = torch.nn.functional.cosine_similarity(h_in.float(), out.float(), dim=-1)  # [B, T]
                m = self.mask.to(cos.device)
                self.rows[index] = 1.0 - (cos * m).sum(-1) / m.sum(-1).clamp_min(1.0)  # [B]

        return hook

    def __enter__(self) -> RowInfluence:
        self._handles = [layer.block.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def value(self) -> torch.Tensor:
        missing = [i for i, r in enumerate(self.rows) if r is None]
        if missing:  # a block that did not run (a hard skip outside mix mode) has no influence to report
            raise RuntimeError(f"blocks {missing} did not run under RowInfluence")
        return torch.stack(self.rows)  # [L, B]


def influence_targets(influence: torch.Tensor, n_skip: torch.Tensor) -> torch.Tensor:
    """[L, B] run targets (1 = run, 0 = skip): in row b, the n_skip[b] blocks of lowest influence are skipped."""
    L = influence.shape[0]
    rank = influence.argsort(dim=0).argsort(dim=0)  # [L, B]: 0 = least influential block of the row
    return (rank >= n_skip.to(influence.device).clamp(0, L).unsqueeze(0)).to(influence.dtype)


@torch.no_grad()
def block_influence(rm, steps, cfg, pad_id: int | None = None, progress: bool = True) -> list[float]:
    """ShortGPT's block influence per block: 1 - mean cosine(h_in, h_out) over (non-padding) tokens, full depth,
    averaged over every token of `steps` (cfg: batch_size and seed of the batching)."""
    L = rm.num_layers
    sums = torch.zeros(L, dtype=torch.float64)
    tokens = 0
    pad = pad_token_id(rm.tokenizer) if pad_id is None else pad_id
    batches = length_grouped_batches(steps, cfg.batch_size, seed=cfg.seed)
    for batch_idx in tqdm(batches, desc="block influence", unit="batch", disable=not progress):
        batch = collate_steps([steps[i] for i in batch_idx], pad)
        mask = batch["attention_mask"].to(rm.device)
        with RowInfluence(rm.model, mask) as probe, routing(rm.model, "mix", forced="open"):
            rm.model(input_ids=batch["input_ids"].to(rm.device), attention_mask=mask)
        n = mask.sum(-1).double().cpu()  # [B] tokens per row: weight each row's mean by its length
        sums += (probe.value.double().cpu() * n).sum(-1)
        tokens += int(n.sum())
    return (sums / max(tokens, 1)).tolist()


@torch.no_grad()
def skip_set_cost(rm, steps, cfg, skipped, pad_id: int | None = None) -> tuple[float, float]:
    """(target NLL in nats per target token, fraction of target tokens that are not the argmax given the gold prefix)
    of `steps` with the blocks in `skipped` removed, every other block running, LoRA as it is. One teacher-forced pass
    (cfg: batch_size, seed of the batching, prompt_full_depth); an empty `skipped` is the full-depth model.

    Its own forward (calibration does not import the evaluator): the same batches, routing and losses as
    `layerroute.eval.teacher_forced` with LoRA on and forced gates, summed in step order."""
    skipped = set(skipped)
    pad = pad_token_id(rm.tokenizer) if pad_id is None else pad_id
    per_step: list[tuple[float, int, int] | None] = [None] * len(steps)  # (nll, tokens, errors)
    run = torch.tensor([j not in skipped for j in range(rm.num_layers)])
    for batch_idx in length_grouped_batches(steps, cfg.batch_size, seed=cfg.seed):
        batch = collate_steps([steps[i] for i in batch_idx], pad)
        batch = {k: v.to(rm.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        if skipped:
            route = routing(rm.model, "mix", decision_mask=batch["decision_mask"],
                            forced=run.expand(len(batch_idx), -1), prompt_full_depth=cfg.prompt_full_depth)
        else:
            route = routing(rm.model, "mix", decision_mask=batch["decision_mask"], forced="open")
        with route:
            sums, counts, logits, rows = sliced_lm_loss(rm.model, batch["input_ids"], batch["attention_mask"],
                                                        batch["labels"], return_logits=True)
            errors = row_argmax_errors(logits, batch["labels"], rows)
        for j, i in enumerate(batch_idx):
            per_step[i] = (float(sums[j]), int(counts[j]), int(errors[j]))
    tokens = max(sum(r[1] for r in per_step), 1)
    return sum(r[0] for r in per_step) / tokens, sum(r[2] for r in per_step) / tokens


def drop_costs(rm, steps, cfg, pad_id: int | None = None, progress: bool = True,
               desc: str = "removal costs") -> dict[str, list[float]]:
    """Per block, what skipping that block alone (every other block running, LoRA as it is) does to `steps`:

    - "nll": how much the target NLL rises, nats per target token (the true cost of a skip, unlike the cosine proxy);
    - "token_errors": how much the fraction of target tokens that are not the argmax given the gold prefix rises
      (what greedy decoding gets wrong; a step with none is reproduced token for token);
    - "full": the full-depth (NLL, token-error fraction) both rises are measured from.

    L + 1 teacher-forced passes over `steps` (cfg: batch_size and seed of the batching)."""
    # L + 1 passes (the offline default: 31 over 8 steps, minutes on a CPU): one bar over the passes
    passes = tqdm(total=rm.num_layers + 1, desc=desc, unit="pass", disable=not progress)
    full_nll, full_err = skip_set_cost(rm, steps, cfg, (), pad_id)
    passes.update()
    dropped = []
    for layer in range(rm.num_layers):
        dropped.append(skip_set_cost(rm, steps, cfg, (layer,), pad_id))
        passes.update()
    passes.close()
    return {"nll": [n - full_nll for n, _ in dropped], "token_errors": [e - full_err for _, e in dropped],
            "full": [full_nll, full_err]}


def greedy_skip_set(cost_of, candidates: list[int], n_skip: int) -> list[int]:
    """Greedy forward selection: n_skip rounds, each adding the candidate whose removal together with the blocks
    already chosen costs least (`cost_of(blocks)` returns anything comparable, e.g. (token errors, NLL); equal costs
    go to the lower block index). Unlike ranking single removals, it sees how removals interact: the second block is
    the cheapest one given the first is gone. Returns the blocks in the order chosen."""
    chosen: list[int] = []
    for _ in range(min(n_skip, len(candidates))):
        pool = [j for j in candidates if j not in chosen]
        chosen.append(min(pool, key=lambda j: (cost_of(tuple(sorted(chosen + [j]))), j)))
    return chosen


def greedy_drop_targets(rm, steps, cfg, n_skip: int, source: str, singles: dict[str, list[float]],
                        candidates: int = 0, pad_id: int | None = None) -> tuple[torch.Tensor, list[dict]]:
    """[L] run targets of a greedy static oracle, and the path it took (per round: the block added and the joint
    cost of the set so far, as rises over full depth). greedy_errors ranks sets by the token errors their removal
    adds (NLL breaking ties), greedy_nll by the NLL. `singles` (from `drop_costs` on the same steps) is round one and
    the full-depth baseline, measured already; later rounds try the `candidates` blocks of lowest single-removal
    cost (0 = every block), one teacher-forced pass over `steps` per candidate and round."""
    if source not in ("greedy_errors", "greedy_nll"):
        raise ValueError(f"unknown greedy oracle {source!r}; expected greedy_errors or greedy_nll")
    L = rm.num_layers
    full_nll, full_err = singles["full"]
    measured = {(j,): (singles["nll"][j], singles["token_errors"][j]) for j in range(L)}  # (nll, errors) rises

    def rises(blocks: tuple[int, ...]) -> tuple[float, float]:
        if blocks not in measured:
            nll, err = skip_set_cost(rm, steps, cfg, blocks, pad_id)
            measured[blocks] = (nll - full_nll, err - full_err)
        return measured[blocks]

    def cost_of(blocks):
        nll, err = rises(blocks)
        return (err, nll) if source == "greedy_errors" else (nll,)

    ranked = sorted(range(L), key=lambda j: (cost_of((j,)), j))
    pool = ranked[:candidates] if candidates else ranked
    chosen = greedy_skip_set(cost_of, pool, n_skip)
    path = []
    for k, block in enumerate(chosen, start=1):
        nll, err = rises(tuple(sorted(chosen[:k])))
        path.append({"block": block, "nll": nll, "token_errors": err})
    target = torch.ones(L)
    target[chosen] = 0.0
    return target, path


def static_skip_targets(costs: list[float], n_skip: int, tiebreak: list[float] | None = None) -> torch.Tensor:
    """[L] run targets: the n_skip blocks of lowest cost are skipped (0), the others run (1); equal costs (token
    errors are counts) are ordered by `tiebreak`, then by block index."""
    second = tiebreak or [0.0] * len(costs)
    order = sorted(range(len(costs)), key=lambda i: (costs[i], second[i], i))
    target = torch.ones(len(costs))
    target[order[:n_skip]] = 0.0
    return target


def oracle_skip_targets(costs: dict[str, list[float]], n_skip: int, source: str) -> torch.Tensor:
    """[L] run targets of a static oracle from `drop_costs`: drop_nll skips the n_skip blocks whose removal adds the
    least NLL; drop_errors those that add the fewest greedy token errors, NLL breaking ties."""
    if source == "drop_errors":
        return static_skip_targets(costs["token_errors"], n_skip, tiebreak=costs["nll"])
    if source == "drop_nll":
        return static_skip_targets(costs["nll"], n_skip)
    raise ValueError(f"unknown static oracle {source!r}; expected drop_nll or drop_errors")
