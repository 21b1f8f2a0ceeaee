"""Tokens/s of one routed training step (routers + LoRA) vs plain peft LoRA training of the same model.

    PYTHONPATH=. python benchmarks/train_throughput.py [--model smollm2-135m-instruct] [--batch 4]
        [--context 320] [--target 96] [--reps 5] [--steps-per-rep 2]

Three training steps are timed on the same frozen weights, batch and sequence lengths, each with AdamW:

- ``routed``: what `layerroute train` runs: routed mix forward (every block runs, its output mixed by the hard
  gate), LM head only on target positions, soft_mean regulariser, backward through LoRA and routers.
- ``plain_lora_labels``: a peft LoRA model trained the usual way, `model(..., labels=labels).loss` (full logits).
- ``plain_lora_sliced``: the same peft model with the sliced LM loss: isolates what the routers cost.

Each rep times `--steps-per-rep` steps of every mode in turn (interleaved, so drift hits all alike), after one
warm-up step each; min and median seconds per step over reps. Tokens = batch x (context + target) real tokens.
Prints one JSON line last. Target: routed >= 0.95 x plain_lora_labels tokens/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def main() -> int:
    from layerroute.config import add_model_argument
    from layerroute.config.flags import OFFLINE_MODEL

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_argument(parser)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=320, help="context tokens per row (router reads these)")
    parser.add_argument("--target", type=int, default=96, help="target tokens per row (the loss is on these)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps-per-rep", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    args.model = args.model or OFFLINE_MODEL  # the packaged offline default
    if args.threads:
        torch.set_num_threads(args.threads)

    from peft import get_peft_model

    from layerroute.adapters import build_routed_model, peft_lora_config
    from layerroute.config import LoraSettings, ModelConfig, RouterConfig, TrainConfig
    from layerroute.model import load_base
    from layerroute.train import RoutedStepLoss, loss_parts, sliced_lm_loss

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_cfg = ModelConfig(name=args.model, device=str(device))
    lora_cfg = LoraSettings()
    torch.manual_seed(0)
    routed = build_routed_model(model_cfg, RouterConfig(), lora_cfg, loaded=load_base(model_cfg, tokenizer=False))
    torch.manual_seed(0)
    plain = get_peft_model(load_base(model_cfg, tokenizer=False).model, peft_lora_config(lora_cfg))
    routed.model.train()
    plain.train()

    B, C, T = args.batch, args.context, args.target
    gen = torch.Generator().manual_seed(0)
    vocab = routed.config.vocab_size
    ids = torch.randint(3, vocab, (B, C + T), generator=gen).to(device)
    attention = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :C] = -100
    decision = torch.zeros_like(ids)
    decision[:, :C] = 1
    is_tool = torch.tensor([i % 2 == 0 for i in range(B)], device=device)
    tokens = B * (C + T)
    tc = TrainConfig()
    step_module = RoutedStepLoss(routed.model)

    def make_opt(model):
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    opts = {"routed": make_opt(routed.model), "plain_lora_labels": make_opt(plain), "plain_lora_sliced": None}
    opts["plain_lora_sliced"] = opts["plain_lora_labels"]

    def routed_step():
        row_sum, _, prob, gate, _extras = step_module(ids, attention, labels, decision)  # extras: KD and oracle terms
        parts = loss_parts(tc, row_sum, prob, gate, is_tool, tokens_total=B * T, rows_total=B, micro_total=1)
        parts.total.backward()

    def plain_labels_step():
        plain(input_ids=ids, attention_mask=attention, labels=labels).loss.backward()

    def plain_sliced_step():
        row_sum, count = sliced_lm_loss(plain, ids, attention, labels)
        (row_sum.sum() / count.sum()).backward()

    modes = {"routed": routed_step, "plain_lora_labels": plain_labels_step, "plain_lora_sliced": plain_sliced_step}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def one(name):
        modes[name]()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)

    for name in modes:  # warm-up
        one(name)
    times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.reps):
        for name in modes:
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps_per_rep):
                one(name)
            sync()
            times[name].append((time.perf_counter() - t0) / args.steps_per_rep)

    out = {
        "benchmark": "train_throughput",
        "model": args.model,
        "dtype": routed.dtype,  # model.dtype auto: bfloat16 where native, else float32
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch": B,
        "context": C,
        "target": T,
        "tokens_per_step": tokens,
        "reps": args.reps,
        "steps_per_rep": args.steps_per_rep,
    }
    for name, ts in times.items():
        out[name] = {
            "s_per_step_min": round(min(ts), 4),
            "s_per_step_median": round(statistics.median(ts), 4),
            "tokens_per_s_median": round(tokens / statistics.median(ts), 1),
            "tokens_per_s_best": round(tokens / min(ts), 1),
        }
    med = {name: statistics.median(ts) for name, ts in times.items()}
    out["ratio_vs_plain_lora_labels"] = round(med["plain_lora_labels"] / med["routed"], 3)
    out["ratio_vs_plain_lora_sliced"] = round(med["plain_lora_sliced"] / med["routed"], 3)
    out["ratio_vs_plain_lora_labels_best"] = round(min(times["plain_lora_labels"]) / min(times["routed"]), 3)
    out["target_ratio"] = 0.95
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
