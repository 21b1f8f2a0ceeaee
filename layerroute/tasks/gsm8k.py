"""GSM8K-style math word problems: loading (openai/gsm8k on the hub, a GSM8K JSONL: the packaged copy or a local
file) and scoring (final-number exact match, which reasoning-gym's and Turing's tasks score with too).

Math targets (GSM8K, gsm_symbolic, Turing): the assistant answer is the worked solution, GSM8K calculator
annotations ``<<48/2=24>>`` removed, and its ``#### N`` line replaced by a final line ``The answer is N.``
(commas dropped from N). Evaluators extract the number after the last "The answer is".

Scoring: ``extract_final_number`` prefers, in order: the text after the last ``####``, the last ``\\boxed{...}``,
the last "answer is ..." / "answer: ...", and finally the last number anywhere. Numbers are normalised
(``$``, thousands commas and a trailing ``%`` dropped, ``42.0`` -> ``42``, ``.5`` -> ``0.5``) so that
``gsm8k_exact_match`` compares values, not spellings.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from decimal import Decimal, InvalidOperation
from pathlib import Path

from layerroute.data.config import DataConfig, SourceConfig
from layerroute.data.records import (
    BadRow,
    Conversation,
    Record,
    checked,
    hub_rows,
    jsonl_rows,
    row_hash,
    shorten,
)
from layerroute.data.render import PLANNING
from layerroute.errors import ConfigError, DataError
from layerroute.tasks.base import Task

__all__ = [
    "extract_final_number",
    "gsm8k_exact_match",
    "gsm8k_row",
    "load_gsm8k_hub",
    "load_gsm8k_jsonl",
    "math_target",
    "normalize_number",
    "packaged_gsm8k",
    "score_final_number",
]

#: GSM8K ships in the package (openai/grade-school-math, MIT; README.md and LICENSE beside the files): what a
#: `gsm8k_jsonl` source without a `path` reads, by `split`. The test split is evaluation data only (role: eval).
GSM8K_DIR = Path(__file__).resolve().parents[1] / "data" / "gsm8k"
GSM8K_SPLITS = ("train", "test")


def packaged_gsm8k(split: str) -> Path:
    """The packaged GSM8K file of one split (train or test)."""
    return GSM8K_DIR / f"{split}.jsonl.gz"


def math_target(solution: str, final: str | None = None) -> str | None:
    """GSM8K-style worked solution -> assistant text ending with 'The answer is N.' (None: no '#### N' line)."""
    lines = solution.strip().split("\n")
    m = re.match(r"^\s*####\s*(.+?)\s*$", lines[-1]) if lines else None
    if final is None:
        if m is None:
            return None
        final = m.group(1)
    if m is not None:
        lines = lines[:-1]
    final = final.strip().replace(",", "").rstrip(".")
    body = re.sub(r"<<[^<>]*>>", "", "\n".join(lines)).strip()
    return (body + "\n" if body else "") + f"The answer is {final}."


def gsm8k_row(row: dict, source: str, category: str = "gsm8k") -> Record:
    """{"question", "answer": "...worked solution...\\n#### N"} -> one planning step."""
    q, a = row.get("question"), row.get("answer")
    row_id = f"gsm8k:{row_hash(str(q))}"
    if not isinstance(q, str) or not q.strip() or not isinstance(a, str) or not a.strip():
        return BadRow(source, "missing_field", "needs non-empty `question` and `answer` strings", row_id)
    target = math_target(a)
    if target is None:
        return BadRow(source, "no_final_answer", f"answer has no '#### N' line: {shorten(a, 80)}", row_id)
    final = target.rsplit("The answer is ", 1)[1][:-1]
    msgs = [{"role": "user", "content": q.strip()}, {"role": "assistant", "content": target}]
    return checked(Conversation(row_id, source, msgs, [], category=category, meta={"answer": final}))


def load_gsm8k_hub(src: SourceConfig, cfg: DataConfig) -> Iterator[Record]:
    """openai/gsm8k, config main (train for training; set split: test and role: eval for evaluation)."""
    for row in hub_rows(src):
        yield gsm8k_row(row, src.source_label)


def load_gsm8k_jsonl(src: SourceConfig, cfg: DataConfig) -> Iterator[Record]:
    """A GSM8K JSONL ({"question", "answer"} per line, plain or .gz): `path`, or without one the copy shipped in
    the package (`split: train` / `split: test`, layerroute/data/gsm8k/)."""
    for _, row in jsonl_rows(src.resolved_path, src.source_label, src.limit):
        yield row if isinstance(row, BadRow) else gsm8k_row(row, src.source_label)


# ---------------------------------------------------------------------------------------------------------
# GSM8K
# ---------------------------------------------------------------------------------------------------------

# A number: optional sign (not when glued to a preceding word or digit, so "3-4" is not -4), optional $,
# digits with proper thousands commas or plain digits, optional decimals; or a bare ".5".
_NUMBER = re.compile(
    r"(?:(?<![\w)])-\s?)?\$?\s?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?%?"
    r"|(?:(?<![\w)])-)?\$?\.\d+%?"
)
_ANSWER_IS = re.compile(r"answer\s*(?:is|was|=|:)\s*:?\s*", re.IGNORECASE)


def normalize_number(text: str) -> str | None:
    """Canonical spelling of one number: '$1,234.50' -> '1234.5', '42.0' -> '42', '-.5' -> '-0.5'."""
    cleaned = re.sub(r"[\s$,%]", "", text)
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _numbers(text: str) -> list[str]:
    text = text.replace("\u2212", "-")  # Unicode minus sign
    return [n for n in (normalize_number(m.group(0)) for m in _NUMBER.finditer(text)) if n is not None]


def _boxed_contents(text: str) -> list[str]:
    """Contents of every \\boxed{...}, with nested braces balanced."""
    out = []
    for match in re.finditer(r"\\boxed\s*\{", text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                out.append(text[start:i])
                break
    return out


def extract_final_number(text: str | None) -> str | None:
    """The final numeric answer in a GSM8K-style solution, normalised (see ``normalize_number``), or None.

    Looks, in order, at the text after the last ``####``, the last ``\\boxed{}``, the last "answer is" /
    "answer:", and falls back to the last number anywhere in the text.
    """
    if not text:
        return None
    if "####" in text:
        found = _numbers(text.rsplit("####", 1)[1])
        if found:
            return found[0]
    for content in reversed(_boxed_contents(text)):
        found = _numbers(content)
        if found:
            return found[0]
    for match in reversed(list(_ANSWER_IS.finditer(text))):
        found = _numbers(text[match.end() : match.end() + 80])
        if found:
            return found[0]
    found = _numbers(text)
    return found[-1] if found else None


def gsm8k_exact_match(generated: str | None, reference: str) -> bool:
    """True when the generation's final number equals the reference's (a bare number or a full GSM8K
    solution ending in ``#### N``). Values are compared, so '42.0' matches '42' and '1,234' matches '1234'."""
    want = extract_final_number(reference)
    if want is None:
        raise DataError(f"GSM8K reference has no number: {reference!r}")
    got = extract_final_number(generated)
    return got is not None and Decimal(got) == Decimal(want)


def score_final_number(step, text: str) -> tuple[bool, str | None]:
    """(correct, reason): the generation's final number against the step's `meta["answer"]`."""
    reference = step.meta.get("answer")
    if reference is None:
        return False, "no reference answer for this step"
    ok = gsm8k_exact_match(text, str(reference))
    return ok, None if ok else "wrong final number"


class Gsm8k(Task):
    """GSM8K: one planning step per problem, scored by final-number exact match; it also scores every planning
    step that names no scoring task."""

    name = "gsm8k"
    loaders = {"gsm8k_hub": load_gsm8k_hub, "gsm8k_jsonl": load_gsm8k_jsonl}
    question_answer = True
    default_for = (PLANNING,)

    def check_source(self, src, key: str) -> None:
        if src.name == "gsm8k_jsonl" and not src.path:
            if src.split not in GSM8K_SPLITS:
                raise ConfigError(f"{key}.split: the packaged GSM8K has splits {', '.join(GSM8K_SPLITS)}, got "
                                  f"{src.split!r} (or name a file with path)")
            if src.split == "test" and src.role != "eval":
                raise ConfigError(f"{key}.role: GSM8K test is evaluation data: set role: eval (never train on it)")

    def default_path(self, src) -> str | None:
        return str(packaged_gsm8k(src.split)) if src.name == "gsm8k_jsonl" else "openai/gsm8k"

    def default_hub_config(self, src) -> str | None:
        return "main" if src.name == "gsm8k_hub" else None

    def score(self, step, text: str) -> tuple[bool, str | None]:
        return score_final_number(step, text)


TASKS = (Gsm8k(),)
