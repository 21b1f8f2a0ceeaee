"""`layerroute serve` / `python -m layerroute.serve`: flags and entry point."""

import argparse
import logging

from .admission import ADMISSIONS
from .app import create_app

log = logging.getLogger("layerroute.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..config import (
        add_adapter_argument,
        add_chat_template_argument,
        add_device_argument,
        add_draft_arguments,
        add_dtype_argument,
        add_model_argument,
    )

    add_model_argument(parser)
    add_adapter_argument(parser)
    add_chat_template_argument(parser)
    parser.add_argument("--served-model-name", default=None, help="the id clients send as `model` (default: --model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask")
    parser.add_argument("--default-max-tokens", type=int, default=512, help="max_tokens when a request gives none")
    parser.add_argument("--cache-sessions", type=int, default=16, help="conversations whose KV cache is kept (LRU)")
    parser.add_argument("--kv-policy", default="kv_preserving", choices=["kv_preserving", "exact"],
                        help="kv_preserving: reuse caches across requests; exact: re-prefill every request")
    parser.add_argument("--dense", action="store_true", help="serve the plain model (no routers): the baseline")
    parser.add_argument("--skip-fraction", type=float, default=None,
                        help="force a gate pattern skipping this fraction of blocks (speed tests without training)")
    parser.add_argument("--threshold", type=float, default=None, help="router threshold (default: the adapter's)")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="requests waiting or running beyond this get 429 with Retry-After")
    parser.add_argument("--max-batch", type=int, default=8,
                        help="requests decoded together (continuous batching); 1 = one request at a time. With "
                             "--dtype bfloat16 on a CPU with native bf16 a batch of 8 decodes at about the cost of one "
                             "(3.8x the tokens/s at 8 clients, against 2.6x in float32, SmolLM2); outputs differ from "
                             "float32 by bf16 rounding")
    parser.add_argument("--schedule", default="fcfs", choices=list(ADMISSIONS),
                        help="which waiting request joins the batch: the oldest, or (pattern) the one whose skip "
                             "pattern adds the fewest blocks to the batch's (prefilled ahead; bounded by --max-wait)")
    parser.add_argument("--max-wait", type=float, default=2.0, metavar="S",
                        help="pattern schedule: a request waiting this long joins first (no starvation)")
    parser.add_argument("--prefill-thread", action=argparse.BooleanOptionalAction, default=True,
                        help="prefill newcomers on a second thread (its own module tree, shared weights) while the "
                             "batch decodes, so a prefill stops stalling the running rows (default on; SmolLM2 bf16 "
                             "on 2 CPU cores, 8 clients: 1.16-1.22x the tokens/s, median latency -19 to -26%%; "
                             "fastest with OMP_NUM_THREADS at half the cores; measured on CPU only)")
    add_draft_arguments(parser)
    parser.add_argument("--no-constrain", action="store_true",
                        help="decode freely: no grammar for tool calls or response_format (malformed calls possible)")
    add_dtype_argument(parser)
    add_device_argument(parser)
    parser.add_argument("--log-level", default="info")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..errors import ConfigError
    from ..infer.generate import load_for_inference, skip_pattern
    from ..model import resolve_dtype

    if args.dense and args.skip_fraction is not None:
        raise ConfigError("--dense and --skip-fraction exclude each other")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    dtype = resolve_dtype(args.dtype, args.device)
    rm = load_for_inference(args.model, args.adapter, dtype, args.device, chat_template=args.chat_template)
    if rm.tokenizer is None:
        raise ConfigError("this model has no tokenizer; serving needs one")
    forced = skip_pattern(rm.num_layers, args.skip_fraction) if args.skip_fraction is not None else None
    name = args.served_model_name or args.model or rm.identity.get("name") or "layerroute"
    app = create_app(rm, model_name=name, max_tokens_limit=args.max_tokens_limit,
                     default_max_tokens=args.default_max_tokens, cache_sessions=args.cache_sessions,
                     kv_policy=args.kv_policy, dense=args.dense, forced=forced, threshold=args.threshold,
                     max_queue=args.max_queue, constrained=not args.no_constrain, prompt_lookup=args.prompt_lookup,
                     drafts=args.draft, max_batch=args.max_batch, schedule=args.schedule, max_wait_s=args.max_wait,
                     prefill_thread=args.prefill_thread)
    log.info("serving %r on http://%s:%d/v1 (%s, %s)", name, args.host, args.port,
             "dense" if args.dense else f"routed, {args.kv_policy}", dtype)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
