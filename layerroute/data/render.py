"""Step segmentation and templating: every assistant turn of a conversation becomes one `Step`.

A step's tokens are its full preceding context followed by its target (the assistant turn, end-of-turn
token included), rendered with the tokenizer's OWN chat template:

* Templates that know about tools (their text mentions `tools`, e.g. Qwen2.5's) get ``tools=`` and the
  structured ``tool_calls`` / ``tool`` messages as they are.
* Templates that do not (SmolLM2's plain ChatML) get one fixed convention, the Hermes/Qwen2.5 text form, so
  the model sees the same text it would with Qwen2.5's template:
  - the tools go into the system turn: the system message (or "You are a helpful assistant." when there is
    none) followed by Qwen2.5's "# Tools ... <tools>{one JSON spec per line}</tools> ... <tool_call>"
    instructions (`tools_system_text`);
  - an assistant turn with calls is its text (if any), a newline, then one
    ``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`` block per call, newline-separated;
  - tool results become one user turn per run of consecutive results, each result wrapped as
    ``<tool_response>\\n...\\n</tool_response>`` and joined by newlines.

Target span. The context is the template's rendering of the messages before the turn with
``add_generation_prompt=True`` (so it ends with the assistant header); the full text renders the messages up
to and including the turn. The context text must be a string prefix of the full text and its tokens a token
prefix of the full tokens, otherwise the conversation is rejected (`RenderError`), never guessed. The target
is the full tokens after the context, cut after the first end-of-turn token (what generation would stop on;
the template's trailing newline is not a target). Labels follow Hugging Face's convention: aligned with
``input_ids`` (the model shifts them), -100 on the context.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field

from layerroute import chat_template
from layerroute.data.records import Conversation
from layerroute.data.toolcalls import render_tool_calls
from layerroute.errors import DataError
from layerroute.special_tokens import end_of_turn_ids

IGNORE_INDEX = -100
TOOL_CALL = "tool_call"
PLANNING = "planning"

DEFAULT_TOOL_SYSTEM = "You are a helpful assistant."


class RenderError(DataError):
    """A conversation could not be rendered into steps; `reason` is the key counted in reports."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Step:
    """One assistant turn with its full preceding context, tokenized."""

    input_ids: list[int]
    """Context tokens followed by the target tokens (the last one is the end-of-turn token)."""
    labels: list[int]
    """-100 on the context, the token id on the step's own target tokens (aligned with input_ids)."""
    decision_mask: list[int]
    """1 at the context positions the router may read (everything before the first target token, assistant
    header included), 0 on the target tokens."""
    step_type: str
    """'tool_call' if the assistant turn contains a tool call, else 'planning'."""
    context_length: int
    """Number of context tokens (= index of the first target token)."""
    length: int
    """Number of target tokens."""
    source: str
    conversation_id: str
    step_index: int
    """Index of this assistant turn within its conversation (0-based)."""
    reference: dict | None = None
    """The gold assistant message (OpenAI form, structured tool_calls) for free-running evaluation."""
    tools: list[dict] = field(default_factory=list)
    """The conversation's tools (OpenAI specs)."""
    category: str | None = None
    """E.g. the BFCL category, 'gsm8k', 'gsm_symbolic'."""
    context_messages: list[dict] = field(default_factory=list)
    """The OpenAI messages before the turn (what a server would receive), for free-running evaluation."""
    meta: dict = field(default_factory=dict)
    """Gold extras from the source, e.g. {"answer": "72"} or BFCL's possible answers."""
    task: str | None = None
    """The task of its conversation, which scores it (`layerroute.tasks.registry.task_for_step`)."""

    @property
    def is_tool_call(self) -> bool:
        return self.step_type == TOOL_CALL

    @property
    def total_length(self) -> int:
        return len(self.input_ids)

    @property
    def id(self) -> str:
        return f"{self.conversation_id}#{self.step_index}"

    @property
    def context_ids(self) -> list[int]:
        """The prompt for generation: context tokens only (ends with the assistant header)."""
        return self.input_ids[: self.context_length]

    @property
    def target_ids(self) -> list[int]:
        return self.input_ids[self.context_length :]


def step_type_of(message: dict) -> str:
    """The step type of an assistant turn unless its task says otherwise: a turn with tool calls is a tool-call
    step, any other a planning step."""
    return TOOL_CALL if message.get("tool_calls") else PLANNING


def chat_template_text(tokenizer) -> str:
    """The template text (the default one of several named templates); a tokenizer without one raises the
    error every command gives (`layerroute.chat_template.ChatTemplateMissing`, naming model.chat_template)."""
    return chat_template.require(tokenizer)


