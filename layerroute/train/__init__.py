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

Modules (one job each; this package re-exports their public names, so `from layerroute.train import ...` works):

- ``trainer``: `Trainer` (setup / fit / validate / run), `train`, `TrainResult`.
- ``objective``: `RoutedStepLoss` (the routed forward, gates and router targets) and `loss_parts` (the loss terms).
- ``schedule``: optimizer parameter groups, the lr schedule, gradient clipping.
- ``batches``: the deterministic micro-batch order, target counts, the validation subset.
- ``calibrate``: setup-time measurements: bias spread by block influence, static oracle targets, skip-bridge fit.
- ``checkpoint``: the checkpoint folder format: write, validate and restore (tensors, optimizer, schedule, RNG).
- ``metrics``: the metrics sinks (metrics.jsonl, TensorBoard, progress bar) and metrics.jsonl on resume.
- ``cli``: `layerroute train` / `python -m layerroute.train` flags and entry point.
"""

from __future__ import annotations

from ..calibrate.setup import INFLUENCE_STEPS, spread_router_biases, static_oracle_targets, without_dropout
from ..nn.losses import sliced_lm_loss  # imported from here by tests and benchmarks
from .batches import BatchOrder, eval_subset, target_count
from .checkpoint import (
    CHECKPOINT_DIR,
    OPTIMIZER_FILE,
    RESUME_MAY_CHANGE,
    RNG_FILE,
    STATE_FILE,
    TRAINABLE_FILE,
    list_checkpoints,
)
from .cli import add_arguments, main, run
from .metrics import METRICS_FILE, JsonlLogger, ProgressBar, TensorBoardLogger
from .metrics import _metrics_up_to as _metrics_up_to  # tests/test_atomic.py
from .objective import LossParts, RoutedStepLoss, loss_parts
from .schedule import clip_gradients, lr_factor, optimizer_groups
from .trainer import STEP_TYPES, Trainer, TrainResult, train

__all__ = [
    "BatchOrder", "CHECKPOINT_DIR", "INFLUENCE_STEPS", "JsonlLogger", "LossParts", "METRICS_FILE",
    "OPTIMIZER_FILE", "ProgressBar", "RESUME_MAY_CHANGE", "RNG_FILE", "RoutedStepLoss", "STATE_FILE",
    "STEP_TYPES", "TRAINABLE_FILE", "TensorBoardLogger", "Trainer", "TrainResult", "add_arguments",
    "clip_gradients", "eval_subset", "list_checkpoints", "loss_parts", "lr_factor", "main", "optimizer_groups",
    "run", "sliced_lm_loss", "spread_router_biases", "static_oracle_targets", "target_count", "train",
    "without_dropout",
]
