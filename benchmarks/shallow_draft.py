"""Would the routed shallow path pay as a drafter (issue 36, the fourth drafter)? A small measurement, not a drafter.

    OMP_NUM_THREADS=1 python benchmarks/shallow_draft.py --config configs/offline-smollm2.yaml \\
        --set model.dtype=float32 --from benchmarks/results/lossless_drafts_smollm2.json --steps 8 \\
        --output benchmarks/results/shallow_draft_smollm2.json

For the first --steps tool-call steps of a `lossless_drafts.py` result: the dense greedy output (under its grammar) is
teacher-forced through the shallow path (the `skip_pattern` of each --skip fraction, forced gates: the model with
those blocks removed) and the shallow path's greedy choice under the same grammar mask is compared with dense's token
at every position: the per-token acceptance `a` a shallow drafter would see. Its cost: the CPU time of a one-token
decode forward with the pattern against the dense one (`c`), and of a verification forward of k+1 tokens (`v(k)`,
measured). Self-speculation with draft length k then yields (1 - a^(k+1)) / (1 - a) tokens per round at a cost of
k*c + v(k) dense forwards (the best k is reported): it pays where that ratio exceeds 1. The last line is the JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from transformers import DynamicCache

from layerroute.config import LoraSettings, RunConfig, add_config_arguments, raw_config
from layerroute.data.build import load_steps
from layerroute.eval.bench import emit_json_line
from layerroute.infer.constrain import model_grammars
from layerroute.infer.generate import inference_weights, skip_pattern, stop_ids
from layerroute.nn.kv_cache import RoutedCache
from layerroute.nn.routed import routing


def forward_cost(model, rm, prompt, pattern, n: int, reps: int = 5) -> float:
    """Min CPU seconds of an n-token forward after `prompt` (the prompt prefilled once, outside the timing)."""
    best = float("inf")
    with routing(rm.model, "skip", decision_mask=torch.ones(1, len(prompt)), forced=pattern, kv_policy="kv_preserving"):
        cache = RoutedCache()
        model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        x = torch.tensor([prompt[-n:]])
        for _ in range(reps):
            t = time.process_time()
            model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=n)
            best = min(best, time.process_time() - t)
            cache.rewind(len(prompt))
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    parser.add_argument("--from", dest="source", required=True, help="a lossless_drafts.py result (dense outputs)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--skip", type=float, nargs="+", default=[0.125, 0.25])
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = RunConfig.from_dict(raw_config(args))
    from layerroute.adapters import build_routed_model

    rm = build_routed_model(cfg.model, lora_cfg=LoraSettings(enabled=False))
    rm.model.eval()
    src = json.loads(open(args.source, encoding="utf-8").read().strip().splitlines()[-1])
    dense_rows = [r for r in src["rows"]["dense"] if r["step_type"] == "tool_call"][: args.steps]
    by_key = {f"{s.conversation_id}#{s.step_index}": s for s in load_steps(cfg.data, rm.tokenizer).eval}
    eos = stop_ids(rm)
    grammars = model_grammars(rm, eos)
    import xgrammar as xgr

    out = {"skips": {}}
    with torch.no_grad(), inference_weights(rm) as model:
        first = list(by_key[dense_rows[0]["step"]].input_ids[: by_key[dense_rows[0]["step"]].context_length])
        dense_cost = {n: forward_cost(model, rm, first, "open", n) for n in (1, 2, 4, 8)}
        for frac in args.skip:
            pattern = skip_pattern(rm.num_layers, frac)
            agree = total = 0
            for row in dense_rows:
                step = by_key[row["step"]]
                prompt = list(step.input_ids[: step.context_length])
                target = row["output"]
                parallel = step.category is None or "parallel" in step.category
                matcher = xgr.GrammarMatcher(grammars.for_tools(step.tools, "required", parallel=parallel),
                                             override_stop_tokens=eos)
                mask = xgr.allocate_token_bitmask(len(target), grammars.vocab_size)
                for i, tok in enumerate(target):
                    matcher.fill_next_token_bitmask(mask, i)
                    matcher.accept_token(tok)
                decide = torch.cat([torch.ones(1, len(prompt)), torch.zeros(1, len(target) - 1)], dim=1)
                with routing(rm.model, "skip", decision_mask=decide, forced=pattern, kv_policy="kv_preserving"):
                    logits = model(input_ids=torch.tensor([prompt + target[:-1]]), past_key_values=DynamicCache(),
                                   use_cache=True, logits_to_keep=len(target)).logits[0].float()
                xgr.apply_token_bitmask_inplace(logits, mask)
                choice = logits.argmax(-1).tolist()
                agree += sum(int(a == b) for a, b in zip(choice, target, strict=True))
                total += len(target)
            a = agree / total
            c = forward_cost(model, rm, first, pattern, 1) / dense_cost[1]
            best = max(
                ((k, (1 - a ** (k + 1)) / (1 - a) / (k * c + dense_cost[min((2, 4, 8), key=lambda n: abs(n - k - 1))]
                                                   / dense_cost[1])) for k in range(1, 8)),
                key=lambda kv: kv[1])
            out["skips"][str(frac)] = {"blocks_skipped": pattern.count(False), "acceptance": a, "tokens": total,
                                       "shallow_forward_cost": c, "best_k": best[0], "tokens_per_dense_forward": best[1]}
            print(frac, out["skips"][str(frac)], flush=True)
    out.update(benchmark="shallow_draft", model=cfg.model.name, dtype=cfg.model.dtype, steps=len(dense_rows),
               machine=platform.processor() or platform.machine(), date=time.strftime("%Y-%m-%d"),
               dense_forward_cpu_s={str(n): v for n, v in dense_cost.items()}, config=args.config, overrides=args.overrides)
    emit_json_line(out, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
