"""The per-step oracle: per step, the largest set of blocks the step can do without (issue 35, item 1). The searches
and the cached step live here (what router training on oracle targets needs); `layerroute oracle`
(`layerroute.eval.oracle`) draws the steps, makes the targets, runs the checks and writes the results.

The target of a step is the model's own greedy output at full depth (so an oracle set provably keeps that output
and its score; whether full depth is right is recorded beside it). A set of blocks *reproduces* the step when,
with those blocks removed from the step's own tokens and every target token fed (teacher forcing), every target
token is still the argmax: by induction free-running greedy decoding then reproduces the target token for token.

**The context runs at full depth** (the ``prompt_full_depth`` semantics of train / eval: `routing(...,
prompt_full_depth=True)`): it is prefilled once per step, its KV cached, and each candidate set re-runs only the
step's own tokens on that cache, one candidate per batch row (`routing("skip", forced=[R, L])`: a block some rows
skip runs on the others only). The first target token is predicted from the last context position, at full depth,
so it never depends on the set. Teacher-forced evaluation with ``eval.prompt_full_depth`` computes the same (the
test checks it against `influence.skip_set_cost`), free-running generation with ``prompt_full_depth=True`` decodes
it, and the FLOP accounting follows: `flops.step_flops(..., prompt_full_depth=True)` counts every block on the
context and a skipped block on nothing (its skipped share is of the whole step, context included); the
``decode_fraction`` beside it is the share of the step's own tokens' block FLOPs (k / L).

**The construction is greedy** (`greedy_reproducing_set`): every block is removed alone (one batch of L rows);
those whose removal alone keeps the step are ranked by the NLL their removal adds; they are added in that order,
each kept only if the joint set still reproduces the step. The checks run speculatively as a chain of nested sets
(S + c1, S + c1 + c2, ...) in one batch, cut at the first that fails: the same sets as one-by-one, fewer forwards.
`beam_reproducing_set` (width W: each round expands the W best reproducing sets by one admissible block) says on a
sample whether the greedy order leaves larger sets behind.

**Criteria.** ``exact``: every target token the argmax (tool calls: a call is scored as a whole, and one flipped
token is a different call). ``answer`` (planning steps): the final-answer number's tokens exact (the tokens that
cover the number GSM8K scoring reads, `tasks.gsm8k.extract_final_number`) and the mean target NLL at most
``nll_rise`` nats/token above full depth. A 160-token solution has many tokens whose rewording does not change the
answer, so per-token exactness finds almost nothing there; the NLL bound keeps the solution on the full-depth
model's path (teacher forcing alone would let a derailed solution copy the gold answer); the free-running check says
how often the answer survives.

**A margin** (``margin`` m > 0, in logits): where full depth leads by at least m, a set must keep the target token
ahead of every other token by at least m; elsewhere (near-ties at full depth) the argmax is enough. Without it the
check is exact only in exact arithmetic: in bf16 a forward over the step's tokens rounds differently from one-token
decoding, and a set that wins a near-tie under teacher forcing can lose it free-running (45/50 identical on Qwen in
bf16, docs/results/headroom.md). The margin costs one forward per step (the full-depth leads).

**Attention only** (``units="attention"``): the same search over attention sub-blocks (the MLP keeps running), by a
forward hook that zeroes the attention output of the removed rows' step tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..nn.kv_cache import RoutedCache
from ..nn.routed import find_routed_layers, routing

CRITERIA = ("exact", "answer")
UNITS = ("block", "attention")


@dataclass
class RowCost:
    """What one candidate set does to the step's target tokens under teacher forcing."""

    errors: int  # target tokens that are not the argmax
    answer_errors: int  # the same, on the final-answer tokens only (0 when the step has none marked)
    nll: float  # summed target NLL, nats


# ------------------------------------------------------------------------------------------------------------
# One step: the context cached once, candidate sets as batch rows


