"""The one registry of tasks: which task reads a source kind, and which task scores a step.

The built-in tasks are the `TASKS` of every module of `layerroute.tasks` (found the first time the registry is
asked, so adding a task is one new module that lists its `Task` instances in `TASKS`); `register` adds one from
elsewhere (a test, a plugin). The data pipeline asks `task_for_source` (loading, settings checks, step types,
eval-only conversations) and evaluation asks `task_for_step` (budget, scoring). Like `base`, this module imports
nothing else of the package at module level.
"""

from __future__ import annotations

import importlib
import pkgutil

from layerroute.errors import ConfigError
from layerroute.tasks.base import Task

_TASKS: dict[str, Task] = {}
_BY_SOURCE: dict[str, Task] = {}
_DEFAULT_FOR: dict[str, Task] = {}
_discovered = False
_SKIP = ("base", "registry")


def register(task: Task) -> Task:
    """Add `task` (its name and source kinds must be new); returns it."""
    _discover()
    return _add(task)


def unregister(name: str) -> None:
    """Remove the task called `name` (a test's task, once the test is done)."""
    task = _TASKS.pop(name)
    for table in (_BY_SOURCE, _DEFAULT_FOR):
        for key in [k for k, t in table.items() if t is task]:
            del table[key]


def tasks() -> dict[str, Task]:
    """Every registered task by name, built-in ones first (in module order)."""
    _discover()
    return dict(_TASKS)


def task(name: str) -> Task:
    _discover()
    if name not in _TASKS:
        raise KeyError(f"unknown task {name!r}; registered: {', '.join(_TASKS)}")
    return _TASKS[name]


def source_kinds() -> tuple[str, ...]:
    """Every source kind some task reads, in registration order."""
    _discover()
    return tuple(_BY_SOURCE)


def task_for_source(kind: str) -> Task:
    """The task that reads source kind `kind` (a `ConfigError` naming the known kinds when none does)."""
    _discover()
    if kind not in _BY_SOURCE:
        raise ConfigError(f"unknown source {kind!r}; choose one of {', '.join(_BY_SOURCE)}")
    return _BY_SOURCE[kind]


def task_for_step(step) -> Task:
    """The task that scores `step`: its own (`step.task`) when that one scores, else the default of its step type."""
    _discover()
    own = _TASKS.get(getattr(step, "task", None) or "")
    if own is not None and own.scores:
        return own
    if step.step_type not in _DEFAULT_FOR:
        raise KeyError(f"no task scores {step.step_type!r} steps")
    return _DEFAULT_FOR[step.step_type]


def _add(task: Task) -> Task:
    if not task.name or task.name in _TASKS:
        raise ValueError(f"a task needs a new name, got {task.name!r}")
    taken = [k for k in task.sources if k in _BY_SOURCE]
    if taken:
        raise ValueError(f"task {task.name!r}: source kinds {taken} are read by {_BY_SOURCE[taken[0]].name!r}")
    clash = [t for t in task.default_for if t in _DEFAULT_FOR]
    if clash:
        raise ValueError(f"task {task.name!r}: {clash} steps are already scored by {_DEFAULT_FOR[clash[0]].name!r}")
    _TASKS[task.name] = task
    _BY_SOURCE.update(dict.fromkeys(task.sources, task))
    _DEFAULT_FOR.update(dict.fromkeys(task.default_for, task))
    return task


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    import layerroute.tasks as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name in _SKIP:
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for t in getattr(module, "TASKS", ()):
            _add(t)
