"""`model.chat_template`: a chat template for base models that ship none, and the one error for a missing one.

The setting takes a named preset (`chatml`), a path to a Jinja file, or the Jinja text itself (it contains
``{{`` or ``{%``), the way TRL's `setup_chat_format` and vLLM's ``--chat-template`` let a base model chat. It is
checked when the config is built (an unknown preset or a missing file names the key), put on the tokenizer by
`layerroute.model.load_base`, and saved into the adapter with the tokenizer (`layerroute.adapters`), so
every command that loads the adapter renders with the template the steps were trained on.

This module imports nothing heavy: `layerroute.config` validates the setting through it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import ConfigError

KEY = "model.chat_template"

#: ChatML as SmolLM2 and Qwen2.5 write it, with tools in the Hermes/Qwen2.5 form. It renders exactly what
#: `layerroute.data.render` writes for a template without tools (`hermes_text_messages` through plain ChatML):
#: the tools in the system turn (the system message, else "You are a helpful assistant."), each call as a
#: ``<tool_call>`` block, a run of tool results as one user turn of ``<tool_response>`` blocks. Without tools and
#: without a system message there is no system turn (no model-specific default prompt, as TRL's ChatML).
CHATML = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages and messages[0].role == 'system' %}{{- messages[0].content or '' }}"
    "{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages and messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + (messages[0].content or '') + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if message.content and message.content | trim %}{{- message.content | trim + '\\n' }}{%- endif %}"
    "{%- for call in message.tool_calls %}"
    "{%- if call.function is defined %}{%- set call = call.function %}{%- endif %}"
    "{%- if not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": ' + (call.name | tojson) + ', \"arguments\": ' }}"
    "{%- if call.arguments is string %}{{- call.arguments }}{%- else %}{{- (call.arguments or {}) | tojson }}"
    "{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user\\n' }}"
    "{%- else %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_response>\\n' + (message.content or '') + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + (message.content or '') + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

#: name -> (template, tokens the tokenizer must hold as single tokens for the template to mean anything)
PRESETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "chatml": (CHATML, ("<|im_start|>", "<|im_end|>")),
}

FIX = (f"set {KEY} to a preset ({', '.join(PRESETS)}) or a Jinja file: --set {KEY}=chatml (train, eval, data) "
       "or --chat-template chatml (generate, serve, bench, agent)")


class ChatTemplateMissing(ConfigError):
    """The tokenizer has no chat template and none was configured; `reason` matches the data report's key."""

    reason = "no_chat_template"

    def __init__(self, tokenizer_name: str):
        super().__init__(f"tokenizer {tokenizer_name!r} has no chat template: {FIX}")


def is_inline(value: str) -> bool:
    return "{{" in value or "{%" in value


def resolve(value: str, key: str = KEY) -> str:
    """The template text of a preset name, a Jinja file or inline Jinja; an unknown name names `key`."""
    if value in PRESETS:
        return PRESETS[value][0]
    if is_inline(value):
        return value
    path = Path(value).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{key}: cannot read {path}: {err}") from err
    raise ConfigError(f"{key}: {value!r} is neither a preset ({', '.join(PRESETS)}) nor an existing Jinja file")


def validate(value, key: str = KEY) -> None:
    """Config-time check: a non-empty string naming a preset or a readable file (or inline Jinja)."""
    if value is None:
        return
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key} must be a preset name ({', '.join(PRESETS)}) or a Jinja file path, got {value!r}")
    resolve(value, key)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def template_text(tokenizer) -> str | None:
    """The tokenizer's chat template text (the default one of several named templates), or None."""
    tmpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tmpl, dict):
        tmpl = tmpl.get("default") or next(iter(tmpl.values()), None)
    return tmpl or None


def require(tokenizer) -> str:
    """The tokenizer's chat template text, or the one error every command gives for a missing one."""
    text = template_text(tokenizer)
    if text is None:
        raise ChatTemplateMissing(str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__))
    return text


def apply(tokenizer, value: str, key: str = KEY) -> None:
    """Put the template named by `value` on `tokenizer` (replacing its own, as vLLM's --chat-template does).

    A preset whose turn markers are not single tokens of this tokenizer is refused: the end-of-turn token would
    never be generated (every step would be rejected as having no end-of-turn token)."""
    if value in PRESETS:
        vocab = tokenizer.get_vocab()
        missing = [t for t in PRESETS[value][1] if t not in vocab]
        if missing:
            raise ConfigError(
                f"{key}={value}: tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no token "
                f"{', '.join(missing)}; use a Jinja file written with this tokenizer's own turn markers"
            )
    tokenizer.chat_template = resolve(value, key)


__all__ = ["CHATML", "FIX", "KEY", "PRESETS", "ChatTemplateMissing", "apply", "digest", "require", "resolve",
           "template_text", "validate"]
