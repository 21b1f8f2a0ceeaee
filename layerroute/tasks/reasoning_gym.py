"""reasoning-gym's generated GSM8K-style problems (`gsm_symbolic`): loading; scored like GSM8K (final number)."""

from __future__ import annotations

from collections.abc import Iterator

from layerroute.data.config import DataConfig, SourceConfig
from layerroute.data.records import BadRow, Conversation, Record, checked, row_hash
from layerroute.errors import ConfigError
from layerroute.tasks.base import Task
from layerroute.tasks.gsm8k import math_target, score_final_number


def load_gsm_symbolic(src: SourceConfig, cfg: DataConfig) -> Iterator[Record]:
    """reasoning-gym's `gsm_symbolic`: `limit` generated problems; target = metadata.answer_cot (ends '#### N')."""
    import reasoning_gym

    seed = cfg.seed if src.seed is None else src.seed
    ds = reasoning_gym.create_dataset("gsm_symbolic", size=src.limit, seed=seed)
    for i in range(len(ds)):
        x = ds[i]
        q = x.get("question")
        cot = (x.get("metadata") or {}).get("answer_cot")
        row_id = f"gsm_symbolic:{row_hash(str(q))}"
        if not isinstance(q, str) or not isinstance(cot, str):
            yield BadRow(
                src.source_label, "missing_field", f"item {i} lacks question or metadata.answer_cot", row_id
            )
            continue
        target = math_target(cot, None if "####" in cot else str(x.get("answer")))
        final = target.rsplit("The answer is ", 1)[1][:-1]
        msgs = [{"role": "user", "content": q.strip()}, {"role": "assistant", "content": target}]
        yield checked(
            Conversation(row_id, src.source_label, msgs, [], category="gsm_symbolic", meta={"answer": final})
        )


class ReasoningGym(Task):
    """reasoning-gym's gsm_symbolic: `limit` problems generated offline, one planning step each."""

    name = "reasoning_gym"
    loaders = {"gsm_symbolic": load_gsm_symbolic}
    question_answer = True

    def check_source(self, src, key: str) -> None:
        if src.limit is None:
            raise ConfigError(f"{key}.limit: gsm_symbolic generates problems: set how many with limit")

    def score(self, step, text: str) -> tuple[bool, str | None]:
        return score_final_number(step, text)


TASKS = (ReasoningGym(),)
