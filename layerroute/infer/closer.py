"""The budget rule: a constrained answer ends complete whenever its token budget holds the shortest valid one.

`Closer` finds the shortest completion of a grammar state (xgrammar matcher) in tokens; `BudgetRule` keeps one
generated row to tokens after which that completion still fits in the tokens it has left. Both decoding paths ask
the same rule: `layerroute.infer.constrain.GrammarLogitsProcessor` (``budgets``: the server, ``generate --constrain``)
per row and step, and the draft verify loop (`layerroute.infer.verify.draft_generate`, ``closer``) per verified
position, so a drafted constrained answer is token for token the plain one.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

_CLOSE = '"}],'  # what ends a string, an object or an array, or moves on to the next element or key
_DIGITS = "0123456789"
_ORDER = _CLOSE + _DIGITS + "tfn{[: -.eE" + "".join(chr(c) for c in range(32, 127)) + "\n"
BRANCH = 24  # at most this many characters tried at one choice point
MAX_CLOSING_CHARS = 2048  # a completion longer than this is not searched for (the rule then steps aside)
CHECKED = 8  # a step checks at most this many of the best tokens before it takes the closing path's next token
TIGHT_CHECKED = 2  # ... and this many when the current path has no token to spare (each check is then a search)
NEAR = 32  # sampled rows: the rule binds once the tokens left are within this many of the closing path's length


class Closer:
    """Shortest completions of a grammar state, in tokens, for the budget rule (`BudgetRule`).

    xgrammar (0.2.9) tells what is allowed next (`fill_next_token_bitmask`), what is forced
    (`find_jump_forward_string`) and whether the text so far is a complete match (`is_completed`), not how far
    the nearest end is. `closing_text` walks a forked matcher to a complete match: it takes every forced string
    whole; at a free choice it tries ``" } ] ,`` (what ends a string, an object or an array, or moves on to the
    next key or element) and, when more than one is allowed, completes greedily from each and keeps the
    shortest; else the first digit allowed (the shortest number); else (a function name, an enum value,
    ``true``/``false``) it completes greedily from each allowed character and keeps the shortest. The greedy
    completion is the same walk taking, at a free choice, the first allowed of ``" } ] ,``, a digit, any character.
    `closing_tokens` is that text tokenized as the tokenizer writes it, checked against the grammar (one token per
    character when that tokenization is refused). Its length is an upper bound on the tokens the state needs
    (the budget rule needs no more to be sound); on the tool-call and JSON-schema grammars of the tests it is
    the shortest. Costs tens of microseconds per choice (a fork ~6 us, a mask fill 3-40 us) plus one tokenizer
    call; `BudgetRule` first tries the previous path from the new state, which is cheaper still.

    Built by `layerroute.infer.constrain.Grammars.closer` (one per tokenizer), which has checked xgrammar is there."""

    def __init__(self, info, tokenizer):
        import xgrammar as xgr

        self.tokenizer = tokenizer
        ids: dict[str, int] = {}
        for i, piece in enumerate(info.decoded_vocab):
            b = bytes(piece)
            if len(b) == 1 and (32 <= b[0] < 127 or b == b"\n"):
                ids.setdefault(chr(b[0]), i)
        seen: set[str] = set()
        self.chars = [c for c in _ORDER if c in ids and not (c in seen or seen.add(c))]
        self.char_ids = {c: ids[c] for c in self.chars}
        ids_np = np.array([ids[c] for c in self.chars], dtype=np.int64)
        self._words, self._shifts = ids_np >> 5, (ids_np & 31).astype(np.int32)
        self._bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
        self._bits = self._bitmask[0].numpy()  # the same memory: read after each fill without a torch op
        self._lock = threading.Lock()  # one bitmask; a scheduler's prefill thread may close a state too

    def _allowed(self, m) -> list[str]:
        with self._lock:
            m.fill_next_token_bitmask(self._bitmask)
            bits = (self._bits[self._words] >> self._shifts) & 1
        return [self.chars[i] for i in np.flatnonzero(bits)]

    @staticmethod
    def _accepted(m, chars: str, first: bool = False) -> list[tuple[str, Any]]:
        """(character, a fork of `m` that accepted it) for each of `chars` the grammar allows (first: the first)."""
        out = []
        for c in chars:
            f = m.fork()
            if f.accept_string(c):
                out.append((c, f))
                if first:
                    break
        return out

    def _first_choice(self, m, limit: int) -> tuple[str, Any] | None:
        """The greedy walk's choice: the first allowed of ``" } ] ,``, else the first allowed character."""
        got = self._accepted(m, _CLOSE, True)
        if not got:  # the first allowed in _ORDER: a digit before any other character
            allowed = self._allowed(m)
            got = self._accepted(m, allowed[0]) if allowed else []
        return got[0] if got else None

    def _best_choice(self, m, limit: int) -> tuple[str, Any] | None:
        """The closing walk's choice (class doc): the way out whose greedy completion is shortest."""
        got = self._accepted(m, _CLOSE)
        if len(got) > 1:
            got = [self._shortest(got, limit) or got[0]]
        if not got:
            allowed = self._allowed(m)
            digits = [c for c in allowed if c in _DIGITS]
            options = self._accepted(m, digits[0] if digits else "".join(allowed[:BRANCH]))
            choice = self._shortest(options, limit) if len(options) > 1 else None
            got = [choice] if choice else options[:1]
        return got[0] if got else None

    def _walk(self, m, limit: int, choose) -> str | None:
        """Text that takes matcher `m` (consumed) to a complete match: forced strings whole, `choose(m, chars
        left)` -> (text, the matcher after it) at a free choice; None when stuck or longer than `limit`."""
        out: list[str] = []
        n = 0
        while not m.is_completed():
            step = m.find_jump_forward_string()
            if step:
                if not m.accept_string(step):
                    return None
            else:
                got = choose(m, limit - n)
                if got is None:
                    return None
                step, m = got
            out.append(step)
            n += len(step)
            if n > limit:
                return None
        return "".join(out)

    def _shortest(self, options: list[tuple[str, Any]], limit: int) -> tuple[str, Any] | None:
        best = None
        for c, f in options:
            rest = self._walk(f.fork(), limit, self._first_choice)
            if rest is not None and (best is None or len(rest) < best[0]):
                best = (len(rest), c, f)
        return None if best is None else best[1:]

    def closing_text(self, matcher, limit: int = MAX_CLOSING_CHARS) -> str | None:
        """The shortest text found that completes `matcher`'s state (the matcher is not touched), or None."""
        return self._walk(matcher.fork(), limit, self._best_choice)

    def closing_tokens(self, matcher) -> list[int] | None:
        """`closing_text` as tokens the grammar accepts from `matcher`'s state (None: no completion found)."""
        text = self.closing_text(matcher)
        if text is None:
            return None
        if not text:
            return []
        tokens = self.tokenizer.encode(text, add_special_tokens=False)
        m = matcher.fork()
        if all(m.accept_token(t) for t in tokens) and m.is_completed():
            return list(tokens)
        per_char = [self.char_ids.get(c) for c in text]  # the tokenizer's pieces were refused: one per character
        return None if None in per_char else per_char


