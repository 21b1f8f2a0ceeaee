"""The draft verify loop: drafts (`layerroute.infer.drafts`) checked by one full forward with greedy acceptance.

Every token comes out as plain greedy decoding (constrained by the step's xgrammar grammar where one applies, under
its budget rule where a `Closer` is given) would produce it: each forward feeds the last token plus a draft, the
model's own greedy choice is read at every position (under the grammar's mask *at that position's state*, narrowed
by the budget rule with that position's tokens left), the draft is kept up to its first disagreement, and the
model's choice there is the next token. Drafts only decide how many tokens one forward may confirm.

Under a grammar the loop owns one matcher: while drafting it accepts the draft tokens (so the grammar checks every
draft token, a draft token it rejects ends the draft, and the mask of each position is filled), then it is rolled
back over the whole draft (`GrammarMatcher.rollback`). Verification walks the positions in order: the matcher and
the budget rule (`layerroute.infer.closer.BudgetRule`, which keeps its closing path from position to position) see
the position's choice, then advance over it only when it is the draft's token, so both advance over accepted tokens
only, exactly as under `GrammarLogitsProcessor(budgets=...)` in generate(): the rule closes the call at the same
token as the plain path does. The loop owns the cache too: rejected drafts are dropped in place
(`RoutedCache.rewind`), not copied.

Why a small loop over the model and its cache rather than transformers' assisted generation (a custom
``CandidateGenerator``): transformers' ``_assisted_decoding`` runs the logits processors position by position over
the candidate sequence, so a stateful grammar processor (one xgrammar matcher) would accept the drafted tokens and
could not take the rejected ones back; its first forward re-feeds the whole input whatever the cache holds (no
session continuation); and a candidate generator sees only ``input_ids``, not the matcher whose jump-forward string
is the draft.

Routed models: call inside `layerroute.nn.routed.routing(...)` as for any generation: the prompt is prefilled alone,
so the routers decide from the prompt's positions exactly as without drafts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from ..nn.kv_cache import RoutedCache
from .closer import BudgetRule, Closer
from .drafts import DraftContext, Drafter, DraftPolicy, SuffixStore, make_drafters


@dataclass
class DraftResult:
    """One drafted generation: the tokens (cut after the first stop token, which is kept), and how they came."""

    tokens: list[int]
    forwards: int = 0  # model forwards, the prefill included
    drafted: dict = field(default_factory=dict)  # source -> draft tokens verified
    accepted: dict = field(default_factory=dict)  # source -> draft tokens accepted
    prefill_s: float = 0.0
    decode_s: float = 0.0
    cpu_prefill_s: float = 0.0
    cpu_decode_s: float = 0.0
    finish: str = "length"  # stop | length | cancelled
    closed: int = 0  # positions where the budget rule narrowed the choice (0 without a rule)

    @property
    def tokens_per_forward(self) -> float:
        return len(self.tokens) / self.forwards if self.forwards else float("nan")

    def by_source(self) -> dict:
        """Per drafter: tokens verified, accepted, and accepted per forward (its share of tokens per forward)."""
        return {s: {"drafted": self.drafted.get(s, 0), "accepted": self.accepted.get(s, 0),
                    "accepted_per_forward": self.accepted.get(s, 0) / self.forwards if self.forwards else 0.0}
                for s in sorted(set(self.drafted) | set(self.accepted))}

    def to_dict(self) -> dict:
        return {"tokens": len(self.tokens), "forwards": self.forwards, "tokens_per_forward": self.tokens_per_forward,
                "by_source": self.by_source(), "prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "cpu_prefill_s": self.cpu_prefill_s, "cpu_decode_s": self.cpu_decode_s, "finish": self.finish,
                "budget_rule_closed": self.closed}


def tally_drafts(records: Sequence[dict]) -> dict:
    """Draft statistics summed over steps, each record {"tokens": generated tokens (the end-of-turn token included),
    "forwards": model forwards (the prefill's included), "by_source": {drafter: {"drafted", "accepted"}}} (the shape
    of `DraftResult.by_source` and of a served request's ``layerroute.drafts``).

    ``tokens_per_forward`` = tokens / forwards (plain greedy decoding: exactly 1.00, the prefill's forward yields the
    first token). The prefill's forward verifies no draft, so the per-drafter ratio counts decode forwards only
    (forwards - 1 per step): ``accepted_per_decode_forward`` = a drafter's accepted tokens / decode forwards, what it
    adds to each verify forward's own token; ``tokens_per_decode_forward`` = (tokens - steps) / decode forwards, 1 +
    the drafters' sum except where a step ended inside an accepted draft; ``acceptance`` = accepted / drafted."""
    tokens, forwards = sum(r["tokens"] for r in records), sum(r["forwards"] for r in records)
    decode = sum(r["forwards"] - 1 for r in records)
    by_source = {}
    for src in sorted({s for r in records for s in r["by_source"]}):
        drafted = sum(r["by_source"].get(src, {}).get("drafted", 0) for r in records)
        accepted = sum(r["by_source"].get(src, {}).get("accepted", 0) for r in records)
        by_source[src] = {"drafted": drafted, "accepted": accepted,
                          "accepted_per_decode_forward": accepted / decode if decode else 0.0,
                          "acceptance": accepted / drafted if drafted else None}
    return {"steps": len(records), "tokens": tokens, "forwards": forwards, "decode_forwards": decode,
            "tokens_per_forward": tokens / forwards if forwards else None,
            "tokens_per_decode_forward": (tokens - len(records)) / decode if decode else None,
            "by_source": by_source}


def _xgr():
    from .constrain import _xgr as load

    return load()


def _forward(model, tokens: list[int], cache, keep: int, device) -> torch.Tensor:
    out = model(input_ids=torch.tensor([tokens], dtype=torch.long, device=device), past_key_values=cache,
                use_cache=True, logits_to_keep=keep)
    return out.logits[0, -keep:].float()  # [keep, V], float32 as generate() reads them


def draft_generate(model, prompt: list[int], *, max_new_tokens: int, stop_ids: Iterable[int] | None,
                   grammar=None, closer: Closer | None = None, drafters: Sequence[Drafter] = (),
                   policy: DraftPolicy | None = None, cache: RoutedCache | None = None,
                   on_token: Callable[[int], None] | None = None,
                   cancel: Callable[[], bool] | None = None) -> DraftResult:
    """Greedy generation of one turn after `prompt`, drafted and verified (module doc): the tokens of plain greedy
    decoding (under `grammar`, a compiled xgrammar grammar, where given; under its budget rule with budget
    `max_new_tokens` where `closer`, the grammars' `Closer`, is given too: `GrammarLogitsProcessor(budgets=...)`).

    cache: a RoutedCache holding a prefix of `prompt` (a session), or None (a fresh one); on return it holds the
    prompt and every generated token but the last. stop_ids: end-of-turn tokens (kept, then stop); None = none.
    on_token: called with each token as it is confirmed; cancel(): True stops the generation (finish 'cancelled')."""
    device = next(model.parameters()).device
    stops = list(stop_ids or [])
    stop_set = set(stops)
    policy = policy or DraftPolicy()
    cache = RoutedCache() if cache is None else cache
    result = DraftResult(tokens=[])
    matcher = bitmask = rule = None
    if grammar is not None:
        xgr = _xgr()
        matcher = xgr.GrammarMatcher(grammar, override_stop_tokens=stops or None)
        bitmask = xgr.allocate_token_bitmask(policy.max_draft + 1, grammar.tokenizer_info.vocab_size)
        if closer is not None:
            rule = BudgetRule(closer, max_new_tokens, stops or None)
    elif closer is not None:
        raise ValueError("a budget rule (closer) needs a grammar")
    seq = list(prompt)
    for d in drafters:
        d.start(list(prompt))

    def fill(row: int) -> None:
        if matcher is not None and not matcher.is_terminated():
            matcher.fill_next_token_bitmask(bitmask, row)
        elif matcher is not None:  # terminated (no stop_ids: the turn goes on): unconstrained, as generate() does
            bitmask[row].fill_(-1)

    def masked(logits: torch.Tensor) -> torch.Tensor:
        if matcher is not None:
            _xgr().apply_token_bitmask_inplace(logits, bitmask[: logits.shape[0]].to(logits.device))
        return logits

    def pick(row: torch.Tensor) -> int:
        """The greedy choice at the next position (its grammar mask applied): the budget rule reads the matcher,
        which stands at this position's state (every earlier token of the draft accepted)."""
        if rule is not None and not matcher.is_terminated():
            rule.apply(matcher, row, len(result.tokens))
        return int(row.argmax())

    def build(order: list[Drafter], room: int) -> tuple[list[int], list[str]]:
        """A draft from the sources in `order`, each extending the draft so far, every token checked by the grammar
        (whose mask rows 0..len are filled; the matcher is rolled back to where it was)."""
        draft: list[int] = []
        keys: list[str] = []
        fill(0)
        while len(draft) < room:
            grew = False
            for d in order:
                if len(draft) >= room:
                    break
                row = bitmask[len(draft)] if matcher is not None else None
                tokens, key = d.propose(DraftContext(seq, draft, matcher, row, stops), room - len(draft))
                for tok in tokens[: room - len(draft)]:
                    if matcher is not None and (matcher.is_terminated() or not matcher.accept_token(tok)):
                        break
                    draft.append(tok)
                    keys.append(key)
                    fill(len(draft))
                    grew = True
                    if tok in stop_set:
                        break
                if draft and draft[-1] in stop_set:
                    break
            if not grew or (draft and draft[-1] in stop_set):
                break
        if matcher is not None and draft:
            matcher.rollback(len(draft))
        return draft, keys

    def emit(tok: int) -> bool:
        """Append a confirmed token; True when the turn is over."""
        result.tokens.append(tok)
        seq.append(tok)
        for d in drafters:
            d.commit([tok])
        if matcher is not None and not matcher.is_terminated():
            if not matcher.accept_token(tok):
                raise RuntimeError(f"the grammar refused token {tok}, which its own mask allowed")
            if rule is not None:
                rule.advance(matcher, tok)
        if on_token is not None:
            on_token(tok)
        if tok in stop_set:
            result.finish = "stop"
            return True
        return len(result.tokens) >= max_new_tokens

    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        cached = cache.get_seq_length()
        if cached >= len(prompt):
            raise ValueError(f"the cache holds {cached} tokens of a {len(prompt)}-token prompt: one must be new")
        fill(0)
        nxt = pick(masked(_forward(model, seq[cached:], cache, 1, device))[0])
        result.forwards = 1
        t1, c1 = time.perf_counter(), time.process_time()
        result.prefill_s, result.cpu_prefill_s = t1 - t0, c1 - c0
        done = max_new_tokens <= 0
        while not done:
            if emit(nxt):
                break
            if cancel is not None and cancel():
                result.finish = "cancelled"
                break
            # -- draft: each source extends the draft so far; the grammar checks every token and fills its mask.
            # Two chains where the grammar drafts too: grammar first, and the n-gram sources first (their
            # tokenization of forced text can be the model's where the tokenizer's is not); the one worth more wins
            room = min(policy.max_draft, max_new_tokens - len(result.tokens) - 1)
            orders = [list(drafters)]
            if len(drafters) > 1 and drafters[0].name == "grammar":
                orders.append(list(drafters[1:]) + [drafters[0]])
            chosen = None
            for j, order in enumerate(orders):
                full, full_keys = build(order, room)
                k = policy.cut(full_keys)
                value = policy.best(full_keys[:k])[1]
                if chosen is None or value > chosen[2]:
                    chosen = (full[:k], full_keys[:k], value, j)
            draft, keys, _, j = chosen
            if matcher is not None and j != len(orders) - 1 and draft:  # the masks of the chosen chain's positions
                fill(0)
                for i, tok in enumerate(draft):
                    matcher.accept_token(tok)
                    fill(i + 1)
                matcher.rollback(len(draft))
            # -- verify: one forward over the last token and the draft; positions in order, each draft token the
            # model (and the budget rule) chose is confirmed, the first other choice is the next token
            base = len(seq) - 1  # tokens the cache holds before this forward
            logits = masked(_forward(model, [nxt, *draft], cache, len(draft) + 1, device))
            result.forwards += 1
            n = 0
            for i in range(len(draft) + 1):
                nxt = pick(logits[i])
                if i == len(draft) or nxt != draft[i]:
                    break
                n += 1
                if emit(nxt):
                    done = True
                    break
            policy.observe(keys, n)
            for i, key in enumerate(keys):
                src = key.split(":")[0]
                result.drafted[src] = result.drafted.get(src, 0) + 1
                if i < n:
                    result.accepted[src] = result.accepted.get(src, 0) + 1
            cache.rewind(base + 1 + n)  # the last token and the accepted drafts; the rest is dropped in place
        cache.rewind(len(seq) - 1)  # a stop inside the accepted drafts: the tokens after it leave the cache
        t2, c2 = time.perf_counter(), time.process_time()
    result.decode_s, result.cpu_decode_s = t2 - t1, c2 - c1
    result.closed = rule.closed if rule is not None else 0
    for d in drafters:
        d.finish(list(result.tokens))
    return result


def routed_draft_generate(rm, prompt: list[int], *, drafts: Iterable[str] | str = "grammar,lookup",
                          max_new_tokens: int = 64, grammar=None, closer: Closer | None = None, forced=None,
                          threshold: float | None = None, kv_policy: str = "exact", mode: str = "skip",
                          suffix_store: SuffixStore | None = None, grammar_mode: str = "full",
                          policy: DraftPolicy | None = None, eos_token_id=None, lora: bool = True,
                          prompt_full_depth: bool = False) -> tuple[DraftResult, list[bool]]:
    """`draft_generate` for a RoutedModel as `layerroute.infer.generate.routed_generate` runs one greedy step (LoRA
    merged, the routers deciding from the prompt, or `forced` gates; mode 'off' = every block, no router): (result,
    gates). closer: the grammar's budget rule with budget `max_new_tokens` (None: the plain grammar).
    eos_token_id: None = the one stop rule (`layerroute.infer.generate.stop_ids`), else the id(s) to stop on.
    lora=False: adapters off (as `layerroute.infer.batched.generate_batched`); prompt_full_depth: the prompt's prefill
    runs every block (the prefill is a forward of its own here, so drafts never run at full depth)."""
    from ..nn.routed import gate_records, routing
    from .generate import DEFAULT, inference_weights, stop_ids

    eos = stop_ids(rm, DEFAULT if eos_token_id is None else eos_token_id) or []
    drafters = make_drafters(drafts, rm.tokenizer, suffix_store=suffix_store, grammar_mode=grammar_mode)
    with torch.no_grad(), (inference_weights(rm) if lora else rm.lora_disabled()) as model:
        model = model if lora else rm.model
        device = next(model.parameters()).device
        with routing(rm.model, mode, decision_mask=torch.ones(1, len(prompt), device=device), forced=forced,
                     threshold=threshold, kv_policy=kv_policy, prompt_full_depth=prompt_full_depth and mode == "skip"):
            result = draft_generate(model, list(prompt), max_new_tokens=max_new_tokens, stop_ids=eos,
                                    grammar=grammar, closer=closer, drafters=drafters, policy=policy)
            gates = ([bool(r.gate.reshape(-1)[0] > 0.5) for r in gate_records(rm.model)] if mode == "skip"
                     else [True] * rm.num_layers)
    return result, gates


__all__ = ["DraftResult", "draft_generate", "routed_draft_generate", "tally_drafts"]
