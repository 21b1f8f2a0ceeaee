"""Train routers + LoRA on agent steps: one loop on `accelerate` (CPU, one GPU, or DDP under `accelerate launch`).

    layerroute train --config configs/offline-smollm2.yaml --output-dir runs/offline [--set train.lr=1e-3] [--resume]

Phases (torchtune/litgpt style):

- ``setup``: config -> seeds -> base model + routers + LoRA -> step data -> optimizer/schedule -> (resume).
- ``fit``: the optimisation loop. Loss = LM loss on the step's own target tokens (teacher forced)
  + lambda x gate regulariser (+ bce router loss). Checkpoints every N steps; a non-finite loss stops the run.
- ``validate``: teacher-forced loss and run rates per step type on a small, fixed eval subset.

The output directory holds ``metrics.jsonl`` (one record per logging step), ``checkpoints/step-NNNNNN/``
(resumable: trainable tensors, optimizer and schedule, RNG of every process, data position) and, at the end,
``adapter/`` (the adapter directory of `layerroute.adapters`, with the training metadata in layerroute.json).

Speed: the LM head (vocabulary projection: 49k x 576 for SmolLM2, 152k x 896 for Qwen2.5) is applied only to the
positions whose next token is a target (`sliced_lm_loss`), not to the whole context; batches are grouped by
length so padding stays small.

Determinism: the data order of every epoch is a function of (train.seed, epoch), each optimizer step consumes a
fixed set of micro-batches, and checkpoints carry every process's RNG state (LoRA dropout), so a run resumed from
a checkpoint ends with bit-identical parameters to an uninterrupted one (on the same hardware and process count).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import re
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import write_text_atomic
from .config import GREEDY_ORACLES, STATIC_ORACLES, RunConfig, TrainConfig
from .errors import ConfigError, TrainingError
from .influence import (
    RowInfluence,
    block_influence,
    drop_costs,
    greedy_drop_targets,
    influence_targets,
    oracle_skip_targets,
)
from .losses import IGNORE_INDEX, distillation_kl, per_row_sum, sliced_lm_loss, target_logits

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.json"
STEP_TYPES = ("tool_call", "planning")
# Train settings that may change between an interrupted run and its resumption (they do not change the result).
RESUME_MAY_CHANGE = {
    "train.log_every", "train.eval_every", "train.eval_examples", "train.checkpoint_every", "train.keep_checkpoints",
    "train.progress", "train.output_dir", "data.progress", "model.device",
}


# ------------------------------------------------------------------------------------------------------------
# Losses


class RoutedStepLoss(nn.Module):
    """One forward of the routed model in `mix` mode -> per-row NLL sums and every block's gate.

    A module of its own so that DDP (accelerate's `prepare`) wraps the whole forward, gates included.
    Returns row_sum [B], row_count [B], prob [L, B] (sigmoid, with gradient), gate [L, B] (hard, straight-through).
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig | None = None):
        super().__init__()
        self.model = model
        self.cfg = cfg or TrainConfig()
        # [2, L] run targets of planning (row 0) and tool-call (row 1) steps when they are static (drop_nll, drop_errors)
        self.static_targets: torch.Tensor | None = None

    def drop_mask(self, batch: int, num_layers: int, is_tool_call: torch.Tensor | None, device) -> torch.Tensor | None:
        """[B, L] keep-mask for LayerSkip-style block dropping: block l is dropped with probability
        rate * l / (L - 1) (never the first block, most often the last), only while training."""
        rate = self.cfg.block_drop_rate
        if rate <= 0 or not self.training:
            return None
        depth = torch.linspace(0, 1, num_layers, device=device)  # [L]
        keep = torch.rand(batch, num_layers, device=device) >= rate * depth  # [B, L]; global RNG: resumable
        if self.cfg.block_drop_on == "tool_call" and is_tool_call is not None:
            keep |= ~is_tool_call.to(device).bool().unsqueeze(1)  # planning rows keep every block
        return keep

    def forward(self, input_ids, attention_mask, labels, decision_mask, is_tool_call=None):
        from .routed import gate_records, routing, routing_state

        distill = self.cfg.distill_weight > 0 and self.training
        keep = self.drop_mask(input_ids.shape[0], routing_state(self.model).num_layers, is_tool_call,
                              input_ids.device)
        influence = self.cfg.router_loss == "influence" and self.training
        per_step = influence and self.static_targets is None  # targets measured in this forward (oracle_source)
        probe = RowInfluence(self.model, attention_mask) if per_step else nullcontext()
        with probe, routing(self.model, "mix", decision_mask=decision_mask, keep=keep,
                            straight_through=self.cfg.router_lm_grad, prompt_full_depth=self.cfg.prompt_full_depth):
            row_sum, row_count, logits, rows = sliced_lm_loss(
                self.model, input_ids, attention_mask, labels, return_logits=True
            )
            records = gate_records(self.model)
        prob = torch.stack([r.prob for r in records])  # [L, B]
        gate = torch.stack([r.gate for r in records]).to(prob.dtype)  # [L, B]
        kl_row = row_sum.new_zeros(row_sum.shape)
        if distill:
            # Self-distillation: the teacher is the same weights at full depth (all gates open), no gradient.
            # Costs one more forward per micro-batch (no backward).
            with torch.no_grad(), routing(self.model, "mix", forced="open"):
                teacher, _, _ = target_logits(self.model, input_ids, attention_mask, labels)
            kl = distillation_kl(logits, teacher, self.cfg.distill_temperature)  # [N]
            kl_row = per_row_sum(kl, rows, row_sum.shape[0])
        oracle_target = None
        if self.cfg.router_loss == "oracle" and self.training:
            # Oracle-guided router targets, first order: skipping block l moves its gate 1 -> 0, so the row's NLL
            # changes by about -dNLL/dg_l. A block whose estimated cost is below epsilon is a skip target.
            # Costs one extra backward pass to the gates (autograd.grad), about +60% of a step.
            per_row = row_sum / row_count.clamp_min(1)  # [B] mean NLL per step
            grads = torch.autograd.grad(per_row.sum(), [r.gate for r in records], retain_graph=True, allow_unused=True)
            cost = torch.stack([-g if g is not None else torch.zeros_like(per_row) for g in grads])  # [L, B]
            oracle_target = (cost.detach() > self.cfg.oracle_epsilon).to(prob.dtype)  # 1 = run
        if per_step:
            # Influence-oracle targets: in each row, the blocks whose own output changes the hidden state least
            # (ShortGPT's 1 - cos, measured at the block's actual input in this very forward) are skip targets,
            # as many as the step type's fraction says. Free: a cosine per block, no extra pass.
            frac = torch.where(is_tool_call.to(prob.device).bool(), self.cfg.oracle_skip_tool,
                               self.cfg.oracle_skip_planning)
            n_skip = (frac * prob.shape[0]).round().long()  # [B]
            oracle_target = influence_targets(probe.value.to(prob.device), n_skip).to(prob.dtype)
        elif influence:  # static per-type targets (drop_*), measured once in Trainer.setup
            rows_type = is_tool_call.to(prob.device).long()  # [B]: 0 planning, 1 tool call
            oracle_target = self.static_targets.to(prob.device, prob.dtype)[rows_type].T  # [L, B]
        return row_sum, row_count, prob, gate, {"kl_row": kl_row, "oracle_target": oracle_target}