class BudgetRule:
    """The budget rule for one generated row under a grammar: it keeps to tokens after which the shortest completion
    (`Closer`) still fits in the tokens it has left, so it ends with a complete match (a closed call, a whole JSON
    value) whenever its budget holds the shortest one from the start.

    Per position: `apply(matcher, scores, written)` narrows the row's scores (already masked by the grammar) with the
    matcher at the position's state and `written` tokens generated before it; once the position's token is chosen
    and accepted by the matcher, `advance(matcher, token)`. A greedy row checks its best tokens in order (at most
    `CHECKED`, `TIGHT_CHECKED` when the path has no token to spare) and keeps the first that fits (none fits: the
    closing path's next token), so its choice is the one plain decoding makes while there is room. A sampled row is
    checked only within `NEAR` tokens of its closing length, on its `CHECKED` best tokens, and samples among those
    that fit: a single token that adds more than `NEAR` tokens to the shortest completion before then can still
    overrun. Below the minimum (the shortest completion from the current state is longer than the tokens left) the
    rule steps aside and the row decodes under the plain grammar until the budget cuts it. The stop token is not
    counted: a row whose budget ends right after the match is complete but cut (``length``).

    The closing path is kept from position to position (the previous path is reused while it still completes the
    match), so the rule's choices depend on the tokens seen, in order: a row's rule sees every accepted token once.
    """

    def __init__(self, closer: Closer, budget: int, stop_ids: list[int] | None = None, *, sampled: bool = False):
        self.closer, self.budget, self.sampled = closer, int(budget), sampled
        self.stop_ids = list(stop_ids) if stop_ids else None
        self.path: list[int] | None = None  # the closing path from the current state (None: not searched yet)
        self.checked: dict[int, list[int] | None] = {}  # token -> path after it, at the current position
        self.closed = 0  # positions where the rule narrowed the choice (a token that did not fit was masked)

    def advance(self, matcher, tok: int) -> None:
        """`matcher` has accepted `tok`: the closing path after it (known when `tok` was checked or is the path's
        next token)."""
        path, checked = self.path, self.checked
        if tok in checked:
            self.path = checked[tok]
        elif path and path[0] == tok:
            self.path = path[1:]
        elif path is not None:  # a token nobody checked (a sampled row far from its end): does the path still close?
            f = matcher.fork()
            self.path = path if all(f.accept_token(t) for t in path) and f.is_completed() else None
        self.checked = {}

    def _path_after(self, matcher, tok: int, tight: bool) -> list[int] | None:
        """A closing path from the state after `tok`: the current path's tail when `tok` is its next token, the
        current path itself when it still completes the match (a token inside a string usually leaves the way
        out unchanged: a check of a few microseconds), else a new search. tight: the current path's length
        does not fit after one more token, so only a new (shorter) path can."""
        path = self.path
        if path and path[0] == tok:
            return path[1:]
        if self.stop_ids and tok in self.stop_ids:
            return []  # the grammar allows a stop token only where the match is complete
        f = matcher.fork()
        if not f.accept_token(tok):
            return None
        if path is not None and not tight:
            g = f.fork()
            if all(g.accept_token(t) for t in path) and g.is_completed():
                return path
        return self.closer.closing_tokens(f)

    def apply(self, matcher, s: torch.Tensor, written: int) -> None:
        """Narrow `s` (one row's scores, masked by the grammar, changed in place) at the position after `written`
        generated tokens, `matcher` at that position's state (not terminated)."""
        left = self.budget - written  # tokens this row may still write, this one included
        if self.path is None:
            self.path = self.closer.closing_tokens(matcher)
        path = self.path
        if path is None or len(path) > left or left <= 0:
            return  # no completion found, or below the minimum: the plain grammar decides
        if self.sampled and left - len(path) > NEAR:
            return
        checked = self.checked
        fits: dict[int, float] = {}  # checked tokens that fit -> their score
        narrowed = False
        tight = len(path) > left - 1  # only a token that shortens the way out fits
        for _ in range(TIGHT_CHECKED if tight else CHECKED):
            tok = int(s.argmax())
            value = float(s[tok])
            if value == float("-inf"):
                break
            after = self._path_after(matcher, tok, tight)
            checked[tok] = after
            if after is not None and len(after) <= left - 1:
                fits[tok] = value
                if not self.sampled:
                    break  # greedy: the best token that fits stays the argmax
            else:
                narrowed = True
            s[tok] = float("-inf")  # out of the next argmax's way (a sampled row's fits are put back below)
        if self.sampled or not fits:
            s.fill_(float("-inf"))
            for tok, value in fits.items():
                s[tok] = value
            if not fits:  # none of the best tokens fits: the closing path's next token
                s[path[0]] = 0.0
                checked[path[0]] = path[1:]
        self.closed += int(narrowed or not fits)


__all__ = ["BRANCH", "CHECKED", "MAX_CLOSING_CHARS", "NEAR", "TIGHT_CHECKED", "BudgetRule", "Closer"]
