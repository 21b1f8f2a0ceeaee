"""Lossless drafting: drafters behind one interface, verified by one full forward with greedy acceptance.

Every token comes out as plain greedy decoding (constrained by the step's xgrammar grammar where one applies) would
produce it: each forward feeds the last token plus a draft, the model's own greedy choice is read at every position
(under the grammar's mask *at that position's state*), the draft is kept up to its first disagreement, and the model's
choice there is the next token. Drafts only decide how many tokens one forward may confirm.

Drafters (`Drafter`: ``propose(ctx, k) -> tokens``), chained (each extends the draft so far); where the grammar drafts,
two chains are built, grammar first and the n-gram sources first, and the one worth more under `DraftPolicy` is
verified (lookup often copies the model's own tokenization of forced text):

* ``grammar`` (`GrammarDrafter`): the grammar's forced continuation, xgrammar's
  ``GrammarMatcher.find_jump_forward_string()`` tokenized as the tokenizer writes it (``mode="full"``), or one
  token short where the string is more than one token (``mode="short"``: the model may tokenize the forced text's
  end together with what follows, e.g. ``"`` + a function name). Where no string is forced but the mask allows a
  single token (or end-of-turn tokens only, after the last call) that token is the draft.
* ``lookup`` (`LookupDrafter`): prompt lookup, the continuation of the longest n-gram (up to `max_n`) that ends the
  context (prompt + generated + draft so far) and occurred earlier in it (the most recent occurrence).
* ``suffix`` (`SuffixDrafter`): the same match over a `SuffixStore` of earlier turns (a session's earlier outputs,
  or a server's earlier requests with the same tools); `SuffixStore.add` records a finished turn.
* ``shallow``: the routed shallow path as a drafter was measured, not built (on this CPU a shallow forward costs
  0.9-1.0 of a dense one: it does not pay; docs/results/lossless_drafts.md).

Adaptive length (`DraftPolicy`): on this CPU a forward of 2 tokens costs ~1.6x one of 1 token, and each further
token ~0.03-0.05x more (SmolLM2, 320-token context, float32, one thread: 63 / 106 / 119 / 165 ms for 1 / 2 / 8 / 16
tokens). Each source keeps a decayed acceptance rate (per token, per n-gram length for the n-gram sources); the draft
is cut at the length that maximises expected accepted tokens (the product of the rates along the draft) minus its
extra cost, so where drafts are rarely accepted (GSM8K planning) the forwards are one token, as dense.

Why a small verify loop over the model and its cache rather than transformers' assisted generation (a custom
``CandidateGenerator``): transformers' ``_assisted_decoding`` runs the logits processors position by position over
the candidate sequence, so a stateful grammar processor (`layerroute.constrain.GrammarLogitsProcessor`, one xgrammar
matcher) would accept the drafted tokens and could not take the rejected ones back; its first forward re-feeds the
whole input whatever the cache holds (no session continuation); and a candidate generator sees only ``input_ids``,
not the matcher whose jump-forward string is the draft. The loop here owns one matcher: while drafting it accepts the
draft tokens (so the grammar checks every draft token and fills the mask of each position), then it is rolled back
over the whole draft and advanced over the accepted tokens only. It owns the cache too: rejected drafts are dropped
in place (`RoutedCache.rewind`), not copied.

Not yet: the budget rule of `layerroute.infer.constrain.GrammarLogitsProcessor` (a call closes whenever the budget holds
the shortest one) is not applied here, so the server does not draft requests under a grammar and
`generate_batched(drafts=...)` refuses a processor with budgets; `generate --draft --constrain` decodes under the plain
grammar (its output can differ from `--constrain` alone only where the budget rule would bind).

Routed models: call inside `layerroute.routed.routing(...)` as for any generation: the prompt is prefilled alone, so
the routers decide from the prompt's positions exactly as without drafts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from ..nn.kv_cache import RoutedCache

SOURCES = ("grammar", "lookup", "suffix")


# -- n-gram matching (prompt lookup and the suffix store share it) -------------------------------------------
class NgramIndex:
    """Where each n-gram (n = 1..max_n) of some token sequences last occurred with a token after it.

    ``append(doc, tok)`` grows a sequence; an n-gram is indexed once the token after it exists, so the sequence's
    own final n-gram is never its own match."""

    def __init__(self, max_n: int = 4):
        if max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {max_n}")
        self.max_n = max_n
        self.docs: list[list[int]] = []
        self.table: dict[tuple[int, ...], tuple[int, int]] = {}

    def add(self, tokens: Iterable[int] = ()) -> int:
        """A new sequence (returns its id) holding `tokens`."""
        self.docs.append([])
        doc = len(self.docs) - 1
        self.extend(doc, tokens)
        return doc

    def extend(self, doc: int, tokens: Iterable[int]) -> None:
        seq, table, max_n = self.docs[doc], self.table, self.max_n
        for tok in tokens:
            i = len(seq)
            seq.append(int(tok))
            for n in range(1, min(max_n, i) + 1):
                table[tuple(seq[i - n : i])] = (doc, i)

    def match(self, tail: Sequence[int], k: int, min_n: int = 1) -> tuple[list[int], int]:
        """(up to k tokens that followed the longest indexed n-gram ending `tail`, n); ([], 0) when none."""
        for n in range(min(self.max_n, len(tail)), min_n - 1, -1):
            hit = self.table.get(tuple(tail[len(tail) - n :]))
            if hit is not None:
                doc, pos = hit
                return self.docs[doc][pos : pos + k], n
        return [], 0


class SuffixStore:
    """Earlier turns to draft from (SuffixDecoding's idea, with an n-gram table instead of a suffix tree): a session's
    earlier outputs, or a server's earlier requests with the same tools. At most `max_docs` turns are searched (the
    oldest are forgotten when the table is rebuilt)."""

    def __init__(self, max_n: int = 6, max_docs: int = 256):
        self.max_n, self.max_docs = max_n, max_docs
        self.index = NgramIndex(max_n)

    def add(self, tokens: Sequence[int]) -> None:
        if not tokens:
            return
        if len(self.index.docs) >= self.max_docs:
            keep = self.index.docs[-(self.max_docs // 2) :]
            self.index = NgramIndex(self.max_n)
            for d in keep:
                self.index.add(d)
        self.index.add(tokens)

    def __len__(self) -> int:
        return len(self.index.docs)


class SuffixStores:
    """One `SuffixStore` per key (e.g. the hash of a request's tool set), LRU-bounded: the server's earlier requests."""

    def __init__(self, capacity: int = 64, **store_kwargs):
        from collections import OrderedDict

        self.capacity, self.store_kwargs = capacity, store_kwargs
        self._stores: OrderedDict = OrderedDict()

    def get(self, key, owner=None) -> SuffixStore:
        """The store of `key` (hashable); `owner`, when given, is an object the store belongs to (held, so a key
        made from its id is never reused by another object): another owner under the same key gets a new store."""
        held = self._stores.pop(key, None)
        store = held[1] if held is not None and held[0] is owner else SuffixStore(**self.store_kwargs)
        self._stores[key] = (owner, store)
        while len(self._stores) > self.capacity:
            self._stores.popitem(last=False)
        return store


# -- drafters ------------------------------------------------------------------------------------------------
@dataclass
class DraftContext:
    """What a drafter may read: the sequence so far (prompt + generated), the draft so far, the grammar matcher
    advanced over the draft (None: unconstrained), the mask row of the draft's end (None: unconstrained)."""

    seq: list[int]
    draft: list[int]
    matcher: object | None
    mask_row: torch.Tensor | None
    stop_ids: list[int]


class Drafter:
    """One source of drafts. ``propose`` returns (tokens, key): key names the acceptance statistic the tokens are
    judged by (the source, or the source and its match length)."""

    name = "drafter"

    def start(self, prompt: list[int]) -> None:
        """A new generation starts after `prompt`."""

    def commit(self, tokens: list[int]) -> None:
        """`tokens` were generated (in order)."""

    def propose(self, ctx: DraftContext, k: int) -> tuple[list[int], str]:
        raise NotImplementedError

    def finish(self, generated: list[int]) -> None:
        """The generation ended with `generated`."""


class GrammarDrafter(Drafter):
    """The grammar's forced continuation (module doc). mode: 'full' or 'short'."""

    name = "grammar"

    def __init__(self, tokenizer, mode: str = "full"):
        if mode not in ("full", "short"):
            raise ValueError(f"grammar draft mode must be 'full' or 'short', not {mode!r}")
        self.tokenizer, self.mode = tokenizer, mode
        self._tokens: dict[str, list[int]] = {}

    def tokenize(self, text: str) -> list[int]:
        hit = self._tokens.get(text)
        if hit is None:
            hit = self._tokens[text] = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return hit

    def propose(self, ctx: DraftContext, k: int) -> tuple[list[int], str]:
        if ctx.matcher is None or ctx.matcher.is_terminated():
            return [], self.name
        text = ctx.matcher.find_jump_forward_string()
        if text:
            tokens = self.tokenize(text)
            if self.mode == "short" and len(tokens) > 1:
                tokens = tokens[:-1]
            return tokens[:k], self.name
        single = only_allowed(ctx.mask_row, ctx.stop_ids)
        return ([single] if single is not None else []), self.name


def only_allowed(row: torch.Tensor | None, stop_ids: list[int]) -> int | None:
    """The one token a bitmask row allows (xgrammar's packed int32 row), or the first stop token when it allows only
    stop tokens; None otherwise."""
    if row is None:
        return None
    limit = max(1, len(stop_ids))  # more allowed tokens than this: not forced
    nz = torch.nonzero(row).flatten().tolist()
    if len(nz) > limit:
        return None
    allowed = []
    for w in nz:
        word = int(row[w]) & 0xFFFFFFFF
        while word and len(allowed) <= limit:
            low = word & -word
            allowed.append(w * 32 + low.bit_length() - 1)
            word ^= low
        if len(allowed) > limit:
            return None
    if len(allowed) == 1:
        return allowed[0]
    if allowed and all(t in stop_ids for t in allowed):
        return next(t for t in stop_ids if t in allowed)
    return None


class LookupDrafter(Drafter):
    """Prompt lookup over the context (prompt + generated + draft so far)."""

    name = "lookup"

    def __init__(self, max_n: int = 4, min_n: int = 1):
        self.max_n, self.min_n = max_n, min_n
        self.index = NgramIndex(max_n)
        self.doc = self.index.add()

    def start(self, prompt: list[int]) -> None:
        self.index = NgramIndex(self.max_n)
        self.doc = self.index.add(prompt)

    def commit(self, tokens: list[int]) -> None:
        self.index.extend(self.doc, tokens)

    def propose(self, ctx: DraftContext, k: int) -> tuple[list[int], str]:
        tail = (ctx.seq[-self.max_n :] + ctx.draft)[-self.max_n :]
        tokens, n = self.index.match(tail, k, self.min_n)
        return tokens, f"{self.name}:{min(n, 3)}"


class SuffixDrafter(Drafter):
    """Continuations from a `SuffixStore` of earlier turns; a finished generation is added to the store."""

    name = "suffix"

    def __init__(self, store: SuffixStore, min_n: int = 2, learn: bool = True):
        self.store, self.min_n, self.learn = store, min_n, learn

    def propose(self, ctx: DraftContext, k: int) -> tuple[list[int], str]:
        mx = self.store.max_n
        tail = (ctx.seq[-mx:] + ctx.draft)[-mx:]
        tokens, n = self.store.index.match(tail, k, self.min_n)
        return tokens, f"{self.name}:{min(n, 4)}"

    def finish(self, generated: list[int]) -> None:
        if self.learn:
            self.store.add(generated)


def make_drafters(names: Iterable[str] | str, tokenizer=None, *, suffix_store: SuffixStore | None = None,
                  grammar_mode: str = "full") -> list[Drafter]:
    """Drafters by name ('grammar', 'lookup', 'suffix'; a comma-separated string or a list), in the order given."""
    from ..errors import ConfigError

    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out: list[Drafter] = []
    for name in names:
        if name == "grammar":
            if tokenizer is None:
                raise ConfigError("draft 'grammar' needs a tokenizer")
            out.append(GrammarDrafter(tokenizer, grammar_mode))
        elif name == "lookup":
            out.append(LookupDrafter())
        elif name == "suffix":
            out.append(SuffixDrafter(suffix_store if suffix_store is not None else SuffixStore()))
        else:
            raise ConfigError(f"draft: unknown drafter {name!r} (choose from {', '.join(SOURCES)})")
    if len({d.name for d in out}) != len(out):
        raise ConfigError(f"draft: a drafter is named twice in {list(names)}")
    return out


# -- the adaptive length -------------------------------------------------------------------------------------
@dataclass
class DraftPolicy:
    """How long a draft to verify (module doc). first_cost: the extra cost of a 2-token forward over a 1-token one,
    in forwards; token_cost: each further token's. A statistic's rate is (accepted + prior) / (seen + 1), where
    accepted and seen decay by `decay` every forward: a source that stopped drafting is tried again once its record
    has faded (the prior is `grammar_prior` for forced text). adaptive=False verifies every draft whole."""

    max_draft: int = 16
    first_cost: float = 0.6
    token_cost: float = 0.04
    prior: float = 0.5
    grammar_prior: float = 0.9
    decay: float = 0.97
    adaptive: bool = True
    _acc: dict = field(default_factory=dict)
    _seen: dict = field(default_factory=dict)

    def rate(self, key: str) -> float:
        prior = self.grammar_prior if key.startswith("grammar") else self.prior
        return (self._acc.get(key, 0.0) + prior) / (self._seen.get(key, 0.0) + 1.0)

    def cut(self, keys: list[str]) -> int:
        """The draft length (a prefix of the draft whose tokens are judged by `keys`) worth verifying."""
        return self.best(keys)[0] if self.adaptive else len(keys)

    def best(self, keys: list[str]) -> tuple[int, float]:
        """(length, value): the prefix maximising expected accepted tokens minus the extra cost of verifying it."""
        best, best_k, p, gain = 0.0, 0, 1.0, 0.0
        for i, key in enumerate(keys):
            p *= self.rate(key)
            gain += p
            value = gain - self.first_cost - self.token_cost * i
            if value > best:
                best, best_k = value, i + 1
        return best_k, best

    def observe(self, keys: list[str], accepted: int) -> None:
        """One forward verified a draft judged by `keys` and accepted its first `accepted` tokens (the next one, if
        any, was rejected; later ones say nothing)."""
        for key in self._seen:
            self._acc[key] *= self.decay
            self._seen[key] *= self.decay
        for i, key in enumerate(keys[: accepted + 1]):
            self._acc[key] = self._acc.get(key, 0.0) + (1.0 if i < accepted else 0.0)
            self._seen[key] = self._seen.get(key, 0.0) + 1.0


# -- the verify loop -----------------------------------------------------------------------------------------
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
                "cpu_prefill_s": self.cpu_prefill_s, "cpu_decode_s": self.cpu_decode_s, "finish": self.finish}


