"""What every evaluation is reported over: the step types and the model configurations (eval.json's keys)."""

from __future__ import annotations

STEP_TYPES = ("tool_call", "planning")
PPL_CONFIGS = ("base", "lora_full_depth", "routed", "routed_no_lora")
ACC_CONFIGS = ("base", "lora_full_depth", "routed", "routed_no_lora")
