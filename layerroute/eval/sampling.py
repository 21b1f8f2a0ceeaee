"""Which steps an evaluation scores: grouped by type, capped per type, the free-running accuracy draws (from the
perplexity sample, the whole eval split or the length-matched split), and the keys that name steps and step sets
(a stage's cache key: `_steps_key`)."""

from __future__ import annotations

import random

from ..config import EvalConfig
from ..errors import ConfigError
from .configurations import STEP_TYPES
from .stage_cache import fingerprint


def _by_type(steps, idx) -> dict[str, list[int]]:
    groups = {t: [] for t in STEP_TYPES}
    for i in idx:
        groups[steps[i].step_type].append(i)
    return groups


def _cap(groups: dict[str, list[int]], n: int, seed: int) -> dict[str, list[int]]:
    if n <= 0:
        return groups
    rng = random.Random(seed)
    return {t: sorted(rng.sample(ix, n)) if len(ix) > n else ix for t, ix in groups.items()}


def _accuracy_steps(ppl_steps, ppl_groups: dict[str, list[int]], all_steps, cfg: EvalConfig) -> dict[str, list]:
    """The steps of each type scored by free-running generation.

    A count the perplexity sample can hold is drawn from it (one generator over the types in order: the draw
    that produced every earlier accuracy figure); a larger one is drawn from the whole eval split, so accuracy
    can rest on many more steps than the teacher-forced passes, which cost several forwards per step."""
    rng = random.Random(cfg.seed + 1)
    out = {}
    for t in STEP_TYPES:
        n, group = cfg.accuracy_steps(t), ppl_groups[t]
        sources = cfg.accuracy_planning_sources if t == "planning" else []
        if n <= 0:
            out[t] = []
        elif sources:  # e.g. GSM8K test problems only: drawn from the whole eval split's steps of those sources
            pool = [s for s in all_steps if s.step_type == t and s.source in sources]
            missing = sorted(set(sources) - {s.source for s in pool})
            if missing:
                raise ConfigError(f"eval.accuracy_planning_sources: no eval planning steps from source {missing[0]!r} "
                                  f"(sources with some: {sorted({s.source for s in all_steps if s.step_type == t})})")
            out[t] = [pool[i] for i in sorted(rng.sample(range(len(pool)), n))] if len(pool) > n else pool
        elif n <= len(group):
            out[t] = [ppl_steps[i] for i in (sorted(rng.sample(group, n)) if len(group) > n else group)]
        else:
            pool = [i for i, s in enumerate(all_steps) if s.step_type == t]
            out[t] = [all_steps[i] for i in (sorted(rng.sample(pool, n)) if len(pool) > n else pool)]
    return out


def _length_matched_accuracy_steps(matched_steps, cfg: EvalConfig) -> dict[str, list]:
    """The length-matched steps of each type scored by free-running generation: drawn from the whole
    length-matched split (all of them when it holds no more than asked), with a generator of their own so that the
    full split's draw stays the one of every earlier figure."""
    rng = random.Random(cfg.seed + 2)
    out = {}
    for t in STEP_TYPES:
        pool = [s for s in matched_steps if s.step_type == t]
        n = cfg.accuracy_steps(t, "length_matched")
        out[t] = pool if n >= len(pool) else [pool[i] for i in sorted(rng.sample(range(len(pool)), n))]
    return out


def _step_key(step) -> tuple[str, int]:
    return step.conversation_id, step.step_index


def _steps_key(steps) -> str:
    """What a stage computed on some steps depends on: their identity and their tokens."""
    return fingerprint([[s.conversation_id, s.step_index, s.context_length, list(map(int, s.input_ids))]
                        for s in steps])