@contextmanager
def without_dropout(model: nn.Module):
    """eval() for a measurement taken mid-setup (no LoRA dropout), then the previous train/eval mode back."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


INFLUENCE_STEPS = 16  # training steps that measure block influence for router.init_bias_spread


def spread_router_biases(rm, steps, router_cfg, tc, pad_id: int) -> list[float]:
    """Initial router biases ordered by block influence (ShortGPT: 1 - cos(h_in, h_out), full depth): the least
    influential block gets init_bias, the most influential init_bias + spread, linear in rank. A uniform
    penalty then closes the cheapest blocks first instead of whichever the first noisy gradients pick
    (measured: random blocks at an equal count cost 100x the perplexity of ShortGPT's choice)."""
    from .config import EvalConfig

    with without_dropout(rm.model):
        influence = block_influence(rm, steps, EvalConfig(batch_size=tc.batch_size, seed=tc.seed), pad_id,
                                    progress=tc.progress)
    ranks = np.argsort(np.argsort(influence))  # 0 = least influential
    L = len(influence)
    with torch.no_grad():
        for router, rank in zip(rm.routers(), ranks, strict=True):
            router.output_bias.fill_(router_cfg.init_bias + router_cfg.init_bias_spread * rank / max(L - 1, 1))
    return influence


def clip_gradients(accelerator, groups: list[list[torch.Tensor]], max_norm: float, *, per_group: bool) -> float:
    """Clip gradients jointly (one global norm) or per parameter group; returns the global norm before clipping.

    Per group: once gates close, the routers' straight-through gradient reaches norms of 40-250 against LoRA's
    5-8 (measured on a trained offline adapter), and one global clip then scales LoRA's step down 10-50x exactly
    when it has skipped blocks to compensate for.
    """
    if per_group:
        norms = [accelerator.clip_grad_norm_(params, max_norm) for params in groups if params]
        return math.sqrt(sum(float(n) ** 2 for n in norms if n is not None))
    norm = accelerator.clip_grad_norm_([p for params in groups for p in params], max_norm)
    return float(norm) if norm is not None else 0.0


@dataclass
class LossParts:
    """The terms of one micro-batch's loss, each already divided by its optimizer-step-wide denominator."""

    lm: torch.Tensor
    reg: torch.Tensor
    bce: torch.Tensor
    distill: torch.Tensor
    total: torch.Tensor


def loss_parts(
    cfg: TrainConfig,
    row_sum: torch.Tensor,
    prob: torch.Tensor,
    gate: torch.Tensor,
    is_tool_call: torch.Tensor,
    *,
    kl_row: torch.Tensor | None = None,
    oracle_target: torch.Tensor | None = None,
    tokens_total: int,
    rows_total: int,
    micro_total: int,
) -> LossParts:
    """The loss of one micro-batch as its share of the whole optimizer step's loss.

    The denominators span every micro-batch of the step on every process, so that summing the parts over the
    step gives the token-mean LM loss and the row-mean regulariser, however the rows were split into micro-batches
    and processes.
    """
    zero = row_sum.new_zeros(())
    lm = row_sum.sum() / max(tokens_total, 1)
    kind = cfg.regularizer
    reg_term = None  # lambda x reg when lambda differs per row
    if kind in ("soft_mean", "hard_ste"):
        # soft_mean (the paper's) penalises the mean sigmoid prob; hard_ste the hard decision with the sigmoid's
        # gradient (straight-through). The gradients are identical (d gate / d prob = 1): only the logged value
        # differs. Measured: the two train bit-identical adapters (tests/test_train.py, RESULTS.md).
        per_row = (prob if kind == "soft_mean" else gate).mean(dim=0)  # [B] run-rate of each row
        reg = per_row.sum() / rows_total
        if cfg.reg_weight_planning is not None:
            lam = torch.where(is_tool_call.to(per_row.device).bool(), cfg.reg_weight, cfg.reg_weight_planning)
            reg_term = (lam.to(per_row.dtype) * per_row).sum() / rows_total
    elif kind == "budget":  # only the batch's mean run-rate is constrained: tool calls may skip more than planning
        reg = (gate.mean() - cfg.target_run_rate).pow(2) / micro_total
    else:
        reg = zero
    if reg_term is None:
        reg_term = cfg.reg_weight * reg
    if cfg.router_loss != "none" and (cfg.router_loss == "bce" or oracle_target is not None):
        if cfg.router_loss == "bce":
            # LayerRoute-BCE: every block's router is told the step type (tool call -> skip, planning -> run).
            target = (~is_tool_call).to(prob.dtype).expand_as(prob)  # [L, B]
        else:
            target = oracle_target  # [L, B] from first-order costs or block influence (RoutedStepLoss)
        p = prob.clamp(1e-6, 1 - 1e-6)
        bce_rows = -(target * p.log() + (1 - target) * (1 - p).log()).mean(dim=0)  # [B]
        bce = bce_rows.sum() / rows_total
    else:
        bce = zero
    # self-distillation: token-mean KL to the full-depth model, over the same tokens as the LM loss
    distill = kl_row.sum() / max(tokens_total, 1) if kl_row is not None else zero
    total = lm + reg_term + cfg.bce_weight * bce + cfg.distill_weight * distill
    return LossParts(lm=lm, reg=reg, bce=bce, distill=distill, total=total)


# ------------------------------------------------------------------------------------------------------------
# Schedule, data order


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warm-up, then cosine or constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class BatchOrder:
    """Global micro-batch number g -> indices of training steps.

    Epoch e is `length_grouped_batches(steps, batch_size, seed=f(seed, e))`; micro-batch g is batch g mod n of epoch
    g div n. An optimizer step s on process r of W with A accumulation steps reads batches (s*A + k)*W + r, so the
    data position is a function of the step alone (and is saved with checkpoints as a check)."""

    def __init__(self, steps: list, batch_size: int, seed: int):
        from .data.collate import length_grouped_batches

        self._group = length_grouped_batches
        self.steps, self.batch_size, self.seed = steps, batch_size, seed
        self._epoch, self._order = -1, []
        self.batches_per_epoch = len(self._order_of(0))

    def _order_of(self, epoch: int) -> list[list[int]]:
        if epoch != self._epoch:
            self._order = self._group(self.steps, self.batch_size, seed=self.seed * 100_003 + epoch)
            self._epoch = epoch
        return self._order

    def batch(self, g: int) -> list[int]:
        epoch, i = divmod(g, self.batches_per_epoch)
        return self._order_of(epoch)[i]

    def position(self, g: int) -> dict:
        epoch, i = divmod(g, self.batches_per_epoch)
        return {"next_batch": g, "epoch": epoch, "batch_in_epoch": i, "batches_per_epoch": self.batches_per_epoch}


def target_count(step) -> int:
    """Number of next-token targets of a step (labels set at positions 1..T-1)."""
    return sum(1 for x in step.labels[1:] if x != IGNORE_INDEX)


def eval_subset(steps: list, n: int) -> list:
    """The first n eval steps, half tool calls and half planning when both are there (stable order)."""
    tool = [s for s in steps if s.step_type == "tool_call"]
    plan = [s for s in steps if s.step_type != "tool_call"]
    n_tool = min(len(tool), max(n - len(plan), (n + 1) // 2))
    return tool[:n_tool] + plan[: n - n_tool]


# ------------------------------------------------------------------------------------------------------------
# Metrics sinks: one method, `log(metrics)`.


def _metrics_up_to(text: str, step: int) -> tuple[list[str], int]:
    """The metrics.jsonl lines logged at or before `step`, and how many lines could not be read (cut by a kill)."""
    kept, damaged = [], 0
    for line in filter(None, text.splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            damaged += 1
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    return kept, damaged


class JsonlLogger:
    """Appends one JSON object per logging step to OUT/metrics.jsonl."""

    def __init__(self, path: Path):
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, metrics: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(metrics) + "\n")


class TensorBoardLogger:
    """Scalars (lists become one scalar per layer) to a TensorBoard event file, when tensorboard is installed."""

    def __init__(self, directory: Path):
        from torch.utils.tensorboard import SummaryWriter  # ImportError without the tensorboard package

        self.writer = SummaryWriter(str(directory))

    def log(self, metrics: dict) -> None:
        step = metrics.get("step", 0)
        for key, value in metrics.items():
            if isinstance(value, list):
                for i, v in enumerate(value):
                    if isinstance(v, int | float):
                        self.writer.add_scalar(f"{key}/{i:02d}", v, step)
            elif isinstance(value, int | float) and key != "step":
                self.writer.add_scalar(key, value, step)
        self.writer.flush()


class ProgressBar:
    """The tqdm bar: advanced every step, its postfix refreshed from each metrics record."""

    def __init__(self, total: int, initial: int, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, disable=not enabled, desc="fit", dynamic_ncols=True)

    def advance(self) -> None:
        self.bar.update(1)

    def log(self, metrics: dict) -> None:
        if self.bar.disable:
            return
        if "loss" not in metrics:
            keys = [k for k in ("val/lm_loss", "val/lm_loss/tool_call", "val/lm_loss/planning") if k in metrics]
            self.bar.write(" ".join(f"{k}={metrics[k]:.4f}" for k in keys) + f" (step {metrics.get('step')})")
            return
        def f(key: str, spec: str) -> str:
            value = metrics.get(key)
            return "-" if value is None else format(value, spec)

        self.bar.set_postfix_str(
            f"loss={f('loss', '.4f')} lm={f('lm_loss', '.4f')} reg={f('reg', '.4f')} "
            f"run tool={f('run_rate/tool_call', '.2f')} plan={f('run_rate/planning', '.2f')} "
            f"tok/s={f('tokens_per_s', '.0f')}",
            refresh=False,
        )

    def close(self) -> None:
        self.bar.close()


def _finite_or_none(x: float):
    return x if math.isfinite(x) else None


# ------------------------------------------------------------------------------------------------------------
# Checkpoints: safetensors + JSON only (nothing is unpickled on resume).


def _rng_state() -> dict:
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under OUT/checkpoints, oldest first (a crash mid-write leaves only a temp folder)."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if re.fullmatch(r"step-\d+", p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _config_diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _config_diff(a, b, name + ".")
        elif a != b and name not in RESUME_MAY_CHANGE:
            keys.append(f"{name}: {a!r} -> {b!r}")
    return keys


# ------------------------------------------------------------------------------------------------------------
# The trainer


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    steps: int
    metrics: dict
    wall_s: float
    is_main_process: bool = True


class Trainer:
    """setup / fit / validate for one run. `data` (an object with .train and .eval lists of Step) bypasses
    `load_steps` (tests); otherwise the data section of the config is loaded with the model's tokenizer."""

    def __init__(
        self,
        cfg: RunConfig,
        output_dir: str | Path | None = None,
        *,
        resume: bool = False,
        data=None,
        accelerator=None,
    ):
        self.cfg = cfg
        out = output_dir or cfg.train.output_dir
        if not out:
            raise ConfigError("train.output_dir is not set: pass --output-dir OUT (or set train.output_dir)")
        self.output_dir = Path(out)
        self.resume = resume
        self.data = data
        self.accelerator = accelerator
        self.start_step = 0
        self.last_checkpoint: Path | None = None
        self.wall_before = 0.0  # wall time of earlier sessions of this run (resume)
        self.history: dict = {}

    # -- helpers -----------------------------------------------------------------------------------------------
    def _print(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            print(msg, file=sys.stderr, flush=True)

    def _sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over processes (a no-op on one process)."""
        tensor = tensor.to(self.accelerator.device)
        return self.accelerator.reduce(tensor, reduction="sum") if self.world > 1 else tensor

    # -- setup -------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from .adapters import build_routed_model, init_lora_from
        from .model import load_base, resolve_device
        from .params import parameter_counts

        t0 = self._t0 = time.perf_counter()
        tc = self.cfg.train
        if self.accelerator is None:
            # cpu=True on a CPU model is what lets accelerate see a torchrun-style launch (WORLD_SIZE > 1) as
            # multi-process CPU training over gloo; without it every process would train alone.
            cpu = resolve_device(self.cfg.model.device).type == "cpu"
            self.accelerator = Accelerator(mixed_precision="bf16" if tc.precision == "bf16" else "no", cpu=cpu)
        acc = self.accelerator
        self.world, self.rank = acc.num_processes, acc.process_index
        checkpoints = list_checkpoints(self.output_dir)
        if checkpoints and not self.resume:
            raise ConfigError(
                f"{self.output_dir} already holds checkpoints (last: {checkpoints[-1].name}): pass --resume to "
                "continue that run, or choose another --output-dir"
            )
        self._print(f"[setup] output {self.output_dir}, {self.world} process(es) on {acc.device}, precision {tc.precision}")

        # Model: the backbone's random weights (shape presets) come from model.seed; LoRA init from train.seed.
        model_cfg = dataclasses.replace(self.cfg.model, device=str(acc.device))
        loaded = load_base(model_cfg, tokenizer=self.data is None)
        set_seed(tc.seed)
        rm = build_routed_model(model_cfg, self.cfg.router, self.cfg.lora, loaded=loaded)
        self.rm = rm
        if tc.init_lora:  # before anything measures the model (router-bias influence, drop_* oracle costs)
            n = init_lora_from(rm, tc.init_lora)
            self._print(f"[setup] LoRA starts from {tc.init_lora} ({n} tensors)")
        counts = parameter_counts(rm.model)
        self._print(
            f"[setup] {model_cfg.name}: {rm.num_layers} blocks; trainable {counts['trainable']:,} "
            f"(LoRA {counts['lora']:,} + routers {counts['router']:,}"
            + (f" + skip bridges {counts['bridge']:,}" if counts["bridge"] else "") + f") of {counts['backbone']:,} frozen"
        )

        # Data
        if self.data is None:
            from .data.build import load_steps

            if rm.tokenizer is None:
                raise ConfigError("model.tokenizer is not set and the model has none: name a tokenizer folder")
            with acc.main_process_first():
                self.data = load_steps(self.cfg.data, rm.tokenizer)
        self.train_steps = list(self.data.train)
        if not self.train_steps:
            raise ConfigError("the data section produced no training steps (check data.sources)")
        self.eval_steps = eval_subset(list(getattr(self.data, "eval", [])), tc.eval_examples)
        self.pad_id = self._pad_token_id()
        self.n_targets = [target_count(s) for s in self.train_steps]
        self.order = BatchOrder(self.train_steps, tc.batch_size, tc.seed)
        n_tool = sum(s.step_type == "tool_call" for s in self.train_steps)
        self._print(
            f"[setup] data: {len(self.train_steps):,} train steps ({n_tool:,} tool calls), "
            f"{len(self.eval_steps)} val steps, {self.order.batches_per_epoch:,} micro-batches per epoch; "
            f"{tc.steps:,} steps x {tc.batch_size} x {tc.grad_accum} x {self.world} = "
            f"{tc.steps * tc.batch_size * tc.grad_accum * self.world / max(1, len(self.train_steps)):.2f} epochs"
        )

        if self.cfg.router.bridge_rank and tc.bridge_calibration_steps:
            # after init_lora (the bridges fit the blocks as LoRA has them) and before the drop_* oracle (which then
            # measures what a removal costs with its bridge standing in). A resumed run refits, then the checkpoint
            # overwrites them with their trained values.
            from .bridge import fit_bridges

            calib = [s for s in self.train_steps if s.step_type == "tool_call"][: tc.bridge_calibration_steps]
            calib = calib or self.train_steps[: tc.bridge_calibration_steps]
            explained = fit_bridges(rm, calib, tc.batch_size, self.pad_id, tc.seed,  # in eval mode, then back
                                    progress=tc.progress and self.accelerator.is_main_process)
            self.bridge_explained = explained
            self._print(f"[setup] skip bridges (rank {self.cfg.router.bridge_rank}) fitted on {len(calib)} steps: "
                        "share of each block's update explained " + " ".join(f"{e:.2f}" for e in explained))

        if self.cfg.router.init_bias_spread > 0:
            influence = spread_router_biases(rm, self.train_steps[:INFLUENCE_STEPS], self.cfg.router, tc, self.pad_id)
            self._print("[setup] router biases spread by block influence: "
                        + " ".join(f"{b:.2f}" for b in (r.output_bias.item() for r in rm.routers()))
                        + f" (influence min {min(influence):.3f}, max {max(influence):.3f})")

        # Optimizer: routers in their own group (their own lr, no weight decay: decay pulls the bias towards
        # sigmoid(0) = 0.5, i.e. onto the threshold).
        # Skip bridges in theirs at LoRA's lr without decay: decay would pull the closed-form fit towards the plain
        # skip, and move a bridge whose block always runs (its gradient is exactly zero, so Adam leaves it alone).
        named = [(n, p) for n, p in rm.model.named_parameters() if p.requires_grad]
        lora = [p for n, p in named if ".router." not in n and ".bridge." not in n]
        bridges = [p for n, p in named if ".bridge." in n]
        routers = [p for n, p in named if ".router." in n]
        groups = [{"params": routers, "lr": tc.effective_router_lr, "weight_decay": 0.0, "name": "router"}]
        if bridges:
            groups.insert(0, {"params": bridges, "lr": tc.lr, "weight_decay": 0.0, "name": "bridge"})
        if lora:
            groups.insert(0, {"params": lora, "lr": tc.lr, "weight_decay": tc.weight_decay, "name": "lora"})
        optimizer = torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.999), eps=1e-8)
        # Not passed to accelerate: its scheduler wrapper steps once per process under DDP.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, tc))
        self.trainable = [p for g in groups for p in g["params"]]
        self.trainable_names = [n for n, p in rm.model.named_parameters() if p.requires_grad]

        self.step_module = RoutedStepLoss(rm.model, self.cfg.train)
        if tc.router_loss == "influence" and tc.oracle_source in STATIC_ORACLES:
            self.step_module.static_targets = self._static_oracle_targets()
        rm.model.train()  # LoRA dropout on; the frozen backbone's own dropouts are 0 in these families
        self.model, self.optimizer = acc.prepare(self.step_module, optimizer)
        self.inner_optimizer = optimizer

        if self.resume:
            self._load_latest()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if acc.is_main_process:
            write_text_atomic(self.output_dir / "config.json", json.dumps(self.cfg.to_dict(), indent=2, default=str))
        # Every process has its own RNG stream (LoRA dropout differs between ranks); rank 0 = the seed itself.
        if self.start_step == 0:
            set_seed(tc.seed, device_specific=True)
        self.sinks = [ProgressBar(tc.steps, self.start_step, tc.progress and acc.is_main_process)]
        if acc.is_main_process:
            self.sinks.append(JsonlLogger(self.output_dir / METRICS_FILE))
            try:
                self.sinks.append(TensorBoardLogger(self.output_dir / "tensorboard"))
            except ImportError:
                pass  # tensorboard is optional
        self.setup_s = time.perf_counter() - t0
        self._print(f"[setup] done in {self.setup_s:.1f} s")

    def _static_oracle_targets(self) -> torch.Tensor:
        """[2, L] static run targets (planning, tool call) from single-block drop costs, measured before any
        update (peft starts LoRA at zero, or train.init_lora's, so a resumed run measures the same model and gets
        the same targets).
        drop_nll ranks blocks by the NLL a removal adds; drop_errors by the greedy token errors it adds (NLL
        breaking ties): NLL is dominated by tokens the model is unsure of anyway, errors by the ones it gets right.
        greedy_* grow the set one block at a time from the same single-drop costs (removals interact)."""
        from .config import EvalConfig

        tc, rm = self.cfg.train, self.rm
        L = rm.num_layers
        if tc.oracle_source == "fixed":  # chosen by the user: no calibration
            blocks = sorted(set(tc.oracle_skip_blocks))
            if blocks[-1] >= L:
                raise ConfigError(f"train.oracle_skip_blocks: block {blocks[-1]} does not exist ({L} blocks: 0..{L - 1})")
            tool = torch.ones(L)
            tool[blocks] = 0.0
            self.oracle_record = {"tool_call": {"skip": blocks, "fixed": True}}
            self._print(f"[setup] fixed oracle, tool_call: skip blocks {blocks}")
            return torch.stack([torch.ones(L), tool])
        rows, record = [], {}
        acc_main = self.accelerator.is_main_process
        for step_type, frac in (("planning", tc.oracle_skip_planning), ("tool_call", tc.oracle_skip_tool)):
            n_skip = int(round(frac * L))
            if n_skip == 0:
                rows.append(torch.ones(L))
                continue
            steps = [s for s in self.train_steps if s.step_type == step_type][: tc.oracle_calibration_steps]
            ecfg = EvalConfig(batch_size=tc.batch_size, seed=tc.seed, prompt_full_depth=tc.prompt_full_depth)
            greedy_path = None
            with without_dropout(rm.model):
                costs = drop_costs(rm, steps, ecfg, self.pad_id, progress=tc.progress and acc_main,
                                   desc=f"removal costs ({step_type}, {len(steps)} steps)")
                if tc.oracle_source in GREEDY_ORACLES:
                    target, greedy_path = greedy_drop_targets(rm, steps, ecfg, n_skip, tc.oracle_source, costs,
                                                              tc.oracle_greedy_candidates, self.pad_id)
                else:
                    target = oracle_skip_targets(costs, n_skip, tc.oracle_source)
            rows.append(target)
            record[step_type] = {"costs": costs["nll"], "token_error_costs": costs["token_errors"],
                                 "skip": [i for i in range(L) if target[i] == 0]}
            if greedy_path is not None:
                record[step_type]["greedy_path"] = greedy_path
                self._print(f"[setup] {tc.oracle_source} path, {step_type}: " + ", ".join(
                    f"+{p['block']} (NLL {p['nll']:+.3f}, errors {p['token_errors']:+.3f})" for p in greedy_path))
            self._print(f"[setup] {tc.oracle_source} oracle, {step_type}: skip blocks {record[step_type]['skip']} "
                        f"(single-drop NLL costs {min(costs['nll']):+.3f} .. {max(costs['nll']):+.3f} nats/token, "
                        f"token-error costs {min(costs['token_errors']):+.3f} .. {max(costs['token_errors']):+.3f}, "
                        f"{len(steps)} steps)")
        self.oracle_record = record
        return torch.stack(rows)

    def _pad_token_id(self) -> int:
        tok = self.rm.tokenizer
        for value in (
            getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None),
            getattr(self.rm.config, "pad_token_id", None), getattr(self.rm.config, "eos_token_id", None),
        ):
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None:
                return int(value)
        return 0

    # -- checkpoints -------------------------------------------------------------------------------------------
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        params = dict(self.rm.model.named_parameters())
        return {n: params[n].detach().to("cpu").contiguous() for n in self.trainable_names}

    def save_checkpoint(self, step: int) -> Path:
        """OUT/checkpoints/step-NNNNNN, written to a temp folder and renamed (all processes must call this)."""
        from accelerate.utils import gather_object

        from .adapters import write_atomically

        acc = self.accelerator
        rng = gather_object([_rng_state()]) if self.world > 1 else [_rng_state()]
        path = self.output_dir / CHECKPOINT_DIR / f"step-{step:06d}"
        if acc.is_main_process:
            tensors, opt_meta = _optimizer_to_files(self.inner_optimizer)
            state = {
                "step": step,
                "world_size": self.world,
                "data_position": self.order.position(step * self.cfg.train.grad_accum * self.world),
                "scheduler": self.scheduler.state_dict(),
                "optimizer": opt_meta,
                "trainable_names": self.trainable_names,
                "wall_s": self.wall_before + (time.perf_counter() - self.t_start),
                "history": self.history,
                "config": self.cfg.to_dict(),
            }

            def fill(tmp: Path) -> None:
                save_file(self._trainable_state(), str(tmp / TRAINABLE_FILE))
                save_file(tensors, str(tmp / OPTIMIZER_FILE))
                (tmp / RNG_FILE).write_text(json.dumps({str(r): s for r, s in enumerate(rng)}))
                (tmp / STATE_FILE).write_text(json.dumps(state, default=str))  # last: marks the folder complete

            write_atomically(path, fill)
            for old in list_checkpoints(self.output_dir)[: -self.cfg.train.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        self.last_checkpoint = path
        return path

    def _load_latest(self) -> None:
        checkpoints = list_checkpoints(self.output_dir)
        if not checkpoints:
            self._print(f"[setup] --resume: no checkpoint under {self.output_dir / CHECKPOINT_DIR}; starting at step 0")
            return
        path = checkpoints[-1]
        state = json.loads((path / STATE_FILE).read_text())
        if state["world_size"] != self.world:
            raise TrainingError(
                f"{path} was written by {state['world_size']} process(es); resume it with the same number "
                f"(this run has {self.world}): the data order and dropout streams are per process"
            )
        changed = _config_diff(state["config"], self.cfg.to_dict())
        if changed:
            raise TrainingError(f"cannot resume {path}: the config changed ({'; '.join(changed)})")
        if state["trainable_names"] != self.trainable_names:
            raise TrainingError(f"cannot resume {path}: its trainable parameters differ from this model's")
        tensors = load_file(str(path / TRAINABLE_FILE))
        params = dict(self.rm.model.named_parameters())
        with torch.no_grad():
            for name in self.trainable_names:
                params[name].copy_(tensors[name])
        _optimizer_from_files(self.inner_optimizer, load_file(str(path / OPTIMIZER_FILE)), state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rng = json.loads((path / RNG_FILE).read_text())
        _set_rng_state(rng[str(self.rank)])
        self.start_step = state["step"]
        self.wall_before = state["wall_s"]
        self.history = state.get("history", {})
        self.last_checkpoint = path
        # metrics.jsonl: drop records the interrupted session wrote after this checkpoint
        metrics = self.output_dir / METRICS_FILE
        if self.accelerator.is_main_process and metrics.is_file():
            kept, damaged = _metrics_up_to(metrics.read_text(), self.start_step)
            if damaged:  # a kill mid-append leaves a cut line: say so rather than crash the resume
                self._print(f"[setup] {metrics}: dropped {damaged} unreadable line(s)")
            write_text_atomic(metrics, "".join(ln + "\n" for ln in kept))
        self.accelerator.wait_for_everyone()
        self._print(f"[setup] resumed from {path} (step {self.start_step})")

    # -- fit ---------------------------------------------------------------------------------------------------
    def _batch(self, indices: list[int], steps: list) -> dict[str, torch.Tensor]:
        from .data.collate import collate_steps

        batch = collate_steps([steps[i] for i in indices], self.pad_id)
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def _new_window(self) -> dict:
        L = self.rm.num_layers
        return {
            "steps": 0, "loss": 0.0, "lm": 0.0, "reg": 0.0, "bce": 0.0, "distill": 0.0, "grad_norm": 0.0, "tokens": 0,
            "gate_sum": torch.zeros(2, L, dtype=torch.float64), "rows": torch.zeros(2, dtype=torch.float64),
            "prob_sum": torch.zeros(2, L, dtype=torch.float64),
            "t0": time.perf_counter(),
        }

    def fit(self) -> dict:
        acc, tc = self.accelerator, self.cfg.train
        A, W = tc.grad_accum, self.world
        self.t_start = time.perf_counter()
        self._print(f"[fit] steps {self.start_step + 1}..{tc.steps}")
        window = self._new_window()
        last = {}
        for step in range(self.start_step, tc.steps):
            # Every process knows the whole step's micro-batches, so the loss denominators are global.
            micro = [[self.order.batch((step * A + k) * W + r) for r in range(W)] for k in range(A)]
            tokens_total = sum(self.n_targets[i] for mb in micro for b in mb for i in b)
            rows_total = sum(len(b) for mb in micro for b in mb)
            local = torch.zeros(5, dtype=torch.float64)  # loss, lm, reg, bce, distill (this process's share)
            for k in range(A):
                batch = self._batch(micro[k][self.rank], self.train_steps)
                sync = nullcontext() if k == A - 1 else acc.no_sync(self.model)
                with sync:
                    row_sum, _, prob, gate, extras = self.model(
                        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"], decision_mask=batch["decision_mask"],
                        is_tool_call=batch["is_tool_call"],
                    )
                    parts = loss_parts(
                        tc, row_sum, prob.float(), gate.float(), batch["is_tool_call"], kl_row=extras["kl_row"],
                        oracle_target=extras["oracle_target"],
                        tokens_total=tokens_total, rows_total=rows_total, micro_total=A * W,
                    )
                    # DDP averages gradients over processes; the parts are shares of the global sum: undo the mean.
                    acc.backward(parts.total * W)
                local += torch.tensor(
                    [parts.total.item(), parts.lm.item(), parts.reg.item(), parts.bce.item(), parts.distill.item()],
                    dtype=torch.float64,
                )
                hard = gate.detach().round().double().cpu()  # [L, B] in {0, 1}
                soft = prob.detach().double().cpu()  # [L, B]: shows the routers drifting before a gate flips
                tool = batch["is_tool_call"].cpu()
                for t, sel in enumerate((tool, ~tool)):
                    window["gate_sum"][t] += hard[:, sel].sum(dim=1)
                    window["prob_sum"][t] += soft[:, sel].sum(dim=1)
                    window["rows"][t] += int(sel.sum())
                window["tokens"] += int(batch["attention_mask"].sum())
            max_norm = tc.max_grad_norm if tc.max_grad_norm > 0 else float("inf")
            grad_norm = clip_gradients(acc, [g["params"] for g in self.inner_optimizer.param_groups], max_norm,
                                       per_group=tc.clip_per_group)
            totals = self._sum(local.clone())  # the step's global loss terms, summed over processes
            if not (torch.isfinite(totals).all() and math.isfinite(grad_norm)):
                self._stop_non_finite(step + 1, totals, grad_norm)
            lrs = [g["lr"] for g in self.inner_optimizer.param_groups]  # the lrs this step applies
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            done = step + 1
            window["steps"] += 1
            for i, key in enumerate(("loss", "lm", "reg", "bce", "distill")):
                window[key] += float(totals[i])
            window["grad_norm"] += grad_norm
            self.sinks[0].advance()
            if done % tc.log_every == 0 or done == tc.steps:
                last = self._log_window(done, window, lrs)
                window = self._new_window()
            if tc.eval_every and done % tc.eval_every == 0 and done != tc.steps:
                self.validate(done)
            if tc.checkpoint_every and done % tc.checkpoint_every == 0:
                self.save_checkpoint(done)
        self.fit_s = time.perf_counter() - self.t_start
        return last

    def _stop_non_finite(self, step: int, totals: torch.Tensor, grad_norm: float) -> None:
        loss, lm, reg, bce, _ = (float(x) for x in totals)
        where = (
            f"last good checkpoint: {self.last_checkpoint} (continue with --resume after the fix)"
            if self.last_checkpoint
            else f"no checkpoint was written before it (train.checkpoint_every={self.cfg.train.checkpoint_every})"
        )
        for sink in self.sinks:
            if hasattr(sink, "close"):
                sink.close()
        raise TrainingError(
            f"non-finite loss at step {step}: loss={loss} lm={lm} reg={reg} bce={bce} grad_norm={grad_norm}; "
            f"the parameters were not updated with it. {where}. Usual causes: too high a train.lr / "
            "train.router_lr, fp16 overflow, or a step without target tokens."
        )

    def _log_window(self, step: int, window: dict, lrs: list[float]) -> dict:
        n = window["steps"]
        gate_sum = self._sum(window["gate_sum"].clone()).cpu()
        prob_sum = self._sum(window["prob_sum"].clone()).cpu()
        rows = self._sum(window["rows"].clone()).cpu()
        tokens = float(self._sum(torch.tensor([float(window["tokens"])], dtype=torch.float64))[0])
        elapsed = time.perf_counter() - window["t0"]
        metrics = {
            "step": step,
            "epoch": round(step * self.cfg.train.grad_accum * self.world / max(1, self.order.batches_per_epoch), 4),
            "lr": lrs[0],
            "router_lr": lrs[-1],
            "loss": window["loss"] / n,
            "lm_loss": window["lm"] / n,
            "reg": window["reg"] / n,
            "bce": window["bce"] / n,
            "distill": window["distill"] / n,
            "grad_norm": window["grad_norm"] / n,
            "tokens_per_s": tokens / max(elapsed, 1e-9),
        }
        layer = {}
        for t, name in enumerate(STEP_TYPES):
            rate = (gate_sum[t] / rows[t]).tolist() if rows[t] > 0 else [None] * gate_sum.shape[1]
            metrics[f"run_rate/{name}"] = float(gate_sum[t].mean() / rows[t]) if rows[t] > 0 else float("nan")
            metrics[f"prob/{name}"] = float(prob_sum[t].mean() / rows[t]) if rows[t] > 0 else float("nan")
            layer[f"layer_run_rate/{name}"] = [round(x, 4) if x is not None else None for x in rate]
            layer[f"layer_prob/{name}"] = [round(x, 4) for x in (prob_sum[t] / rows[t]).tolist()] if rows[t] > 0 else None
        all_rows = float(rows.sum())
        metrics["run_rate/all"] = float(gate_sum.sum() / gate_sum.shape[1] / all_rows) if all_rows else float("nan")
        metrics.update(layer)
        metrics["elapsed_s"] = round(self.wall_before + time.perf_counter() - self.t_start, 2)
        self._emit(metrics)
        self.history["train"] = {k: v for k, v in metrics.items() if not k.startswith("layer_")}
        return metrics

    def _emit(self, metrics: dict) -> None:
        clean = {k: (_finite_or_none(v) if isinstance(v, float) else v) for k, v in metrics.items()}
        for sink in self.sinks:
            sink.log(clean)

    # -- validate ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, step: int | None = None) -> dict:
        """Teacher-forced LM loss and run rates per step type on the val subset (processes share the batches)."""
        if not self.eval_steps:
            return {}
        acc = self.accelerator
        t0 = time.perf_counter()
        L = self.rm.num_layers
        nll = torch.zeros(2, dtype=torch.float64)
        toks = torch.zeros(2, dtype=torch.float64)
        gate_sum = torch.zeros(2, L, dtype=torch.float64)
        rows = torch.zeros(2, dtype=torch.float64)
        order = sorted(range(len(self.eval_steps)), key=lambda i: len(self.eval_steps[i].input_ids))
        bs = self.cfg.train.batch_size
        batches = [order[i : i + bs] for i in range(0, len(order), bs)]
        # eval() on the loss module, not only on the model: its own `training` flag switches off block dropping,
        # distillation and oracle targets (the model's eval() alone left them on: val then dropped blocks)
        self.step_module.eval()  # dropout off too: validation consumes no random numbers
        try:
            for indices in batches[self.rank :: self.world]:
                batch = self._batch(indices, self.eval_steps)
                row_sum, row_count, prob, gate, _ = self.step_module(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["labels"], decision_mask=batch["decision_mask"],
                )
                tool = batch["is_tool_call"].cpu()
                hard = gate.round().double().cpu()
                for t, sel in enumerate((tool, ~tool)):
                    nll[t] += row_sum.double().cpu()[sel].sum()
                    toks[t] += row_count.double().cpu()[sel].sum()
                    gate_sum[t] += hard[:, sel].sum(dim=1)
                    rows[t] += int(sel.sum())
        finally:
            self.step_module.train()
        nll, toks, gate_sum, rows = (self._sum(x).cpu() for x in (nll, toks, gate_sum, rows))
        metrics = {"step": step if step is not None else self.cfg.train.steps,
                   "val/lm_loss": float(nll.sum() / toks.sum().clamp_min(1))}
        for t, name in enumerate(STEP_TYPES):
            metrics[f"val/lm_loss/{name}"] = float(nll[t] / toks[t]) if toks[t] > 0 else float("nan")
            metrics[f"val/run_rate/{name}"] = float(gate_sum[t].mean() / rows[t]) if rows[t] > 0 else float("nan")
            metrics[f"val/steps/{name}"] = int(rows[t])
        for t, name in enumerate(STEP_TYPES):
            metrics[f"val/layer_run_rate/{name}"] = (
                [round(x, 4) for x in (gate_sum[t] / rows[t]).tolist()] if rows[t] > 0 else None
            )
        metrics["val/seconds"] = round(time.perf_counter() - t0, 2)
        self._emit(metrics)
        self.history["val"] = {k: v for k, v in metrics.items() if "layer_" not in k}
        acc.wait_for_everyone()
        return metrics

    # -- the whole run -----------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        if not hasattr(self, "rm"):
            self.setup()
        last = self.fit()
        val = self.validate(self.cfg.train.steps)
        for sink in self.sinks:
            if hasattr(sink, "close"):
                sink.close()
        wall = self.wall_before + (time.perf_counter() - self._t0)
        adapter_dir = self.output_dir / "adapter"
        summary = {
            "steps": self.cfg.train.steps,
            "processes": self.world,
            "wall_s": round(wall, 2),
            "setup_s": round(self.setup_s, 2),
            "resumed_from": str(self.last_checkpoint) if self.resume and self.start_step else None,
            "final_train": self.history.get("train", {k: v for k, v in last.items() if not k.startswith("layer_")}),
            "final_val": self.history.get("val", {}),
            "oracle_targets": getattr(self, "oracle_record", None),  # drop_*: the measured costs and skip set
            "bridge_explained": getattr(self, "bridge_explained", None),  # skip bridges' closed-form fit, per block
            "config": self.cfg.to_dict(),
        }
        if self.accelerator.is_main_process:
            self.rm.save(adapter_dir, extra={"training": summary})
            write_text_atomic(self.output_dir / "summary.json", json.dumps(summary, indent=2, default=str))
        self.accelerator.wait_for_everyone()
        self._print(f"[fit] done: {self.cfg.train.steps} steps in {wall:.1f} s; adapter {adapter_dir}")
        return TrainResult(
            self.output_dir, adapter_dir, self.cfg.train.steps, {**last, **val}, wall, self.accelerator.is_main_process
        )


def train(cfg: RunConfig, output_dir: str | Path | None = None, *, resume: bool = False, data=None) -> TrainResult:
    """Run setup, fit and a final validate; returns where the adapter went and the last metrics."""
    return Trainer(cfg, output_dir, resume=resume, data=data).run()


# ------------------------------------------------------------------------------------------------------------
# CLI: `layerroute train`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set train.lr=1e-3 (repeatable; value parsed as YAML)")
    parser.add_argument("--seed", type=int, default=None, help="train.seed (LoRA init, data order, dropout)")
    parser.add_argument("--output-dir", default=None, help="run folder (default: train.output_dir)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the run folder")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"train.seed={args.seed}")
    cfg = RunConfig.from_yaml(args.config, overrides)  # every config error surfaces here, before any model load
    result = train(cfg, args.output_dir, resume=args.resume)
    if result.is_main_process:
        metrics = {k: (_finite_or_none(v) if isinstance(v, float) else v) for k, v in result.metrics.items()}
        print(json.dumps({"adapter": str(result.adapter_dir), "wall_s": round(result.wall_s, 2),
                          **{k: v for k, v in metrics.items() if "layer_" not in k}}, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m layerroute.train ...` (what `accelerate launch -m layerroute.train` runs), same as `layerroute train`."""
    from .errors import LayerRouteError

    parser = argparse.ArgumentParser(prog="layerroute train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except LayerRouteError as err:
        print(f"layerroute train: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
