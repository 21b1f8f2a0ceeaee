"""Typed settings of the data module: which sources to read, and how to cut, split and match them.

Every field carries a one-line docstring (the string literal after it). Values are checked in
`__post_init__`; a bad value raises `ConfigError` naming the key as the YAML spells it, e.g.
`data.eval_fraction` or `data.sources[1].limit`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from layerroute.errors import ConfigError
from layerroute.tasks.registry import source_kinds, task_for_source, tasks

#: The source kinds, their loaders, defaults and checks belong to the tasks (`layerroute.tasks.registry`):
#: `SourceConfig` asks the registry which kinds exist and lets the kind's task check its settings.

#: BFCL categories that are single-turn and have ground truth, so they become one tool-call step each.
BFCL_CATEGORIES = (
    "simple_python",
    "simple_java",
    "simple_javascript",
    "multiple",
    "parallel",
    "parallel_multiple",
    "live_simple",
    "live_multiple",
    "live_parallel",
    "live_parallel_multiple",
)
#: The BFCL categories read when a `bfcl` source names none (Java/JavaScript left out: their argument
#: values are source-code strings, a different task from Python/JSON calls).
BFCL_DEFAULT_CATEGORIES = tuple(c for c in BFCL_CATEGORIES if c not in ("simple_java", "simple_javascript"))
#: BFCL's user-contributed categories: functions never seen in the others, reserved for evaluation.
BFCL_LIVE_CATEGORIES = ("live_simple", "live_multiple", "live_parallel", "live_parallel_multiple")

ROLES = ("both", "train", "eval")


def _fail(key: str, msg: str) -> ConfigError:
    return ConfigError(f"{key}: {msg}")


def _unknown_keys(cls, d: dict, prefix: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(
            f"{prefix}: unknown key(s) {', '.join(repr(k) for k in unknown)}; known keys: {', '.join(sorted(names))}"
        )


@dataclass
class SourceConfig:
    """One dataset to read. `name` picks the loader; the other fields narrow what it reads."""

    name: str
    """Source kind: one of hermes, glaive, gsm8k_hub, turing, bfcl, gsm_symbolic, gsm8k_jsonl, jsonl (and any a
    registered task reads: `layerroute.tasks.registry`)."""
    path: str | None = None
    """Hub id, or a local file/folder (json, jsonl, jsonl.gz, parquet). Hub kinds default to their dataset id; bfcl to
    the bfcl-eval package's data; gsm8k_jsonl to the GSM8K copy shipped in layerroute (by `split`)."""
    hub_config: str | None = None
    """Hub dataset configuration name (gsm8k_hub defaults to 'main'; hermes e.g. 'func_calling_singleturn')."""
    split: str = "train"
    """Hub/file split to read (the source's own split name, not our train/eval assignment); gsm8k_jsonl without a
    path: train or test of the packaged GSM8K."""
    limit: int | None = None
    """Read at most this many rows (after category filtering); for gsm_symbolic, how many problems to generate."""
    categories: list[str] | None = None
    """bfcl only: the categories to read (default: the single-turn Python/JSON ones, live_* included)."""
    role: str = "both"
    """Where its conversations go: 'both' (split by eval_fraction), 'train' (train only) or 'eval' (eval only)."""
    label: str | None = None
    """Name reported in statistics and stored in Step.source (default: the source kind)."""
    seed: int | None = None
    """gsm_symbolic only: generator seed (default: data.seed)."""
    turns_per_conversation: int = 1
    """Question/answer sources only: chain this many consecutive problems into one multi-turn chat, so that
    planning steps also come with long contexts (each later problem sees the earlier ones)."""

    def __post_init__(self) -> None:
        self._validate("data.sources[?]")

    def _validate(self, key: str) -> None:
        try:
            task = task_for_source(self.name)
        except ConfigError as e:
            raise _fail(f"{key}.name", str(e)) from None
        if self.role not in ROLES:
            raise _fail(f"{key}.role", f"must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.limit is not None and (
            not isinstance(self.limit, int) or isinstance(self.limit, bool) or self.limit < 1
        ):
            raise _fail(f"{key}.limit", f"must be a positive integer or null, got {self.limit!r}")
        if self.categories is not None and not task.takes_categories:
            with_categories = [k for t in tasks().values() if t.takes_categories for k in t.sources]
            raise _fail(f"{key}.categories", f"only the {', '.join(with_categories)} source has categories, "
                                              f"not {self.name!r}")
        task.check_source(self, key)
        t = self.turns_per_conversation
        if not isinstance(t, int) or isinstance(t, bool) or t < 1:
            raise _fail(f"{key}.turns_per_conversation", f"must be a positive integer, got {t!r}")
        if t > 1 and not task.question_answer:
            qa = [k for q in tasks().values() if q.question_answer for k in q.sources]
            raise _fail(
                f"{key}.turns_per_conversation",
                f"only question/answer sources ({', '.join(qa)}) can be chained, not {self.name!r}",
            )
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise _fail(f"{key}.seed", f"must be an integer or null, got {self.seed!r}")

    @property
    def task(self):
        """The task that reads this source (`layerroute.tasks.registry`)."""
        return task_for_source(self.name)

    @property
    def source_label(self) -> str:
        """The name used in reports and in Step.source."""
        return self.label or self.name

    @property
    def resolved_path(self) -> str | None:
        """`path`, or the task's default for the kind: a hub id, or (gsm8k_jsonl) the packaged GSM8K file of
        `split`."""
        return self.path or self.task.default_path(self)

    @property
    def resolved_hub_config(self) -> str | None:
        return self.hub_config or self.task.default_hub_config(self)

    @classmethod
    def from_dict(cls, d: dict, index: int = 0) -> SourceConfig:
        key = f"data.sources[{index}]"
        if not isinstance(d, dict):
            raise ConfigError(f"{key}: must be a mapping with at least `name`, got {d!r}")
        _unknown_keys(cls, d, key)
        if "name" not in d:
            raise ConfigError(f"{key}.name: missing; choose one of {', '.join(source_kinds())}")
        try:
            return cls(**d)
        except ConfigError as e:  # re-key the message with the source's position in the list
            raise ConfigError(str(e).replace("data.sources[?]", key)) from None