def template_supports_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders `tools` itself (its text references `tools`)."""
    return re.search(r"\btools\b", chat_template_text(tokenizer)) is not None


def tools_system_text(system: str | None, tools: list[dict]) -> str:
    """The system turn of the Hermes convention: Qwen2.5's tools instructions after the system text."""
    specs = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        (system if system is not None else DEFAULT_TOOL_SYSTEM)
        + "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
        + specs
        + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def hermes_text_messages(messages: list[dict], tools: list[dict]) -> list[dict]:
    """Messages for a template without tool support: tools, calls and results written into plain text."""
    out: list[dict] = []
    msgs = list(messages)
    if tools:
        if msgs and msgs[0]["role"] == "system":
            out.append({"role": "system", "content": tools_system_text(msgs[0].get("content") or "", tools)})
            msgs = msgs[1:]
        else:
            out.append({"role": "system", "content": tools_system_text(None, tools)})
    for m in msgs:
        role = m["role"]
        if role == "assistant" and m.get("tool_calls"):
            calls = render_tool_calls(m["tool_calls"])
            text = (m.get("content") or "").strip()
            out.append({"role": "assistant", "content": (text + "\n" if text else "") + calls})
        elif role == "tool":
            block = "<tool_response>\n" + (m.get("content") or "") + "\n</tool_response>"
            if out and out[-1].get("_tool_group"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_group": True})
        else:
            out.append({"role": role, "content": m.get("content") or ""})
    for m in out:
        m.pop("_tool_group", None)
    return out


class StepRenderer:
    """Renders conversations into steps for one tokenizer (caches the template facts)."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.native_tools = template_supports_tools(tokenizer)
        self.eot_ids = end_of_turn_ids(tokenizer)

    def _text(self, messages: list[dict], tools: list[dict], add_generation_prompt: bool) -> str:
        kwargs = {}
        if self.native_tools:
            if tools:
                kwargs["tools"] = tools
        else:
            messages = hermes_text_messages(messages, tools)
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
            )
        except Exception as e:  # noqa: BLE001 - jinja raises TemplateError, TypeError, ...; count it
            raise RenderError("template_error", f"{type(e).__name__}: {e}") from e

    def _ids(self, text: str) -> list[int]:
        # Templates write their own special tokens (BOS included where they want it).
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def render(self, conv: Conversation, dropped: Counter | None = None, step_type=None) -> list[Step]:
        """Every assistant turn of `conv` as one step; `step_type(message)` (the task's, `Task.step_type`) names
        a turn's type, None (or a None answer) leaving it to `step_type_of`."""
        steps: list[Step] = []
        k = 0
        for i, msg in enumerate(conv.messages):
            if msg["role"] != "assistant":
                continue
            step_index, k = k, k + 1
            kind = (step_type(msg) if step_type is not None else None) or step_type_of(msg)
            context = conv.messages[:i]
            prefix_text = self._text(context, conv.tools, add_generation_prompt=True)
            full_text = self._text(conv.messages[: i + 1], conv.tools, add_generation_prompt=False)
            if not full_text.startswith(prefix_text):
                raise RenderError(
                    "template_prefix_unstable",
                    f"turn {i}: the context rendering is not a prefix of the rendering with the turn",
                )
            prefix_ids = self._ids(prefix_text)
            full_ids = self._ids(full_text)
            n = len(prefix_ids)
            if full_ids[:n] != prefix_ids:
                raise RenderError(
                    "token_boundary_mismatch", f"turn {i}: context tokens change when the turn follows"
                )
            target = full_ids[n:]
            end = next((j for j, t in enumerate(target) if t in self.eot_ids), None)
            if end is None:
                raise RenderError(
                    "no_end_of_turn_token", f"turn {i}: no end-of-turn token after the assistant turn"
                )
            trailer = target[end + 1 :]
            if trailer and self.tokenizer.decode(trailer).strip():
                # An end-of-turn token inside the turn's own text: cutting there would silently truncate it.
                raise RenderError(
                    "end_of_turn_inside_turn", f"turn {i}: text follows the first end-of-turn token"
                )
            target = target[: end + 1]
            if len(target) < 2:
                raise RenderError("empty_target", f"turn {i}: the assistant turn renders to no tokens")
            if n + len(target) > self.max_length:
                if dropped is not None:
                    dropped[kind] += 1
                continue
            ids = prefix_ids + target
            steps.append(
                Step(
                    input_ids=ids,
                    labels=[IGNORE_INDEX] * n + list(target),
                    decision_mask=[1] * n + [0] * len(target),
                    step_type=kind,
                    context_length=n,
                    length=len(target),
                    source=conv.source,
                    conversation_id=conv.id,
                    step_index=step_index,
                    reference=msg,
                    tools=conv.tools,
                    category=conv.category,
                    context_messages=context,
                    meta=_step_meta(conv.meta, step_index),
                    task=conv.task,
                )
            )
        return steps


def _step_meta(meta: dict, step_index: int) -> dict:
    """A chained conversation keeps each turn's gold extras in meta["per_step"]."""
    per_step = meta.get("per_step")
    if isinstance(per_step, list) and step_index < len(per_step):
        return {**{k: v for k, v in meta.items() if k != "per_step"}, **per_step[step_index]}
    return meta


def render_steps(
    conv: Conversation, tokenizer, max_length: int, *, dropped: Counter | None = None
) -> list[Step]:
    """Every assistant turn of `conv` as one Step (over-long steps dropped and counted in `dropped` by step type).

    Raises RenderError (a DataError) when the template cannot render the conversation consistently.
    """
    return StepRenderer(tokenizer, max_length).render(conv, dropped)


# -- generation prompts (inference: `engine`, `generate`) ----------------------------------------------------
class PromptRenderer:
    """OpenAI messages + tools -> prompt token ids, through the training data's own renderer."""

    def __init__(self, tokenizer):
        # max_length only matters for training steps; rendering a prompt never drops anything
        self._renderer = StepRenderer(tokenizer, max_length=1 << 30)
        self.tokenizer = tokenizer

    def text(self, messages: list[dict], tools: list[dict]) -> str:
        """The prompt text, ending with the assistant header (raises RenderError on template errors)."""
        return self._renderer._text(messages, tools, add_generation_prompt=True)

    def ids(self, text: str) -> list[int]:
        return self._renderer._ids(text)


def render_prompt(tokenizer, messages: list[dict], tools: list[dict] | None = None, prefix: str = "") -> list[int]:
    """Token ids of the generation prompt for `messages` (OpenAI form, structured tool calls) and `tools`.

    `prefix` is appended after the assistant header (the start of a forced tool call)."""
    r = PromptRenderer(tokenizer)
    return r.ids(r.text(messages, tools or []) + prefix)
