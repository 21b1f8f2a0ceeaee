"""Schema-constrained decoding: tool calls and JSON that cannot be malformed (xgrammar).

A grammar is built from what the caller offers and compiled against the model's tokenizer by xgrammar (the
library vLLM and SGLang use); at every decode step a `GrammarLogitsProcessor` sets the logits of the tokens the
grammar forbids to -inf, one matcher per batch row, so rows with different tool sets share a batch.

What the grammar allows (`tool_format`), in the chat template's own tool-call form: each call is
``<tool_call>\\n{"name": NAME, "arguments": ARGS}\\n</tool_call>``, the wrapper taken from
`layerroute.data.toolcalls.render_tool_call` (so the grammar and the parser read one definition), NAME one of
the offered functions and ARGS an object that follows that function's parameter schema (required keys, types,
enums; no keys the schema does not name); parallel calls are joined as `render_tool_calls` joins them. The
wrapper is matched as text, so a tokenizer that has ``<tool_call>`` as an added token may write it as that token
or as ordinary pieces. After the last call the end-of-turn token is the only choice.

* ``tool_choice="auto"``: free text, and any call it starts (at ``<tool_call>``) must be well formed.
* ``"required"``: one or more calls and nothing else; a named function (``{"type": "function", "function":
  {"name": ...}}``): calls of that function only.
* ``"none"``: free text that never opens a call.
* a JSON schema for the content (`response_format`): the content is one JSON value valid under it (with
  ``"auto"`` and tools: that value or calls).

BFCL's non-standard parameter types ("dict", "float", "tuple", "any", Java/JavaScript names) are mapped to JSON
Schema with the data pipeline's own table (`layerroute.tasks.bfcl.BFCL_TYPE_MAP`).

Under a token budget (`GrammarLogitsProcessor` ``budgets``, what the server and ``generate --constrain`` pass) a
row keeps to tokens after which the shortest completion still fits (the budget rule, `layerroute.infer.closer`): a
call or a JSON answer ends complete whenever the budget holds the shortest valid one; below that the budget cuts it.

Cost: compiling a tool set takes milliseconds to a few hundred (the token masks are precomputed per grammar),
cached per (tool set, choice) in an LRU keyed by the hash of its canonical JSON; a decode step then costs one
mask fill per constrained row (microseconds to a fraction of a millisecond on CPU) plus one masked fill of the
logits. Numbers: docs/results/constrained_decoding.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from typing import Any

import torch
from transformers import LogitsProcessor

from ..data.toolcalls import TOOL_CALL_OPEN, render_tool_call, render_tool_calls
from ..tasks.bfcl import BFCL_TYPE_MAP
from .closer import BudgetRule, Closer

log = logging.getLogger(__name__)

#: at most this many consecutive whitespace characters inside JSON: the chat template writes one-line
#: `json.dumps` text (one space after ':' and ','); unbounded whitespace would let a weak model pad forever
MAX_WHITESPACE = 1
CACHE_SIZE = 128  # compiled grammars kept per tokenizer (a BFCL eval has a few hundred distinct tool sets)
_CPP_PREFIX = re.compile(r"^\[[^\]]*\] \S+:\d+: ")
_ARGS = "@@layerroute-args@@"  # a placeholder rendered in place of the arguments to cut the wrapper around them


class GrammarError(ValueError):
    """A tool set, tool choice or schema that cannot be turned into a grammar (the message says why)."""


def _xgr():
    try:
        import xgrammar
    except ImportError as e:  # a declared dependency; say what to install if an environment lacks it
        raise ImportError("constrained decoding needs the xgrammar package: pip install xgrammar==0.2.9") from e
    return xgrammar


# -- schemas -------------------------------------------------------------------------------------------------
def json_schema(schema: Any) -> Any:
    """A parameter schema with BFCL's type names mapped to JSON Schema ("dict" -> "object", "float" ->
    "number", "tuple" -> "array", "any" -> no type) and BFCL's non-standard ``optional`` key dropped, at every
    depth. Standard JSON Schema passes through unchanged (unknown type names are left for xgrammar to judge)."""
    if isinstance(schema, list):
        return [json_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "optional":
            continue
        if key == "type":
            names = value if isinstance(value, list) else [value]
            mapped = [BFCL_TYPE_MAP.get(v, v) if isinstance(v, str) else v for v in names]
            if None in mapped:  # "any": no type constraint
                continue
            out["type"] = mapped if isinstance(value, list) else mapped[0]
        elif key in ("properties", "$defs", "definitions", "patternProperties") and isinstance(value, dict):
            out[key] = {name: json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "anyOf", "oneOf", "allOf", "prefixItems"):
            out[key] = json_schema(value)
        else:
            out[key] = value
    return out


def _functions(tools: list[dict]) -> list[dict]:
    out = []
    for i, t in enumerate(tools or []):
        fn = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise GrammarError(f"tools[{i}] has no function name")
        out.append(fn)
    return out


def call_wrapper(name: str) -> tuple[str, str]:
    """(text before the arguments, text after them) of one call of `name`, as `render_tool_call` writes it."""
    text = render_tool_call(name, _ARGS)  # type: ignore[arg-type] - any JSON value renders
    marker = json.dumps(_ARGS)
    if text.count(marker) != 1:
        raise GrammarError(f"function name {name!r} cannot be wrapped (it contains the arguments placeholder)")
    begin, end = text.split(marker)
    return begin, end


def call_separator() -> str:
    """What `render_tool_calls` writes between two calls of one turn."""
    one = render_tool_call("f", {})
    two = render_tool_calls([{"name": "f", "arguments": {}}] * 2)
    return two[len(one) : len(two) - len(one)]


def choice_name(tool_choice: Any) -> str:
    """'none' | 'auto' | 'required' | 'function' (a named function); GrammarError for anything else."""
    if tool_choice is None or tool_choice == "auto":
        return "auto"
    if tool_choice in ("none", "required"):
        return tool_choice
    if (isinstance(tool_choice, dict) and tool_choice.get("type") == "function"
            and isinstance(tool_choice.get("function"), dict) and isinstance(tool_choice["function"].get("name"), str)):
        return "function"
    raise GrammarError(f"tool_choice must be 'none', 'auto', 'required' or {{'type': 'function', 'function': "
                       f"{{'name': ...}}}}, got {tool_choice!r}")


def tool_format(tools: list[dict] | None, tool_choice: Any = "auto", *, parallel: bool = True,
                content_schema: dict | bool | None = None):
    """The xgrammar structural tag for one assistant turn, or None when nothing is constrained.

    content_schema: the JSON schema the text content must follow (a response_format), or None (free text)."""
    from xgrammar.structural_tag import (
        AnyTextFormat,
        JSONSchemaFormat,
        OrFormat,
        StructuralTag,
        TagFormat,
        TagsWithSeparatorFormat,
        TriggeredTagsFormat,
    )

    _xgr()
    kind = choice_name(tool_choice)
    functions = _functions(tools or [])
    if kind == "function":
        name = tool_choice["function"]["name"]
        functions = [f for f in functions if f["name"] == name]
        if not functions:
            raise GrammarError(f"tool_choice names function {name!r}, which is not among the tools")
    if kind in ("required", "function") and not functions:
        raise GrammarError(f"tool_choice {kind!r} needs at least one tool")

    def tag(fn: dict):
        begin, end = call_wrapper(fn["name"])
        params = fn.get("parameters")
        schema = json_schema(params) if params else {"type": "object", "properties": {}}
        return TagFormat(begin=begin, content=JSONSchemaFormat(json_schema=schema, max_whitespace_cnt=MAX_WHITESPACE),
                         end=end)

    content = None if content_schema is None else JSONSchemaFormat(json_schema=content_schema,
                                                                   max_whitespace_cnt=MAX_WHITESPACE)
    if kind in ("required", "function"):
        fmt = TagsWithSeparatorFormat(tags=[tag(f) for f in functions], separator=call_separator(),
                                      at_least_one=True, stop_after_first=not parallel)
    elif kind == "none" or not functions:
        fmt = content if content is not None else AnyTextFormat(excludes=[TOOL_CALL_OPEN]) if kind == "none" else None
        if fmt is None:  # auto without tools or a content schema: nothing to constrain
            return None
    elif content is not None:  # auto with a content schema: the JSON content or calls
        calls = TagsWithSeparatorFormat(tags=[tag(f) for f in functions], separator=call_separator(),
                                        at_least_one=True, stop_after_first=not parallel)
        fmt = OrFormat(elements=[content, calls])
    else:  # auto: free text; a call it opens must be well formed
        fmt = TriggeredTagsFormat(triggers=[TOOL_CALL_OPEN], tags=[tag(f) for f in functions],
                                  stop_after_first=not parallel)
    return StructuralTag(format=fmt)


def response_schema(response_format: Any) -> dict | bool | None:
    """The JSON schema an OpenAI `response_format` asks the content to follow (None: free text)."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise GrammarError(f"response_format must be an object, got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict | bool):
            raise GrammarError("response_format.json_schema must be an object with a 'schema' object")
        return spec.get("schema", True)
    raise GrammarError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")


