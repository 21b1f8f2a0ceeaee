"""Sources -> conversations -> train/eval steps, with a report of everything that was skipped and why.

`load_steps(cfg, tokenizer)` reads every configured source in order, drops exact-duplicate conversations
(same id: the first occurrence wins, across sources too), assigns each conversation to train or eval
(`layerroute.data.splits`), renders its assistant turns into steps (`layerroute.data.render`), and builds
the length-matched eval subset. Rows that cannot be parsed or rendered are counted per source and reason;
when a source's bad rows exceed `bad_row_max_fraction` of its rows the load stops with a `DataError`
that shows examples. Over-long steps are dropped and counted separately (they are not bad rows).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from layerroute.data.config import DataConfig, SourceConfig
from layerroute.data.records import BadRow, Conversation
from layerroute.data.render import PLANNING, TOOL_CALL, RenderError, Step, StepRenderer
from layerroute.data.sources import chain_conversations, iter_source
from layerroute.data.splits import assign_split, length_matched_subset
from layerroute.errors import DataError

EXAMPLES_PER_REASON = 3
SPLITS = ("train", "eval", "eval_length_matched")


@dataclass
class DataReport:
    """What was read, kept, repaired, rejected and dropped, per source."""

    rows: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    """Per source: rows read, conversations kept, bad rows, duplicates skipped, steps made."""
    rejected: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    """Per source: bad rows by reason."""
    examples: dict[str, dict[str, list[str]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list))
    )
    """Per source and reason: the first few offending rows, 'row_id: detail'."""
    repaired: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    """Per source: rows kept after accepting a non-standard form (counted once per row and form)."""
    dropped_too_long: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    """Per source: steps longer than max_length, by step type."""
    dropped_too_long_by_category: Counter = field(default_factory=Counter)
    """Steps longer than max_length, by category (e.g. BFCL live_multiple, whose tool lists are long)."""
    length_matched: dict = field(default_factory=dict)
    """What `length_matched_subset` reported."""

    def add_bad(self, bad: BadRow) -> None:
        self.rows[bad.source]["bad"] += 1
        self.rejected[bad.source][bad.reason] += 1
        ex = self.examples[bad.source][bad.reason]
        if len(ex) < EXAMPLES_PER_REASON:
            ex.append(f"{bad.row_id}: {bad.detail}")

    def bad_fraction(self, source: str) -> float:
        n = self.rows[source]["rows"]
        return self.rows[source]["bad"] / n if n else 0.0

    def check(self, source: str, max_fraction: float) -> None:
        """Raise DataError (with examples) when too many of `source`'s rows were bad."""
        frac = self.bad_fraction(source)
        if frac > max_fraction:
            lines = [
                f"{source}: {self.rows[source]['bad']} of {self.rows[source]['rows']} rows ({frac:.1%}) could not be "
                f"parsed or rendered, above data.bad_row_max_fraction = {max_fraction:g}. Reasons and examples:"
            ]
            for reason, n in self.rejected[source].most_common():
                lines.append(f"  {reason}: {n}")
                lines.extend(f"    {e}" for e in self.examples[source][reason])
            raise DataError("\n".join(lines))

    def summary(self) -> str:
        """Human-readable lines: rejected rows by source and reason, and over-long drops."""
        out = []
        for source, c in self.rows.items():
            out.append(
                f"{source}: {c['rows']} rows, {c['conversations']} conversations, {c['steps']} steps, "
                f"{c['bad']} bad, {c['duplicates']} duplicates, "
                f"{sum(self.dropped_too_long[source].values())} steps over max_length"
            )
            for reason, n in self.rejected[source].most_common():
                out.append(f"  rejected {reason}: {n} (e.g. {self.examples[source][reason][0]})")
        return "\n".join(out)


