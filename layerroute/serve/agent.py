"""A small agent loop over the OpenAI API: BFCL multi-turn tasks against a layerroute server.

    layerroute agent --task bfcl-multi-turn --base-url http://127.0.0.1:8000/v1 --served-model NAME --limit 3
    layerroute agent --task bfcl-multi-turn --spawn --model smollm2-135m-instruct --limit 3   # server in-process
    layerroute agent --spawn --model smollm2-135m-instruct --draft grammar,lookup,suffix --limit 3  # with drafts

For each task of ``BFCL_v4_multi_turn_base.json`` (bfcl-eval's data, read from the installed package): the
tools are the function docs of the task's classes (``multi_turn_func_doc/*.json``, converted exactly as the
training data converts BFCL specs); each user turn is sent with the official ``openai`` client; every tool call
the model makes is executed on the package's own Python implementations of those classes
(``bfcl_eval/eval_checker/multi_turn_eval/func_source_code``), loaded with the task's initial state, and the
result is sent back as a ``tool`` message, until the model answers in text or ``--max-steps`` steps pass.

Calls are executed by looking the method up on the instance and passing the parsed JSON arguments as keyword
arguments; model output is never ``eval``-ed (BFCL's own executor evals call strings). The ground-truth calls
(``possible_answer``) are parsed with ``ast`` (literal arguments only) and executed the same way on a second set
of instances.

Success is BFCL's multi-turn check, with its own ``state_checker`` and ``response_checker``: after every turn
the model's instances must equal the ground truth's (public attributes), and the ground truth's execution
results for the turn must all appear among the model's results so far; a turn whose ground truth has calls
must see at least one call. A task succeeds when every turn does. A cheaper diagnostic, the per-turn match of
call names (as multisets), is reported beside it. Routing is reported per step from the server's
``layerroute`` extension.

Drafts: ``--spawn --draft grammar,lookup,suffix`` (the shared flag of ``generate`` and ``serve``, with
``--prompt-lookup``; rejected without ``--spawn``, since a running server drafts as it was started) decodes every
greedy request of the in-process server with those lossless drafters (`layerroute.infer.drafts`; the suffix drafter
reads the server's earlier requests under the same tools). Each step then records the response's draft statistics
(forwards, generated tokens, per drafter the tokens drafted and accepted) and `summarize` reports tokens per forward
and accepted draft tokens per decode forward by drafter, per step type (`draft_summary` says what the ratios count).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter

from ..atomic import write_text_atomic
from ..errors import ConfigError
from ..tasks.bfcl_multi_turn import (  # noqa: F401 - the BFCL multi-turn tasks and backend, re-exported
    CATEGORY_FILE,
    CLASSES,
    STATELESS,
    Backend,
    Task,
    bfcl_checkers,
    load_tasks,
    parse_call_string,
)

TASKS = ("bfcl-multi-turn",)


# -- the loop ------------------------------------------------------------------------------------------------
def run_task(client, model: str, task: Task, *, max_steps: int, max_tokens: int, temperature: float,
             checkers, log=print, tool_choice: str = "auto", parallel_tool_calls: bool = True) -> dict:
    model_env, truth_env = Backend(task), Backend(task)
    messages: list[dict] = []
    steps: list[dict] = []
    turns: list[dict] = []
    all_results: list[str] = []
    failed_turn = None
    for t, user_msgs in enumerate(task.turns):
        messages.extend(user_msgs)
        turn_calls: list[dict] = []
        error = None
        for s in range(max_steps):
            start = time.perf_counter()
            try:
                resp = client.chat.completions.create(model=model, messages=messages, tools=task.tools,
                                                      max_tokens=max_tokens, temperature=temperature,
                                                      tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls)
            except Exception as e:  # noqa: BLE001 - e.g. the conversation outgrew the context: the task fails
                error = f"{type(e).__name__}: {e}"
                log(f"  {task.id} turn {t} step {s}: request failed: {error[:200]}")
                break
            latency = time.perf_counter() - start
            choice = resp.choices[0]
            ext = (resp.model_extra or {}).get("layerroute", {})
            calls = choice.message.tool_calls or []
            drafts = ext.get("drafts")  # present when the server decoded the request with lossless drafts
            steps.append({
                "task": task.id, "turn": t, "step": s, "finish_reason": choice.finish_reason,
                "calls": [c.function.name for c in calls], "parsed_tool_call": ext.get("parsed_tool_call"),
                "arguments": [c.function.arguments for c in calls],
                "content": (choice.message.content or "")[:300],
                "gate_pattern": ext.get("gate_pattern"), "blocks_skipped": ext.get("blocks_skipped"),
                "block_flops_skipped": ext.get("block_flops_skipped"),
                "total_flops_skipped": ext.get("total_flops_skipped"),
                "cache_reused": ext.get("cache", {}).get("reused"),
                "prefilled_tokens": ext.get("cache", {}).get("prefilled_tokens"),
                "prompt_tokens": resp.usage.prompt_tokens, "completion_tokens": resp.usage.completion_tokens,
                "forwards": ext.get("timings", {}).get("forwards"), "drafts": _draft_record(drafts),
                "latency_s": latency,
            })
            log(f"  {task.id} turn {t} step {s}: {ext.get('gate_pattern')} "
                f"{'calls ' + ', '.join(steps[-1]['calls']) if calls else 'text'} "
                f"(prompt {resp.usage.prompt_tokens}, prefilled {steps[-1]['prefilled_tokens']}, {latency:.1f} s)")
            messages.append(choice.message.model_dump(exclude_none=True, exclude={"refusal", "annotations", "audio",
                                                                                    "function_call"}))
            if not calls:
                break
            for c in calls:
                try:
                    args = json.loads(c.function.arguments or "{}")
                except json.JSONDecodeError:
                    args = None
                if isinstance(args, dict):
                    result = model_env.call(c.function.name, kwargs=args)
                else:
                    result = "Error during execution: arguments are not a JSON object"
                all_results.append(result)
                turn_calls.append({"name": c.function.name, "arguments": args})
                messages.append({"role": "tool", "tool_call_id": c.id, "content": result})
        # ground truth for the turn, on its own instances
        truth_results = []
        for call in task.ground_truth[t]:
            name, args, kwargs = parse_call_string(call)
            truth_results.append(truth_env.call(name, args, kwargs))
        truth_names = Counter(parse_call_string(c)[0] for c in task.ground_truth[t])
        verdict = _turn_verdict(t, task, turn_calls, all_results, truth_results, model_env, truth_env, checkers)
        turns.append({"turn": t, "valid": verdict["valid"], "error_type": verdict.get("error_type"),
                      "calls": [c["name"] for c in turn_calls], "expected": task.ground_truth[t],
                      "names_match": Counter(c["name"] for c in turn_calls) == truth_names, "request_error": error})
        if not verdict["valid"] and failed_turn is None:
            failed_turn = t
        if error is not None:
            break
    return {"id": task.id, "success": failed_turn is None and len(turns) == len(task.turns),
            "failed_turn": failed_turn, "turns": turns, "steps": steps}


def _turn_verdict(t, task, turn_calls, all_results, truth_results, model_env, truth_env, checkers) -> dict:
    if task.ground_truth[t] and not turn_calls:
        return {"valid": False, "error_type": "multi_turn:empty_turn_model_response"}
    if not task.ground_truth[t]:
        return {"valid": True}
    if checkers is None:  # no BFCL checker: the call names must match
        truth = Counter(parse_call_string(c)[0] for c in task.ground_truth[t])
        ok = Counter(c["name"] for c in turn_calls) == truth
        return {"valid": ok, "error_type": None if ok else "call_names_mismatch"}
    state_checker, response_checker = checkers
    state = state_checker(model_env.instances, truth_env.instances)
    if not state["valid"]:
        return {"valid": False, "error_type": state.get("error_type")}
    response = response_checker(all_results, truth_results, t)
    return {"valid": response["valid"], "error_type": response.get("error_type")}


def _draft_record(drafts: dict | None) -> dict | None:
    """A step's draft statistics from the response's ``layerroute.drafts`` (`Server.extension`): the server's
    forwards and generated tokens, and per drafter the draft tokens verified and accepted; None without drafts."""
    if not drafts:
        return None
    return {"forwards": drafts.get("forwards"), "tokens": drafts.get("tokens"),
            "by_source": {s: {"drafted": int(d.get("drafted", 0)), "accepted": int(d.get("accepted", 0))}
                          for s, d in sorted(drafts.items()) if isinstance(d, dict)}}


def draft_summary(steps: list[dict]) -> dict | None:
    """Tokens per forward and accepted draft tokens per decode forward by drafter, over the steps the server decoded
    with lossless drafts (`layerroute.infer.verify.tally_drafts` says what each ratio counts); None when it drafted
    none. Forwards and tokens are the server's: the prefill's forward and the end-of-turn token included (usage's
    completion_tokens leaves the latter out)."""
    from ..infer.verify import tally_drafts

    sel = [s["drafts"] for s in steps if s.get("drafts") and s["drafts"].get("forwards")]
    return tally_drafts(sel) if sel else None


def summarize(results: list[dict], checker: str) -> dict:
    steps = [s for r in results for s in r["steps"]]
    turns = [t for r in results for t in r["turns"]]

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return statistics.fmean(xs) if xs else None

    by_type = {}
    for kind, flag in (("tool_call", True), ("text", False)):
        sel = [s for s in steps if bool(s["parsed_tool_call"]) == flag]
        by_type[kind] = {
            "steps": len(sel),
            "blocks_skipped_mean": mean([len(s["blocks_skipped"]) for s in sel if s["blocks_skipped"] is not None]),
            "block_flops_skipped_mean": mean([s["block_flops_skipped"] for s in sel]),
            "total_flops_skipped_mean": mean([s["total_flops_skipped"] for s in sel]),
            "drafts": draft_summary(sel),
        }
    return {
        "task": "bfcl-multi-turn", "checker": checker, "tasks": len(results),
        "success_rate": mean([float(r["success"]) for r in results]),
        "turn_accuracy": mean([float(t["valid"]) for t in turns]),
        "turn_call_names_match": mean([float(t["names_match"]) for t in turns]),
        "steps": len(steps), "steps_per_type": by_type,
        "cache_reuse_rate": mean([float(bool(s["cache_reused"])) for s in steps]),
        "prefilled_over_prompt": (sum(s["prefilled_tokens"] or 0 for s in steps)
                                  / max(1, sum(s["prompt_tokens"] for s in steps))),
        "latency_s_median": statistics.median([s["latency_s"] for s in steps]) if steps else None,
        "drafts": draft_summary(steps),  # tokens per forward with lossless drafts (`draft_summary`); None: none
    }


# -- CLI -----------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..config import (
        add_adapter_argument,
        add_chat_template_argument,
        add_draft_arguments,
        add_dtype_argument,
        add_model_argument,
        add_output_argument,
    )

    parser.add_argument("--task", default="bfcl-multi-turn", choices=TASKS)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="a running layerroute server")
    parser.add_argument("--served-model", default=None, help="`model` to send (default: the server's first model)")
    parser.add_argument("--spawn", action="store_true", help="start a server in-process on a free loopback port")
    spawn = parser.add_argument_group("--spawn", "the server started in-process: what it loads and how it serves")
    add_model_argument(spawn)
    add_adapter_argument(spawn)
    add_chat_template_argument(spawn)
    add_dtype_argument(spawn)
    spawn.add_argument("--dense", action="store_true", help="--spawn: serve the plain model")
    spawn.add_argument("--skip-fraction", type=float, default=None, help="--spawn: force a skip pattern")
    spawn.add_argument("--no-constrain", action="store_true",
                        help="--spawn: decode freely (by default tool calls follow the tools' schemas: xgrammar)")
    add_draft_arguments(spawn)  # --spawn only: the in-process server's drafts (a running server has its own)
    parser.add_argument("--tool-choice", default="auto", choices=["auto", "required"],
                        help="tool_choice sent with every request (required: every step is a call)")
    parser.add_argument("--no-parallel-calls", action="store_true",
                        help="parallel_tool_calls=false: one call per step (a constrained small model may otherwise "
                             "repeat its call until max_tokens)")
    parser.add_argument("--limit", type=int, default=3, help="number of tasks (from the start of the file)")
    parser.add_argument("--ids", nargs="*", default=None, help="task ids instead of --limit")
    parser.add_argument("--max-steps", type=int, default=4, help="model requests per user turn at most")
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--temperature", type=float, default=0.0)
    add_output_argument(parser)  # the full results: summary and every task


def run(args: argparse.Namespace) -> int:
    import openai

    if not args.spawn:
        for flag, value in (("--draft", args.draft), ("--prompt-lookup", args.prompt_lookup)):
            if value:
                raise ConfigError(f"{flag} sets the drafts of the server started with --spawn; a running server "
                                  f"(--base-url) drafts as it was started (`layerroute serve {flag} ...`)")
    tasks = load_tasks(args.limit, args.ids)
    checkers = bfcl_checkers()
    server = dtype = None
    base_url = args.base_url
    if args.spawn:
        from ..infer.generate import load_for_inference, skip_pattern
        from .app import create_app
        from .background import BackgroundServer

        if args.dense and args.skip_fraction is not None:
            raise ConfigError("--dense and --skip-fraction exclude each other")
        rm = load_for_inference(args.model, args.adapter, args.dtype, chat_template=args.chat_template)
        dtype = rm.dtype
        forced = skip_pattern(rm.num_layers, args.skip_fraction) if args.skip_fraction is not None else None
        app = create_app(rm, model_name=args.model or rm.identity.get("name") or "layerroute", dense=args.dense,
                         forced=forced, max_tokens_limit=max(args.max_tokens, 4096), constrained=not args.no_constrain,
                         prompt_lookup=args.prompt_lookup, drafts=args.draft)
        server = BackgroundServer(app).start()
        base_url = server.base_url
    try:
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=900)
        model = args.served_model or client.models.list().data[0].id
        print(f"agent: {len(tasks)} BFCL multi-turn tasks against {model} at {base_url} "
              f"(checker: {'bfcl state+response' if checkers else 'call names'})", file=sys.stderr)
        results = []
        for task in tasks:
            res = run_task(client, model, task, max_steps=args.max_steps, max_tokens=args.max_tokens,
                           temperature=args.temperature, checkers=checkers, tool_choice=args.tool_choice,
                           parallel_tool_calls=not args.no_parallel_calls,
                           log=lambda m: print(m, file=sys.stderr))
            print(f"{task.id}: {'success' if res['success'] else 'fail at turn ' + str(res['failed_turn'])}",
                  file=sys.stderr)
            results.append(res)
    finally:
        if server is not None:
            server.stop()
    summary = summarize(results, "bfcl_state_response" if checkers else "call_names")
    summary["model"] = model
    if dtype is not None:  # --spawn: the dtype the in-process server ran in, and its drafts
        summary["dtype"] = dtype
        summary["draft"] = args.draft
        summary["prompt_lookup"] = args.prompt_lookup
    if args.output:
        write_text_atomic(args.output, json.dumps({"summary": summary, "tasks": results}, indent=2, default=str))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="layerroute agent", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