# -- compilation (cached) ------------------------------------------------------------------------------------
class Grammars:
    """Compiles grammars for one tokenizer and keeps the last `CACHE_SIZE` of them (LRU).

    vocab_size: the width of the model's logits (may exceed the tokenizer's: padded embeddings); stop_ids: the
    end-of-turn tokens a finished grammar allows."""

    def __init__(self, tokenizer, vocab_size: int | None = None, stop_ids: list[int] | None = None):
        xgr = _xgr()
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=list(stop_ids) if stop_ids else None)
        self.tokenizer = tokenizer
        self._closer: Closer | None = None
        # one thread: the machine is shared; xgrammar's own cache is off (ours is keyed by the request's JSON)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self.vocab_size = self.info.vocab_size
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.compile_s = 0.0  # total time spent compiling (benchmarks report it apart from decoding)
        self.compiled = 0

    def _cached(self, key: Any, build):
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
        with self._lock:
            if digest in self._cache:
                self._cache.move_to_end(digest)
                return self._cache[digest]
        t0 = time.perf_counter()
        try:
            grammar = build()
        except GrammarError:
            raise
        except Exception as e:  # xgrammar raises RuntimeError/ValueError/pydantic errors: name the problem
            detail = _CPP_PREFIX.sub("", str(e).strip())  # "[19:05:20] /project/cpp/x.cc:5082: " says nothing
            raise GrammarError(f"the schema cannot be compiled into a grammar: {detail}") from None
        with self._lock:
            self.compile_s += time.perf_counter() - t0
            self.compiled += 1
            self._cache[digest] = grammar
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar

    @property
    def closer(self) -> Closer:
        """The shortest-completion search for this tokenizer (the budget rule's; built at first use)."""
        if self._closer is None:
            self._closer = Closer(self.info, self.tokenizer)
        return self._closer

    def for_tools(self, tools: list[dict] | None, tool_choice: Any = "auto", *, parallel: bool = True,
                  response_format: Any = None):
        """The compiled grammar for one turn (None when nothing is constrained). Raises GrammarError."""
        content = response_schema(response_format)
        key = {"tools": tools or [], "choice": tool_choice, "parallel": parallel, "content": content}

        def build():
            tag = tool_format(tools, tool_choice, parallel=parallel, content_schema=content)
            return None if tag is None else self.compiler.compile_structural_tag(tag)

        return self._cached(key, build)


