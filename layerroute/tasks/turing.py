"""TuringEnterprises/Turing-Open-Reasoning: question / answer reasoning rows, the target ending 'The answer is X.';
scored like GSM8K (final number: Turing's answers are often LaTeX, which that rule reads as its last number)."""

from __future__ import annotations

from collections.abc import Iterator

from layerroute.data.config import DataConfig, SourceConfig
from layerroute.data.records import BadRow, Conversation, Record, checked, hub_rows, row_hash
from layerroute.errors import DataError
from layerroute.tasks.base import Task
from layerroute.tasks.gsm8k import score_final_number

TURING_QUESTION_COLUMNS = ("question", "prompt", "problem")
TURING_ANSWER_COLUMNS = ("answer", "final_answer", "solution")
TURING_REASONING_COLUMNS = ("reasoning", "rationale", "cot", "chain_of_thought", "explanation", "thinking")


def turing_row(row: dict, source: str) -> Record:
    """A question/answer reasoning row: target = reasoning (if a reasoning column exists) + 'The answer is X.'."""
    qcol = next((c for c in TURING_QUESTION_COLUMNS if c in row), None)
    acol = next((c for c in TURING_ANSWER_COLUMNS if c in row), None)
    if qcol is None or acol is None:
        raise DataError(
            f"{source}: expected a question column ({', '.join(TURING_QUESTION_COLUMNS)}) and an answer column "
            f"({', '.join(TURING_ANSWER_COLUMNS)}), optionally a reasoning column ({', '.join(TURING_REASONING_COLUMNS)}); "
            f"the rows have columns {sorted(row)}"
        )
    q, a = row[qcol], row[acol]
    rid = row.get("conversation_id") or row.get("id")
    row_id = f"turing:{rid if rid not in (None, '') else row_hash(str(q))}"
    if not isinstance(q, str) or not q.strip() or a is None or not str(a).strip():
        return BadRow(source, "missing_field", f"empty `{qcol}` or `{acol}`", row_id)
    rcol = next((c for c in TURING_REASONING_COLUMNS if c in row and c != acol), None)
    reasoning = str(row[rcol]).strip() if rcol and row[rcol] else ""
    answer = str(a).strip()
    target = (
        (reasoning + "\n" if reasoning else "")
        + f"The answer is {answer}"
        + ("" if answer.endswith(".") else ".")
    )
    domain = row.get("domain")
    msgs = [{"role": "user", "content": q.strip()}, {"role": "assistant", "content": target}]
    meta = {"answer": answer, "domain": domain, "sub_domain": row.get("sub_domain") or row.get("sub-domain")}
    return checked(
        Conversation(row_id, source, msgs, [], category=f"turing:{domain}" if domain else "turing", meta=meta)
    )


def load_turing(src: SourceConfig, cfg: DataConfig) -> Iterator[Record]:
    """TuringEnterprises/Turing-Open-Reasoning.

    Its card (as mirrored publicly) documents rows {"conversation_id", "domain", "sub-domain", "question",
    "answer"}, the answer being a short final answer (LaTeX) without a worked solution, so these planning
    steps are short. A reasoning column is used when present.
    """
    for row in hub_rows(src):
        yield turing_row(row, src.source_label)


class Turing(Task):
    """Turing-Open-Reasoning from the hub (or a local copy): one planning step per question."""

    name = "turing"
    loaders = {"turing": load_turing}
    question_answer = True

    def default_path(self, src) -> str | None:
        return "TuringEnterprises/Turing-Open-Reasoning"

    def score(self, step, text: str) -> tuple[bool, str | None]:
        return score_final_number(step, text)


TASKS = (Turing(),)