def _xgr():
    from .constrain import _xgr as load

    return load()


def _forward(model, tokens: list[int], cache, keep: int, device) -> torch.Tensor:
    out = model(input_ids=torch.tensor([tokens], dtype=torch.long, device=device), past_key_values=cache,
                use_cache=True, logits_to_keep=keep)
    return out.logits[0, -keep:].float()  # [keep, V], float32 as generate() reads them


def draft_generate(model, prompt: list[int], *, max_new_tokens: int, stop_ids: Iterable[int] | None,
                   grammar=None, drafters: Sequence[Drafter] = (), policy: DraftPolicy | None = None,
                   cache: RoutedCache | None = None, on_token: Callable[[int], None] | None = None,
                   cancel: Callable[[], bool] | None = None) -> DraftResult:
    """Greedy generation of one turn after `prompt`, drafted and verified (module doc): the tokens of plain greedy
    decoding (under `grammar`, a compiled xgrammar grammar, where given).

    cache: a RoutedCache holding a prefix of `prompt` (a session), or None (a fresh one); on return it holds the
    prompt and every generated token but the last. stop_ids: end-of-turn tokens (kept, then stop); None = none.
    on_token: called with each token as it is confirmed; cancel(): True stops the generation (finish 'cancelled')."""
    device = next(model.parameters()).device
    stops = list(stop_ids or [])
    stop_set = set(stops)
    policy = policy or DraftPolicy()
    cache = RoutedCache() if cache is None else cache
    result = DraftResult(tokens=[])
    matcher = bitmask = None
    if grammar is not None:
        xgr = _xgr()
        matcher = xgr.GrammarMatcher(grammar, override_stop_tokens=stops or None)
        bitmask = xgr.allocate_token_bitmask(policy.max_draft + 1, grammar.tokenizer_info.vocab_size)
    seq = list(prompt)
    for d in drafters:
        d.start(list(prompt))

    def fill(row: int) -> None:
        if matcher is not None and not matcher.is_terminated():
            matcher.fill_next_token_bitmask(bitmask, row)
        elif matcher is not None:  # terminated: nothing follows (never read: generation stops at the stop token)
            bitmask[row].fill_(0)

    def choose(logits: torch.Tensor) -> list[int]:
        if matcher is not None:
            _xgr().apply_token_bitmask_inplace(logits, bitmask[: logits.shape[0]].to(logits.device))
        return logits.argmax(-1).tolist()

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
        if matcher is not None and not matcher.is_terminated() and not matcher.accept_token(tok):
            raise RuntimeError(f"the grammar refused token {tok}, which its own mask allowed")
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
        nxt = choose(_forward(model, seq[cached:], cache, 1, device))[0]
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
            # -- verify: one forward over the last token and the draft
            base = len(seq) - 1  # tokens the cache holds before this forward
            greedy = choose(_forward(model, [nxt, *draft], cache, len(draft) + 1, device))
            result.forwards += 1
            n = 0
            while n < len(draft) and greedy[n] == draft[n]:
                n += 1
            policy.observe(keys, n)
            if keys:
                for i, key in enumerate(keys):
                    src = key.split(":")[0]
                    result.drafted[src] = result.drafted.get(src, 0) + 1
                    if i < n:
                        result.accepted[src] = result.accepted.get(src, 0) + 1
            cache.rewind(base + 1 + n)  # the last token and the accepted drafts; the rest is dropped in place
            for tok in draft[:n]:
                if emit(tok):
                    done = True
                    break
            nxt = greedy[n]
        cache.rewind(len(seq) - 1)  # a stop inside the accepted drafts: the tokens after it leave the cache
        t2, c2 = time.perf_counter(), time.process_time()
    result.decode_s, result.cpu_decode_s = t2 - t1, c2 - c1
    for d in drafters:
        d.finish(list(result.tokens))
    return result