_GRAMMARS: dict[tuple[int, int | None], tuple[Any, Grammars]] = {}
_GRAMMARS_LOCK = threading.Lock()


def grammars_for(tokenizer, vocab_size: int | None = None, stop_ids: list[int] | None = None) -> Grammars:
    """The `Grammars` of a tokenizer (built once per tokenizer, vocabulary width and stop tokens)."""
    key = (id(tokenizer), vocab_size, tuple(sorted(stop_ids or ())))
    with _GRAMMARS_LOCK:
        hit = _GRAMMARS.get(key)
        if hit is not None and hit[0] is tokenizer:  # the tokenizer is held, so its id is not reused
            return hit[1]
        g = Grammars(tokenizer, vocab_size, stop_ids)
        _GRAMMARS[key] = (tokenizer, g)
        return g


def model_grammars(rm, stop_ids: list[int] | None = None) -> Grammars:
    """`grammars_for` a routed model's tokenizer, the mask as wide as its logits."""
    if rm.tokenizer is None:
        raise GrammarError("constrained decoding needs a tokenizer on the model")
    return grammars_for(rm.tokenizer, int(rm.config.vocab_size), stop_ids)


# -- decoding ------------------------------------------------------------------------------------------------
class GrammarLogitsProcessor(LogitsProcessor):
    """Masks each row's logits to what its grammar allows next (one xgrammar matcher per row; a row whose
    grammar is None is left alone). Single use: one per generate() call.

    Works with any prompt length and with a cache that already holds part of the prompt: the first call marks
    where generation starts, later calls feed each row's new tokens to its matcher. A row whose matcher has
    accepted a stop token is done (generate() pads it). A token the matcher refuses (only possible if another
    processor overrode the mask) releases the row, logged, rather than failing the request.

    The budget rule (``budgets``: each row's ``max_new_tokens``, and ``closer``, `Grammars.closer`): each row keeps
    to tokens after which the shortest completion (`layerroute.infer.closer.Closer`) still fits in the tokens it has
    left, so it ends with a complete match whenever its budget holds the shortest one from the start; one
    `layerroute.infer.closer.BudgetRule` per row (its doc: greedy and sampled rows, below the minimum). ``sampled``:
    the rows are sampled, not greedy."""

    def __init__(self, grammars: list, stop_ids: list[int] | None = None, *, budgets: int | list[int] | None = None,
                 closer: Closer | None = None, sampled: bool = False):
        self.grammars = list(grammars)
        self.stop_ids = list(stop_ids) if stop_ids else None
        if budgets is not None and closer is None:
            raise ValueError("a budget rule needs the grammars' Closer (Grammars.closer)")
        self.budgets = budgets
        self.closer = closer
        self.sampled = sampled
        self.matchers: list | None = None
        self.start = 0
        self.fed = 0
        self.released: list[int] = []  # rows whose matcher refused a token
        self.steps = 0  # calls (decode steps)
        self.seconds = 0.0  # wall time spent in this processor (benchmarks: the constraint's cost per token)
        self.budget_seconds = 0.0  # of which the budget rule
        self.rules: list[BudgetRule | None] = []  # per row, under budgets (built at the first call)

    def _init(self, input_ids: torch.Tensor, vocab: int) -> None:
        xgr = _xgr()
        batch = input_ids.shape[0]
        if len(self.grammars) == 1 and batch > 1:
            self.grammars = self.grammars * batch
        if len(self.grammars) != batch:
            raise ValueError(f"{len(self.grammars)} grammars for a batch of {batch} rows")
        self.matchers = [None if g is None else xgr.GrammarMatcher(g, override_stop_tokens=self.stop_ids)
                         for g in self.grammars]
        widths = {g.tokenizer_info.vocab_size for g in self.grammars if g is not None}
        if any(w != vocab for w in widths):
            raise ValueError(f"grammar vocabulary {sorted(widths)} != logits width {vocab}: build the grammars with "
                             "the model's vocab_size")
        self.bitmask = xgr.allocate_token_bitmask(batch, vocab)
        self.batch = xgr.BatchGrammarMatcher(max_threads=1)
        self.start = input_ids.shape[1]
        budgets = self.budgets
        if budgets is not None and not isinstance(budgets, list):
            budgets = [budgets] * batch
        if budgets is not None and len(budgets) != batch:
            raise ValueError(f"{len(budgets)} budgets for a batch of {batch} rows")
        self.budgets = budgets
        self.rules = [None if budgets is None or m is None else BudgetRule(self.closer, budgets[i], self.stop_ids,
                                                                           sampled=self.sampled)
                      for i, m in enumerate(self.matchers)]

    @property
    def closed(self) -> int:
        """Steps where the rule narrowed a row's choice (a token that did not fit was masked), all rows."""
        return sum(r.closed for r in self.rules if r is not None)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        t0 = time.perf_counter()
        try:
            return self._mask(input_ids, scores)
        finally:
            self.seconds += time.perf_counter() - t0
            self.steps += 1

    def _mask(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        xgr = _xgr()
        if self.matchers is None:
            self._init(input_ids, scores.shape[-1])
        else:
            new = input_ids[:, self.start + self.fed :].tolist()
            self.fed += len(new[0]) if new else 0
            for row, tokens in enumerate(new):
                m = self.matchers[row]
                for tok in tokens:
                    if m is None or m.is_terminated():
                        break
                    if not m.accept_token(tok):
                        log.warning("row %d: the grammar refused token %d; the row is no longer constrained", row, tok)
                        self.released.append(row)
                        self.matchers[row] = m = None
                        break
                    if self.rules[row] is not None:
                        self.rules[row].advance(m, tok)
        rows = [i for i, m in enumerate(self.matchers) if m is not None and not m.is_terminated()]
        if not rows:
            return scores
        self.batch.batch_fill_next_token_bitmask([self.matchers[i] for i in rows], self.bitmask, indices=rows)
        mask = self.bitmask.to(scores.device, non_blocking=True) if scores.device.type != "cpu" else self.bitmask
        if scores.device.type in ("cpu", "cuda"):
            xgr.apply_token_bitmask_inplace(scores, mask, indices=rows)
        else:  # other devices (mps): the CPU kernel on a copy
            cpu = scores.cpu()
            xgr.apply_token_bitmask_inplace(cpu, self.bitmask, indices=rows)
            scores = cpu.to(scores.device)
        if self.budgets is not None:
            t0 = time.perf_counter()
            for row in rows:
                if self.rules[row] is not None:
                    self.rules[row].apply(self.matchers[row], scores[row], self.fed)
            self.budget_seconds += time.perf_counter() - t0
        return scores


def tool_call_processor(rm, tools_per_row: list, tool_choice: Any = "required", *, stop_ids: list[int] | None = None,
                        parallel: bool = True, budgets: int | list[int] | None = None,
                        sampled: bool = False) -> GrammarLogitsProcessor | None:
    """A processor constraining each row to calls of its own tools (`tools_per_row[i]`: OpenAI tool specs, or
    None = that row unconstrained); None when no row is constrained. budgets: each row's max_new_tokens, for the
    budget rule (see `GrammarLogitsProcessor`; sampled: the rows are sampled, not greedy); None = no rule."""
    grammars = model_grammars(rm, stop_ids)
    compiled = [None if tools is None else grammars.for_tools(tools, tool_choice, parallel=parallel)
                for tools in tools_per_row]
    if all(g is None for g in compiled):
        return None
    return GrammarLogitsProcessor(compiled, stop_ids, budgets=budgets,
                                  closer=None if budgets is None else grammars.closer, sampled=sampled)


__all__ = [
    "GrammarError", "GrammarLogitsProcessor", "Grammars", "MAX_WHITESPACE", "call_separator", "call_wrapper",
    "choice_name", "grammars_for", "json_schema", "model_grammars", "response_schema", "tool_call_processor",
    "tool_format",
]
