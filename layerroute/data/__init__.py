"""Agentic step data: sources, step segmentation, splits.

Pipeline (each stage is its own module):

  records.py    the `Conversation` record (OpenAI messages + tools) / `BadRow`, its checks, the row readers
  sources.py    `iter_source`: a configured source's records, read by the task that owns its kind
                (`layerroute.tasks.registry`; each task's loader is in `layerroute.tasks`), and the chaining
                of question/answer rows
  toolcalls.py  parse / render tool calls in assistant text (Hermes <tool_call>, Glaive <functioncall>)
  render.py     every assistant turn -> one `Step` (input_ids, labels, decision_mask, step_type, ...)
                with the tokenizer's own chat template (tools passed natively, or in Hermes text form)
  splits.py     train/eval by a seeded hash of the conversation id; the length-matched eval subset
  build.py      `load_steps(cfg, tokenizer) -> StepData` (train, eval, eval_length_matched, report, stats())
  collate.py    `collate_steps` (right padding) and `length_grouped_batches`
  config.py     `DataConfig` / `SourceConfig` (the YAML `data:` section)
  cli.py        `layerroute data --config <yaml> --stats | --show N`

The tokenizer that renders the data comes from `layerroute.tokenizer.load_tokenizer` (packaged GGUF, .gguf path,
folder, hub id) and the pad id from `layerroute.special_tokens`: data never imports model loading.

`build` and `sources` are not imported here (import `layerroute.data.build.load_steps` and
`layerroute.data.sources.iter_source` from their modules): they ask the task registry, whose tasks import
`records`, `render`, `toolcalls` and `config` from this package. Arrows between data and tasks: data asks only
`layerroute.tasks.registry` (and `config` only it), which imports no task module by name; the tasks import the
public names of `records`, `render`, `toolcalls` and `config` (tests/test_import_graph.py).

Import cost: `datasets` and `reasoning_gym` are imported only when a source that needs them is read; torch
comes in through `collate`.
"""

from layerroute.data.collate import collate_steps, length_grouped_batches
from layerroute.data.config import DataConfig, SourceConfig
from layerroute.data.records import BadRow, Conversation
from layerroute.data.render import (
    IGNORE_INDEX,
    PLANNING,
    TOOL_CALL,
    RenderError,
    Step,
    render_steps,
    template_supports_tools,
)
from layerroute.data.splits import assign_split, length_matched_subset
from layerroute.data.toolcalls import parse_tool_calls, render_tool_calls

__all__ = [
    "BadRow",
    "Conversation",
    "DataConfig",
    "IGNORE_INDEX",
    "PLANNING",
    "RenderError",
    "SourceConfig",
    "Step",
    "TOOL_CALL",
    "assign_split",
    "collate_steps",
    "length_grouped_batches",
    "length_matched_subset",
    "parse_tool_calls",
    "render_steps",
    "render_tool_calls",
    "template_supports_tools",
]
