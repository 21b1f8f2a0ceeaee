"""The one stop rule: when a generated row ends, and what its finish reason is called.

Every generation path ends a row through `StopRule.finish`: `routed_generate` and sessions (after transformers'
generate stopped on the same ids), `generate_batched` (per token), the serving scheduler (per token) and the engine
(after generate). One vocabulary of finish reasons (`FINISH_REASONS`):

- ``stop``: the row produced one of its stop ids (an end-of-turn token) or a stop string appeared in its text;
- ``length``: it reached its token budget (``max_new_tokens``, clipped to what the model's context has left);
- ``cancelled``: its client went away (serving);
- ``context``: the prompt alone fills the model's context, so nothing was generated;
- ``reused``: evaluation took the row's tokens from an equal generation made before (`generate_batched`'s
  ``on_decided``);
- ``error``: the row failed alone (serving: its logits processor or stream raised).

One convention on the end-of-turn token: **a row's tokens keep the stop id that ended it** (every result type:
`GenerationResult`, `RowResult`, `StepResult`, `Completion`), because it is a token the model chose, which the KV
cache, the FLOP accounting and a session's next context all count. Text and the API's usage use `content`, the
tokens without it. The stop ids themselves come from `layerroute.special_tokens.stop_token_ids`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"
FINISH_CONTEXT = "context"
FINISH_REUSED = "reused"
FINISH_ERROR = "error"
FINISH_REASONS = (FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED, FINISH_CONTEXT, FINISH_REUSED, FINISH_ERROR)


@dataclass(frozen=True)
class StopRule:
    """When one row ends.

    stop_ids: the ids that end the row (empty: it never stops on a token, e.g. the server's ``ignore_eos``).
    max_new_tokens: its token budget. context: the model's context in tokens (None: unknown); a prompt of
    `prompt_length` tokens leaves ``context - prompt_length`` for the row. stop_strings with `decode` (tokens ->
    text): the row also stops once one of them appears in its text."""

    max_new_tokens: int
    stop_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    decode: Callable[[list[int]], str] | None = None
    context: int | None = None

    def __post_init__(self):
        if self.stop_strings and self.decode is None:
            raise ValueError("stop strings need a decode function (tokens -> text)")

    def budget(self, prompt_length: int = 0) -> int:
        """The tokens the row may generate: max_new_tokens, clipped to the context that the prompt leaves."""
        if self.context is None:
            return self.max_new_tokens
        return min(self.max_new_tokens, self.context - prompt_length)

    def finish(self, tokens: Sequence[int], *, prompt_length: int = 0, cancelled: bool = False) -> str | None:
        """The finish reason of a row that has generated `tokens` so far, or None while it goes on. The order:
        cancelled, context (nothing can be generated), stop id (the last token), stop string, budget."""
        if cancelled:
            return FINISH_CANCELLED
        if self.context is not None and prompt_length >= self.context:
            return FINISH_CONTEXT
        if tokens and tokens[-1] in self.stop_ids:
            return FINISH_STOP
        if self.stop_strings and self.stopped_on(tokens) is not None:
            return FINISH_STOP
        if len(tokens) >= self.budget(prompt_length):
            return FINISH_LENGTH
        return None

    def finished(self, tokens: Sequence[int], *, prompt_length: int = 0, cancelled: bool = False) -> str:
        """`finish` for a row whose generation is over: with no other reason it ended at its budget (``length``)."""
        return self.finish(tokens, prompt_length=prompt_length, cancelled=cancelled) or FINISH_LENGTH

    def cut(self, tokens: Sequence[int]) -> list[int]:
        """A batch row as transformers' generate() returns it (padded after its stop): up to and including the
        first stop id."""
        for i, tok in enumerate(tokens):
            if tok in self.stop_ids:
                return list(tokens[: i + 1])
        return list(tokens)

    def content(self, tokens: Sequence[int]) -> list[int]:
        """The row's tokens without the stop id that ended it (what its text and the API's usage count)."""
        tokens = list(tokens)
        return tokens[:-1] if tokens and tokens[-1] in self.stop_ids else tokens

    def stopped_on(self, tokens: Sequence[int]) -> str | None:
        """The first stop string found in the row's text (its content, decoded), or None."""
        if not self.stop_strings:
            return None
        text = self.decode(self.content(tokens))
        return next((s for s in self.stop_strings if s in text), None)


__all__ = [
    "FINISH_CANCELLED", "FINISH_CONTEXT", "FINISH_ERROR", "FINISH_LENGTH", "FINISH_REASONS", "FINISH_REUSED",
    "FINISH_STOP", "StopRule",
]