@contextmanager
def attention_gates(rm, keep: torch.Tensor | None):
    """While active, block l's attention output is multiplied by ``keep[:, l]`` ([R, L] float, 1 = runs) per row:
    0 removes the attention sub-block for that row, the MLP still runs. None: no change."""
    if keep is None:
        yield
        return
    handles = []
    for layer in find_routed_layers(rm.model):
        column = keep[:, layer.index]
        if bool((column > 0).all()):
            continue

        def hook(_module, _args, out, column=column):
            attn = out[0] if isinstance(out, tuple) else out
            attn = attn * column.to(device=attn.device, dtype=attn.dtype).view(-1, *([1] * (attn.dim() - 1)))
            return (attn, *out[1:]) if isinstance(out, tuple) else attn

        handles.append(layer.block.self_attn.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class CachedStep:
    """One step's context prefilled once at full depth (KV kept); `costs(sets)` re-runs the target tokens only.

    `model` is what to call (e.g. `generate.inference_weights(rm)`'s module: LoRA merged); `answer` marks the target
    positions of the final answer (bools, one per target token)."""

    def __init__(self, rm, model, context: Sequence[int], target: Sequence[int], *, rows: int = 8,
                 answer: Sequence[bool] | None = None, units: str = "block", margin: float = 0.0):
        if units not in UNITS:
            raise ConfigError(f"oracle: units must be one of {UNITS}, not {units!r}")
        if not margin >= 0:
            raise ConfigError(f"oracle: margin must be >= 0 (logits), not {margin!r}")
        if not context or not target:
            raise ValueError("oracle: a step needs a context and at least one target token")
        self.rm, self.model, self.rows, self.units = rm, model, max(1, rows), units
        self.target = torch.tensor(list(target), dtype=torch.long)
        self.answer = torch.tensor(list(answer) if answer is not None else [False] * len(target), dtype=torch.bool)
        self.n_layers = rm.num_layers
        self.device = rm.device
        self.forwards = 0
        ids = torch.tensor([list(context)], dtype=torch.long, device=self.device)
        cache = RoutedCache()
        with torch.no_grad(), routing(rm.model, "skip", forced="open"):
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
        self.context_length = ids.shape[1]
        self.kv = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        # the first target token comes from the context's last position, at full depth: the same for every set
        first = F.log_softmax(logits.float(), dim=-1)
        self.first_nll = float(-first[self.target[0]])
        self.first_error = int(int(first.argmax()) != int(self.target[0]))
        # per target position after the first: the lead a set must keep (m where full depth leads by >= m, else 0)
        self.margin, self.floor = float(margin), None
        if self.margin > 0 and len(self.target) > 1:
            self.floor = torch.where(self._leads([()])[0] >= self.margin, self.margin, 0.0)

    def _cache(self, r: int) -> RoutedCache:
        cache = RoutedCache()
        for i, (k, v) in enumerate(self.kv):
            cache.update(k.expand(r, *k.shape[1:]), v.expand(r, *v.shape[1:]), i)
        return cache

    @torch.no_grad()
    def _logits(self, sets: list[tuple[int, ...]]) -> torch.Tensor:
        """[R, n-1, V] float logits of the target's positions after the first, one row per set."""
        r, n = len(sets), len(self.target)
        run = torch.ones(r, self.n_layers, dtype=torch.bool)
        for i, s in enumerate(sets):
            run[i, list(s)] = False
        forced, keep = (run, None) if self.units == "block" else ("open", run.float())
        ids = self.target[:-1].to(self.device).expand(r, n - 1)
        pos = torch.arange(self.context_length, self.context_length + n - 1, device=self.device).expand(r, n - 1)
        with routing(self.rm.model, "skip", forced=forced), attention_gates(self.rm, keep):
            logits = self.model(input_ids=ids, position_ids=pos, past_key_values=self._cache(r),
                                use_cache=True).logits.float()  # [R, n-1, V]
        self.forwards += 1
        return logits

    @staticmethod
    def _lead(logits: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
        """[R, n-1]: the target's logit minus the best other token's."""
        idx = want.expand(logits.shape[0], -1).unsqueeze(-1)
        mine = logits.gather(-1, idx).squeeze(-1)
        return mine - logits.scatter(-1, idx, float("-inf")).amax(-1)

    def _leads(self, sets: list[tuple[int, ...]]) -> torch.Tensor:
        return self._lead(self._logits(sets), self.target[1:].to(self.device))

    def _batch(self, sets: list[tuple[int, ...]]) -> list[RowCost]:
        r, n = len(sets), len(self.target)
        if n == 1:  # only the first token, which every set gets from the full-depth context
            return [RowCost(self.first_error, int(self.first_error and bool(self.answer[0])), self.first_nll)] * r
        logits = self._logits(sets)
        logp = F.log_softmax(logits, dim=-1)
        want = self.target[1:].to(self.device)
        nll = -logp.gather(-1, want.expand(r, n - 1).unsqueeze(-1)).squeeze(-1)  # [R, n-1]
        wrong = logits.argmax(-1) != want  # [R, n-1]
        if self.floor is not None:  # a lead under the margin where full depth kept it counts as an error
            wrong = wrong | (self._lead(logits, want) < self.floor.to(logits.device))
        answer = self.answer[1:].to(self.device)
        first_answer = int(self.first_error and bool(self.answer[0]))
        return [RowCost(int(wrong[i].sum()) + self.first_error, int(wrong[i][answer].sum()) + first_answer,
                        float(nll[i].sum()) + self.first_nll) for i in range(r)]

    def costs(self, sets: Sequence[Sequence[int]]) -> list[RowCost]:
        """The cost of each set (blocks, or attention sub-blocks, removed from the step's own tokens)."""
        sets = [tuple(sorted(set(s))) for s in sets]
        out: list[RowCost] = []
        for i in range(0, len(sets), self.rows):
            out += self._batch(sets[i:i + self.rows])
        return out


# ------------------------------------------------------------------------------------------------------------
# The searches (any cost function over sets: the cached step, or a full re-run in tests)


def criterion_check(criterion: str, full: RowCost, n_tokens: int, nll_rise: float) -> Callable[[RowCost], bool]:
    """ok(cost) for a criterion, relative to the full-depth cost of the same step."""
    if criterion == "exact":
        return lambda c: c.errors <= full.errors
    if criterion == "answer":
        bound = full.nll + nll_rise * n_tokens
        return lambda c: c.answer_errors <= full.answer_errors and c.nll <= bound
    raise ConfigError(f"oracle: criterion must be one of {CRITERIA}, not {criterion!r}")


def greedy_reproducing_set(costs: Callable[[list[tuple[int, ...]]], list[RowCost]], n_units: int,
                           ok: Callable[[RowCost], bool], singles: list[RowCost], *, chain: int = 8) -> dict:
    """The greedy set (module doc) from the single-removal costs `singles` (one per unit). Joint checks run as
    chains of nested sets of adaptive length (at most `chain`); the result equals checking one set at a time."""
    admissible = sorted((j for j in range(n_units) if ok(singles[j])), key=lambda j: (singles[j].nll, j))
    chosen, remaining, checks, width = admissible[:1], admissible[1:], 0, 2
    last = singles[chosen[0]] if chosen else None
    while remaining:
        links = remaining[:max(1, min(width, chain))]
        res = costs([tuple(sorted(chosen + links[:i + 1])) for i in range(len(links))])
        checks += len(links)
        accepted = 0
        for c in res:
            if not ok(c):
                break
            accepted, last = accepted + 1, c
        chosen += links[:accepted]
        if accepted == len(links):
            remaining = remaining[accepted:]
            width *= 2
        else:  # links[accepted] breaks the step together with the set: rejected
            remaining = remaining[accepted + 1:]
            width = max(1, width // 2)
    return {"set": sorted(chosen), "order": chosen, "admissible": admissible, "checks": checks,
            "nll": None if last is None else last.nll, "errors": None if last is None else last.errors}


def beam_reproducing_set(costs: Callable[[list[tuple[int, ...]]], list[RowCost]], n_units: int,
                         ok: Callable[[RowCost], bool], singles: list[RowCost], width: int = 4) -> dict:
    """Beam search over reproducing sets: each round, every set in the beam grows by each admissible unit; the
    `width` reproducing sets of lowest NLL survive. Returns the largest set found and the checks it cost."""
    admissible = [j for j in range(n_units) if ok(singles[j])]
    beam = sorted((singles[j].nll, (j,)) for j in admissible)[:width]
    best, checks = (beam[0][1] if beam else ()), 0
    while beam:
        grown = sorted({tuple(sorted(s + (j,))) for _, s in beam for j in admissible if j not in s})
        if not grown:
            break
        res = costs(grown)
        checks += len(grown)
        beam = sorted((c.nll, s) for s, c in zip(grown, res, strict=True) if ok(c))[:width]
        if beam:
            best = beam[0][1]
    return {"set": list(best), "checks": checks}
