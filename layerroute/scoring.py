"""Task-accuracy scoring, moved into one module per benchmark; this module re-exports it for old imports.

- BFCL's AST checking of tool calls: `layerroute.tasks.bfcl_ast` (`check_tool_calls`, `CheckResult`) and
  `layerroute.tasks.bfcl` (`answer_to_calls`).
- GSM8K final-number exact match: `layerroute.tasks.gsm8k` (`gsm8k_exact_match`, `extract_final_number`,
  `normalize_number`).
"""

from __future__ import annotations

from layerroute.tasks.bfcl import answer_to_calls
from layerroute.tasks.bfcl_ast import CheckResult, check_tool_calls
from layerroute.tasks.gsm8k import extract_final_number, gsm8k_exact_match, normalize_number

__all__ = [
    "CheckResult",
    "answer_to_calls",
    "check_tool_calls",
    "extract_final_number",
    "gsm8k_exact_match",
    "normalize_number",
]
