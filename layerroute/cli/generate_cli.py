"""`layerroute generate`: flags and entry point (routed generation for one prompt or a batch; the generation itself
is `layerroute.infer.generate`).

    layerroute generate --model smollm2-135m-instruct --prompt "What is 2+2?" --skip-fraction 0.25
"""

from __future__ import annotations

import argparse
import json

import torch

from ..infer.generate import load_for_inference, routed_generate, skip_pattern, stop_ids


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..config import (
        add_adapter_argument,
        add_chat_template_argument,
        add_device_argument,
        add_draft_arguments,
        add_dtype_argument,
        add_model_argument,
        add_threads_argument,
    )

    add_model_argument(parser)
    add_adapter_argument(parser)
    parser.add_argument("--prompt", action="append", required=True, help="user message (repeat for a batch)")
    parser.add_argument("--system", default=None, help="system message")
    parser.add_argument("--raw", action="store_true", help="do not apply the chat template")
    add_chat_template_argument(parser)
    parser.add_argument("--skip-fraction", type=float, default=None, help="force a pattern skipping this fraction")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kv-policy", default="exact", choices=["exact", "kv_preserving"])
    add_dtype_argument(parser)
    add_device_argument(parser)
    add_threads_argument(parser)
    parser.add_argument("--tools", default=None, help="JSON file: a list of OpenAI tool specs offered in the prompt")
    parser.add_argument("--tool-choice", default="auto",
                        help="with --constrain: auto, required, none, or a function name (that function only)")
    parser.add_argument("--constrain", action="store_true",
                        help="decode under the tools' grammar (xgrammar): calls parse and name offered functions")
    parser.add_argument("--no-parallel-calls", action="store_true", help="with --constrain: at most one call per turn")
    add_draft_arguments(parser)


def _read_tools(path: str) -> list[dict]:
    from ..errors import ConfigError

    try:
        with open(path, encoding="utf-8") as f:
            tools = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--tools {path}: {e}") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ConfigError(f"--tools {path}: expected a JSON list of tool specs")
    return [t if "function" in t else {"type": "function", "function": t} for t in tools]


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError

    if args.threads:
        torch.set_num_threads(args.threads)
    rm = load_for_inference(args.model, args.adapter, args.dtype, args.device, chat_template=args.chat_template)
    tok = rm.tokenizer
    if tok is None:
        raise ConfigError("this model has no tokenizer; use the Python API with token ids")
    tools = _read_tools(args.tools) if args.tools else []
    if args.constrain and not tools:
        raise ConfigError("--constrain needs --tools (the functions the grammar allows)")
    if args.raw:
        prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in args.prompt]
    else:
        from ..data.render import PromptRenderer

        renderer = PromptRenderer(tok)  # the training steps' renderer: the same prompt a step's context has
        prompts = []
        for p in args.prompt:
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
                {"role": "user", "content": p}
            ]
            # tools in the chat template (or, for a template without tools, its Hermes text convention)
            prompts.append(renderer.ids(renderer.text(messages, tools)))
    forced = skip_pattern(rm.num_layers, args.skip_fraction) if args.skip_fraction is not None else None
    processor = None
    if args.constrain:
        from ..infer.constrain import GrammarError, tool_call_processor

        choice = args.tool_choice if args.tool_choice in ("auto", "required", "none") else {
            "type": "function", "function": {"name": args.tool_choice}}
        try:
            # under the budget rule: a call ends complete whenever --max-new-tokens holds the shortest one
            processor = tool_call_processor(rm, [tools] * len(prompts), choice, parallel=not args.no_parallel_calls,
                                            stop_ids=stop_ids(rm), budgets=args.max_new_tokens, sampled=args.sample)
        except GrammarError as e:
            raise ConfigError(f"--tools {args.tools}: {e}") from None
    if args.draft:
        return _run_drafted(args, rm, prompts, tools, forced)
    if args.prompt_lookup and (len(prompts) > 1 or args.constrain or args.prompt_lookup < 0):
        raise ConfigError("--prompt-lookup K (K > 0) drafts for one --prompt at a time and not under --constrain")
    res = routed_generate(
        rm, prompts, max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
        top_p=args.top_p, forced=forced, kv_policy=args.kv_policy, seed=args.seed, logits_processor=processor,
        prompt_lookup=max(args.prompt_lookup, 0),
    )
    for row, toks in enumerate(res.tokens):
        gates = "".join("1" if g else "." for g in res.gates[row])
        print(f"--- [{row}] gates {gates} (skipped {res.skipped_fraction[row]:.0%})")
        print(tok.decode(toks, skip_special_tokens=True))
    summary = {k: v for k, v in res.to_dict().items() if k not in ("tokens", "gates")}
    print(json.dumps(summary))
    return 0


def _run_drafted(args, rm, prompts, tools, forced) -> int:
    """--draft: one greedy prompt through `layerroute.infer.verify` (under --constrain its grammar and budget rule:
    the tokens of --constrain without --draft)."""
    from ..errors import ConfigError
    from ..infer.verify import routed_draft_generate

    if len(prompts) > 1 or args.sample or args.prompt_lookup:
        raise ConfigError("--draft verifies greedy drafts for one --prompt (not with --sample or --prompt-lookup)")
    grammar = closer = None
    if args.constrain:
        from ..infer.constrain import GrammarError, model_grammars

        choice = args.tool_choice if args.tool_choice in ("auto", "required", "none") else {
            "type": "function", "function": {"name": args.tool_choice}}
        try:
            grammars = model_grammars(rm, stop_ids(rm))
            grammar = grammars.for_tools(tools, choice, parallel=not args.no_parallel_calls)
            closer = grammars.closer
        except GrammarError as e:
            raise ConfigError(f"--tools {args.tools}: {e}") from None
    res, gates = routed_draft_generate(rm, prompts[0], drafts=args.draft, max_new_tokens=args.max_new_tokens,
                                       grammar=grammar, closer=closer, forced=forced, kv_policy=args.kv_policy)
    skipped = gates.count(False) / len(gates) if gates else 0.0
    print(f"--- [0] gates {''.join('1' if g else '.' for g in gates)} (skipped {skipped:.0%})")
    print(rm.tokenizer.decode(res.tokens, skip_special_tokens=True))
    print(json.dumps({**res.to_dict(), "skipped_fraction": [skipped]}))
    return 0
