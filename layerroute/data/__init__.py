"""Agentic step data: sources, step segmentation, splits.

Pipeline (each stage is its own module):

  sources.py    one function per dataset -> `Conversation` records (OpenAI messages + tools) or `BadRow`s
  toolcalls.py  parse / render tool calls in assistant text (Hermes <tool_call>, Glaive <functioncall>)
  render.py     every assistant turn -> one `Step` (input_ids, labels, decision_mask, step_type, ...)
                with the tokenizer's own chat template (tools passed natively, or in Hermes text form)
  splits.py     train/eval by a seeded hash of the conversation id; the length-matched eval subset
  build.py      `load_steps(cfg, tokenizer) -> StepData` (train, eval, eval_length_matched, report, stats())
  collate.py    `collate_steps` (right padding) and `length_grouped_batches`
  config.py     `DataConfig` / `SourceConfig` (the YAML `data:` section)
  cli.py        `layerroute data --config <yaml> --stats | --show N`
  tokenizer.py  `load_tokenizer(name)` (offline SmolLM2 GGUF, .gguf path, folder, hub id)

Import cost: `datasets` and `reasoning_gym` are imported only when a source that needs them is read; torch
comes in through `collate`.
"""

from layerroute.data.build import DataReport, StepData, load_steps
from layerroute.data.collate import collate_steps, length_grouped_batches
from layerroute.data.config import DataConfig, SourceConfig
from layerroute.data.render import (
    IGNORE_INDEX,
    PLANNING,
    TOOL_CALL,
    RenderError,
    Step,
    render_steps,
    template_supports_tools,
)
from layerroute.data.sources import BadRow, Conversation, iter_source
from layerroute.data.splits import assign_split, length_matched_subset
from layerroute.data.toolcalls import parse_tool_calls, render_tool_calls

__all__ = [
    "BadRow",
    "Conversation",
    "DataConfig",
    "DataReport",
    "IGNORE_INDEX",
    "PLANNING",
    "RenderError",
    "SourceConfig",
    "Step",
    "StepData",
    "TOOL_CALL",
    "assign_split",
    "collate_steps",
    "iter_source",
    "length_grouped_batches",
    "length_matched_subset",
    "load_steps",
    "parse_tool_calls",
    "render_steps",
    "render_tool_calls",
    "template_supports_tools",
]