@dataclass
class StepData:
    """The steps of one data configuration, split, with the report of how they were made."""

    train: list[Step]
    eval: list[Step]
    eval_length_matched: list[Step]
    report: DataReport
    config: DataConfig
    tokenizer_name: str = ""
    template_has_tools: bool = False

    def split(self, name: str) -> list[Step]:
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r}; choose one of {SPLITS}")
        return getattr(self, name)

    def stats(self) -> dict:
        """JSON-able statistics: counts per source x step type x split, length percentiles, rejections."""
        counts: dict = {}
        categories: dict = {}
        for split in SPLITS:
            for s in self.split(split):
                c = counts.setdefault(
                    s.source, {TOOL_CALL: {k: 0 for k in SPLITS}, PLANNING: {k: 0 for k in SPLITS}}
                )
                c[s.step_type][split] += 1
                cat = categories.setdefault(s.category or "?", {k: 0 for k in SPLITS})
                cat[split] += 1
        totals = {
            split: {t: sum(1 for s in self.split(split) if s.step_type == t) for t in (TOOL_CALL, PLANNING)}
            for split in SPLITS
        }
        lengths = {
            split: {
                t: {
                    "context_length": percentiles(
                        [s.context_length for s in self.split(split) if s.step_type == t]
                    ),
                    "step_length": percentiles([s.length for s in self.split(split) if s.step_type == t]),
                    "total_length": percentiles(
                        [s.total_length for s in self.split(split) if s.step_type == t]
                    ),
                }
                for t in (TOOL_CALL, PLANNING)
            }
            for split in SPLITS
        }
        r = self.report
        return {
            "tokenizer": self.tokenizer_name,
            "template_has_tools": self.template_has_tools,
            "max_length": self.config.max_length,
            "eval_fraction": self.config.eval_fraction,
            "seed": self.config.seed,
            "eval_only_categories": list(self.config.bfcl_eval_only_categories),
            "totals": totals,
            "counts": counts,
            "categories": dict(sorted(categories.items())),
            "length_percentiles": lengths,
            "length_matched": r.length_matched,
            "rows": {s: dict(c) for s, c in r.rows.items()},
            "rejected_rows": {s: dict(c) for s, c in r.rejected.items() if c},
            "rejected_examples": {s: {k: v[:1] for k, v in ex.items()} for s, ex in r.examples.items() if ex},
            "repaired_rows": {s: dict(c) for s, c in r.repaired.items() if c},
            "dropped_too_long": {s: dict(c) for s, c in r.dropped_too_long.items() if c},
            "dropped_too_long_by_category": dict(sorted(r.dropped_too_long_by_category.items())),
        }


def percentiles(xs: list[int], ps=(0, 5, 25, 50, 75, 95, 100)) -> dict[str, float]:
    """Nearest-rank percentiles ({} for an empty list), keyed 'p5', ..., plus the mean."""
    if not xs:
        return {}
    ys = sorted(xs)
    out = {f"p{p}": ys[min(len(ys) - 1, max(0, math.ceil(p / 100 * len(ys)) - 1))] for p in ps}
    out["mean"] = round(sum(ys) / len(ys), 1)
    return out


def _load_source(
    src: SourceConfig,
    cfg: DataConfig,
    renderer: StepRenderer,
    report: DataReport,
    seen: set[str],
    train: list[Step],
    eval_: list[Step],
) -> None:
    label = src.source_label
    rows = report.rows[label]
    task = src.task  # the task that reads this source kind: its step types and eval-only conversations

    def add(conv: Conversation) -> None:
        dropped: Counter = Counter()
        try:
            steps = renderer.render(conv, dropped=dropped, step_type=task.step_type)
        except RenderError as e:
            report.add_bad(BadRow(label, e.reason, e.detail, conv.id))
            return
        report.dropped_too_long[label].update(dropped)
        if dropped:
            report.dropped_too_long_by_category[conv.category or "?"] += sum(dropped.values())
        for r in sorted(set(conv.repairs)):
            report.repaired[label][r] += 1
        rows["conversations"] += 1
        rows["steps"] += len(steps)
        split = assign_split(
            conv.id,
            seed=cfg.seed,
            eval_fraction=cfg.eval_fraction,
            role=src.role,
            eval_only=task.eval_only(conv, cfg),
        )
        (eval_ if split == "eval" else train).extend(steps)

    chain: list[Conversation] = []
    bar = tqdm(
        iter_source(src, cfg), desc=f"data[{label}]", unit="row", disable=not cfg.progress, leave=False
    )
    for rec in bar:
        rows["rows"] += 1
        if isinstance(rec, BadRow):
            report.add_bad(rec)
            continue
        if rec.id in seen:  # exact duplicate (ids are content hashes where the dataset has none)
            rows["duplicates"] += 1
            continue
        seen.add(rec.id)
        if src.turns_per_conversation > 1:
            chain.append(rec)
            if len(chain) == src.turns_per_conversation:
                add(chain_conversations(chain))
                chain = []
        else:
            add(rec)
    if chain:
        add(chain_conversations(chain))
    bar.close()
    if rows["rows"] == 0:
        raise DataError(f"{label}: the source produced no rows (check its path, split, categories and limit)")
    report.check(label, cfg.bad_row_max_fraction)


def load_steps(cfg: DataConfig, tokenizer) -> StepData:
    """Read every source of `cfg`, render its conversations with `tokenizer`, and split the steps."""
    if not cfg.sources:
        raise DataError("data.sources is empty: name at least one source")
    renderer = StepRenderer(tokenizer, cfg.max_length)
    report = DataReport()
    train: list[Step] = []
    eval_: list[Step] = []
    seen: set[str] = set()
    for src in cfg.sources:
        _load_source(src, cfg, renderer, report, seen, train, eval_)
    matched, info = length_matched_subset(
        eval_, ratio=cfg.length_match_bin_ratio, seed=cfg.seed, max_per_type=cfg.length_match_max_per_type
    )
    report.length_matched = info
    return StepData(
        train=train,
        eval=eval_,
        eval_length_matched=matched,
        report=report,
        config=cfg,
        tokenizer_name=str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        template_has_tools=renderer.native_tools,
    )
