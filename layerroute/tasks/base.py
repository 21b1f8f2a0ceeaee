"""What a task is: one benchmark (or one family of training chats) as an object the registry hands out.

A `Task` owns, for its source kinds (the `name` of a `data.sources` entry):

- loading: `loaders` (source kind -> `loader(src, cfg)` yielding `Conversation`s or `BadRow`s), the checks of a
  source's settings (`check_source`, raising a `ConfigError` that names the key) and its defaults (`default_path`,
  `default_hub_config`); `question_answer` says that its rows are single question/answer turns, which
  `turns_per_conversation` may chain;
- rendering into steps: `step_type` (None: the renderer's rule, a turn with tool calls is a tool-call step) and
  `eval_only` (a conversation that never goes to train);
- generation: `budget`, the new tokens a step's answer may take under an `EvalConfig`;
- scoring: `score(step, text) -> (correct, reason)`, malformed output wrong, never an exception.
  `default_for` names the step types whose steps are scored by this task when they name no task of their own
  (a hand-made step, or a step of a task with `scores = False`, such as the training chats).

Subclass it in one module of `layerroute.tasks` and list the instances in that module's `TASKS`: the registry
(`layerroute.tasks.registry`) finds them there. This module imports nothing from the rest of the package, so that
`layerroute.data.config` can ask the registry which source kinds exist.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

Loader = Callable[[Any, Any], Iterator[Any]]
"""`loader(src: SourceConfig, cfg: DataConfig)` -> `Conversation`s and `BadRow`s."""


class Task:
    """One task: its loading, its steps' type, budget and scoring (see the module docstring)."""

    name: str = ""
    """The task's name, stored in `Conversation.task` and `Step.task`."""
    loaders: Mapping[str, Loader] = {}
    """Source kind -> loader."""
    question_answer: bool = False
    """Its rows are single question/answer turns (one planning step each), which `turns_per_conversation` may
    chain into multi-turn chats."""
    takes_categories: bool = False
    """Whether its sources read `categories`."""
    scores: bool = True
    """False: its steps are scored by the task `default_for` their step type (training chats have no gold of
    their own)."""
    default_for: tuple[str, ...] = ()
    """Step types this task scores when a step names no task that scores it."""

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(self.loaders)

    # -- loading ------------------------------------------------------------------------------------------------
    def load(self, src, cfg) -> Iterator[Any]:
        """The `Conversation`s and `BadRow`s of one configured source of this task."""
        return self.loaders[src.name](src, cfg)

    def check_source(self, src, key: str) -> None:
        """Raise a `ConfigError` naming `key.<field>` when a setting of `src` does not suit this task."""

    def default_path(self, src) -> str | None:
        """Where `src` reads from when it names no `path` (a hub id, a packaged file), or None."""
        return None

    def default_hub_config(self, src) -> str | None:
        return None

    # -- rendering into steps -----------------------------------------------------------------------------------
    def step_type(self, message: dict) -> str | None:
        """The step type of an assistant turn; None: the renderer's rule (`layerroute.data.render.step_type_of`)."""
        return None

    def eval_only(self, conv, cfg) -> bool:
        """Whether `conv` goes to eval whatever its hash says (e.g. BFCL's unseen live_* categories)."""
        return False

    # -- generation and scoring ---------------------------------------------------------------------------------
    def budget(self, step, cfg) -> int:
        """New tokens a generated answer to `step` may take (`cfg`: an `EvalConfig`)."""
        return cfg.max_new_tokens_tool if step.is_tool_call else cfg.max_new_tokens_planning

    def score(self, step, text: str) -> tuple[bool, str | None]:
        """(correct, reason) for one generated assistant turn; reason None when correct."""
        raise NotImplementedError(f"task {self.name!r} does not score its steps")

    def __repr__(self) -> str:
        return f"<task {self.name}: sources {', '.join(self.sources) or 'none'}>"
