"""Lossless drafting: the drafters behind one interface, and how long a draft to verify (`DraftPolicy`).

A draft only decides how many tokens one forward may confirm: the verify loop (`layerroute.infer.verify`) reads the
model's own greedy choice at every drafted position (under the grammar and its budget rule where they apply) and
keeps the draft up to its first disagreement, so the tokens are plain greedy decoding's whatever the drafters say.

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
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

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


__all__ = [
    "SOURCES", "DraftContext", "DraftPolicy", "Drafter", "GrammarDrafter", "LookupDrafter", "NgramIndex",
    "SuffixDrafter", "SuffixStore", "SuffixStores", "make_drafters", "only_allowed",
]
