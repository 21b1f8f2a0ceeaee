"""A configured source's records, read by the task that owns its kind, and the chaining of question/answer rows.

`iter_source(src, cfg)` asks the task registry (`layerroute.tasks.registry.task_for_source`) for the task that
reads `src.name` and yields its `Conversation`s (each marked with the task's name, which its steps keep) and
`BadRow`s. The loaders live with their tasks in `layerroute.tasks` (BFCL, GSM8K, reasoning-gym, Turing, the
function-calling chats); the record and its checks in `layerroute.data.records`.
"""

from __future__ import annotations

from collections.abc import Iterator

from layerroute.data.config import DataConfig, SourceConfig
from layerroute.data.records import Conversation, Record, row_hash
from layerroute.tasks.registry import task_for_source


def iter_source(src: SourceConfig, cfg: DataConfig) -> Iterator[Record]:
    """Conversations and bad rows of one configured source, each conversation marked with its task."""
    task = task_for_source(src.name)
    for rec in task.load(src, cfg):
        if isinstance(rec, Conversation):
            rec.task = task.name
        yield rec


def chain_conversations(convs: list[Conversation]) -> Conversation:
    """Consecutive single-turn question/answer conversations as one multi-turn chat (user, assistant, user, ...).

    Each assistant turn stays one step; its own gold extras are kept in meta["per_step"][step_index].
    """
    first = convs[0]
    messages = [m for c in convs for m in c.messages]
    kind = first.id.split(":", 1)[0]
    meta = {"chained_ids": [c.id for c in convs], "per_step": [c.meta for c in convs]}
    repairs = [r for c in convs for r in c.repairs]
    return Conversation(
        f"{kind}:chain:{row_hash(*meta['chained_ids'])}",
        first.source,
        messages,
        [],
        first.category,
        meta,
        repairs,
        task=first.task,
    )