@dataclass
class DataConfig:
    """Everything the data module needs to turn sources into train/eval steps."""

    sources: list[SourceConfig] = field(default_factory=list)
    """The datasets to read, in order."""
    max_length: int = 1024
    """Longest step (context + target tokens) kept; longer steps are dropped and counted, never truncated."""
    eval_fraction: float = 0.1
    """Fraction of the conversations of 'both'-role sources assigned to eval (by a hash of id and seed)."""
    seed: int = 0
    """Seed of the train/eval hash split and of the length-matched sampling."""
    bad_row_max_fraction: float = 0.05
    """Stop with DataError when a source's unparseable/unrenderable rows exceed this fraction of its rows."""
    bfcl_eval_only_categories: list[str] = field(default_factory=lambda: list(BFCL_LIVE_CATEGORIES))
    """BFCL categories never trained on (evaluation on unseen functions)."""
    length_match_bin_ratio: float = 1.25
    """Width of the length-matching bins, as a ratio: bin k holds lengths in [r^k, r^(k+1)) on both axes."""
    length_match_max_per_type: int | None = None
    """Cap on the length-matched subset size per step type (None: as many as the matched bins allow)."""
    progress: bool = True
    """Show tqdm progress bars while loading and rendering."""

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        if not isinstance(self.sources, list):
            raise _fail("data.sources", "must be a list of sources")
        for i, s in enumerate(self.sources):
            if isinstance(s, dict):
                self.sources[i] = SourceConfig.from_dict(s, i)
            elif isinstance(s, SourceConfig):
                s._validate(f"data.sources[{i}]")
            else:
                raise _fail(f"data.sources[{i}]", f"must be a mapping, got {s!r}")
        if not isinstance(self.max_length, int) or isinstance(self.max_length, bool) or self.max_length < 8:
            raise _fail("data.max_length", f"must be an integer >= 8, got {self.max_length!r}")
        if not isinstance(self.eval_fraction, (int, float)) or not 0.0 <= self.eval_fraction < 1.0:
            raise _fail("data.eval_fraction", f"must be in [0, 1), got {self.eval_fraction!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise _fail("data.seed", f"must be an integer, got {self.seed!r}")
        if (
            not isinstance(self.bad_row_max_fraction, (int, float))
            or not 0.0 <= self.bad_row_max_fraction <= 1.0
        ):
            raise _fail("data.bad_row_max_fraction", f"must be in [0, 1], got {self.bad_row_max_fraction!r}")
        if isinstance(self.bfcl_eval_only_categories, str) or not isinstance(
            self.bfcl_eval_only_categories, list
        ):
            raise _fail("data.bfcl_eval_only_categories", "must be a list of BFCL category names")
        bad = [c for c in self.bfcl_eval_only_categories if c not in BFCL_CATEGORIES]
        if bad:
            raise _fail("data.bfcl_eval_only_categories", f"unknown BFCL categories {bad}")
        if not isinstance(self.length_match_bin_ratio, (int, float)) or self.length_match_bin_ratio <= 1.0:
            raise _fail("data.length_match_bin_ratio", f"must be > 1, got {self.length_match_bin_ratio!r}")
        m = self.length_match_max_per_type
        if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m < 1):
            raise _fail("data.length_match_max_per_type", f"must be a positive integer or null, got {m!r}")
        if not isinstance(self.progress, bool):
            raise _fail("data.progress", f"must be true or false, got {self.progress!r}")

    @classmethod
    def from_dict(cls, d: dict | None) -> DataConfig:
        """Build from the YAML `data:` section; unknown keys are rejected by name."""
        d = dict(d or {})
        _unknown_keys(cls, d, "data")
        sources = d.pop("sources", [])
        if not isinstance(sources, list):
            raise _fail("data.sources", f"must be a list of sources, got {type(sources).__name__}")
        srcs = [SourceConfig.from_dict(s, i) for i, s in enumerate(sources)]
        return cls(sources=srcs, **d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