def routed_draft_generate(rm, prompt: list[int], *, drafts: Iterable[str] | str = "grammar,lookup",
                          max_new_tokens: int = 64, grammar=None, forced=None, threshold: float | None = None,
                          kv_policy: str = "exact", mode: str = "skip", suffix_store: SuffixStore | None = None,
                          grammar_mode: str = "full", policy: DraftPolicy | None = None,
                          eos_token_id=None, lora: bool = True, prompt_full_depth: bool = False
                          ) -> tuple[DraftResult, list[bool]]:
    """`draft_generate` for a RoutedModel as `layerroute.generate.routed_generate` runs one greedy step (LoRA merged,
    the routers deciding from the prompt, or `forced` gates; mode 'off' = every block, no router): (result, gates).
    eos_token_id: None = the one stop rule (`layerroute.generate.stop_ids`), else the id(s) to stop on.
    lora=False: adapters off (as `layerroute.batched.generate_batched`); prompt_full_depth: the prompt's prefill runs
    every block (the prefill is a forward of its own here, so drafts never run at full depth)."""
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
                                    grammar=grammar, drafters=drafters, policy=policy)
            gates = ([bool(r.gate.reshape(-1)[0] > 0.5) for r in gate_records(rm.model)] if mode == "skip"
                     else [True] * rm.num_layers)
    return result, gates


__all__ = [
    "SOURCES", "DraftContext", "DraftPolicy", "DraftResult", "Drafter", "GrammarDrafter", "LookupDrafter",
    "NgramIndex", "SuffixDrafter", "SuffixStore", "SuffixStores", "draft_generate", "make_drafters", "only_allowed",
    "routed_draft_generate",
]
