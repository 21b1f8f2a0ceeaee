"""The old home of the teacher-forced pass: now `layerroute.eval.teacher_forced`. Re-exports its names so that
`from layerroute.eval_teacher_forced import ...` keeps working."""

from __future__ import annotations

from .eval.teacher_forced import _ppl_context as _ppl_context
from .eval.teacher_forced import ppl, teacher_forced, teacher_forced_exact

__all__ = ["ppl", "teacher_forced", "teacher_forced_exact"]
