"""The train section of a run config: what the loss is, how long, how fast, how often to log and save."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError
from .experimental import GROUP_HELP, REJECTED, TrainExperimental, renamed_keys
from .fields import check_choices, check_range, group, setting

Schedule = Literal["cosine", "constant"]
Regularizer = Literal["soft_mean", "hard_ste", "budget", "none"]
RouterLoss = Literal["none", "bce", "oracle", "targets"]
# router_loss=targets' sources of skip targets; the drop_* ones are static per step type (measured before training)
OracleSource = Literal["influence", "drop_nll", "drop_errors", "greedy_nll", "greedy_errors", "fixed"]
Precision = Literal["fp32", "bf16"]

REGULARIZERS = typing.get_args(Regularizer)
ROUTER_LOSSES = typing.get_args(RouterLoss)
ORACLE_SOURCES = typing.get_args(OracleSource)
STATIC_ORACLES = ("drop_nll", "drop_errors", "greedy_nll", "greedy_errors", "fixed")
GREEDY_ORACLES = ("greedy_nll", "greedy_errors")


@dataclass
class TrainConfig:
    """The optimisation run: what the loss is, how long, how fast, how often to log and save."""

    # old names of choices, still read (configs and adapters written before the rename), written as the new name.
    # router_loss=influence meant "a BCE towards skip targets", whatever oracle_source chose them (the default's
    # targets come from measured removal costs, not influence), so it is called targets now.
    RENAMED_VALUES: typing.ClassVar[dict] = {("router_loss", "influence"): "targets"}
    # old places of keys, still read: the rejected recipes' options sat directly in train before they moved into
    # train.experimental (old adapters' stored configs, overlays written before the move)
    RENAMED_KEYS: typing.ClassVar[dict] = renamed_keys(TrainExperimental)

    # ---- optimisation ----
    steps: int = setting(3000, "optimizer steps (each = batch_size x grad_accum x processes steps of data)")
    batch_size: int = setting(4, "steps (agent turns) per micro-batch and process")
    grad_accum: int = setting(4, "micro-batches accumulated per optimizer step")
    lr: float = setting(2e-4, "peak learning rate of the LoRA adapters")
    router_lr: float | None = setting(None, "peak learning rate of the routers (null = lr)")
    schedule: Schedule = setting(
        "cosine", "learning-rate schedule after warm-up: cosine (to min_lr_ratio) or constant")
    warmup_steps: int = setting(0, "linear warm-up from 0 over this many optimizer steps")
    min_lr_ratio: float = setting(0.0, "cosine ends at lr x min_lr_ratio")
    weight_decay: float = setting(0.0, "AdamW weight decay on the LoRA matrices (never on routers)")
    max_grad_norm: float = setting(1.0, "clip the global gradient norm to this (0 = no clipping)")
    clip_per_group: bool = setting(
        False, "clip LoRA's and the routers' gradient norms separately (each to max_grad_norm) instead of jointly"
    )
    seed: int = setting(0, "seeds LoRA init, data order, dropout (the data split has its own data.seed)")
    precision: Precision = setting("fp32", "fp32, or bf16 (autocast through accelerate's mixed_precision; GPU)")

    # ---- objective: the skip penalty ----
    regularizer: Regularizer = setting(
        "soft_mean",
        "skip reward: soft_mean (paper: mean sigmoid prob), hard_ste (mean straight-through hard gate: the same "
        "gradient as soft_mean, only the logged value is the run-rate itself), "
        f"budget ((mean run-rate - target_run_rate)^2 per micro-batch; {REJECTED}) or none",
    )
    reg_weight: float = setting(0.1, "lambda: weight of the regulariser in the loss")
    reg_weight_planning: float | None = setting(
        None, "lambda for planning rows only (soft_mean/hard_ste); null = reg_weight for every row (the paper). "
        "Tool-call rows keep reg_weight: the step-type label sets where skipping is rewarded, the routers still "
        "decide from the context alone. Negative = running blocks is rewarded on planning rows",
    )

    # ---- objective: losses on the routers' probabilities ----
    router_loss: RouterLoss = setting(
        "none", "none; bce (LayerRoute-BCE: skip tool calls, run planning); oracle (first-order per-block skip "
        f"costs; {REJECTED}); targets (a BCE towards skip targets: the oracle_skip_tool / oracle_skip_planning "
        "fraction of blocks chosen by oracle_source, e.g. the blocks of lowest ShortGPT influence 1 - cos(h_in, "
        "block(h_in)) in that step's own forward, or the blocks of least measured removal cost; 'influence' is its "
        "old name, still read)",
    )
    bce_weight: float = setting(1.0, "weight of the bce router loss")
    oracle_skip_tool: float = setting(
        0.3, "router_loss=targets: fraction of blocks that are skip targets on tool-call rows (rounded per row)"
    )
    oracle_skip_planning: float = setting(0.0, "router_loss=targets: the same on planning rows")
    oracle_source: OracleSource = setting(
        "influence", "router_loss=targets: which blocks are the skip targets: influence (per step, the lowest "
        "1 - cos(h_in, block(h_in)) in the training forward) or drop_nll (static per step type: the blocks whose "
        "single removal raises the target NLL least on oracle_calibration_steps steps of that type, measured once "
        "before training) or drop_errors (the same, ranked by the greedy token errors a removal adds, NLL breaking "
        "ties) or greedy_nll / greedy_errors (the skip set grown one block at a time, each time the block whose "
        "removal together with those already chosen costs least: removals interact) or fixed (the blocks listed in "
        "oracle_skip_blocks, on tool calls)",
    )
    oracle_calibration_steps: int = setting(
        16, "oracle_source=drop_* or greedy_*: training steps per type that measure it")
    oracle_skip_blocks: list | None = setting(
        None, "oracle_source=fixed: the blocks tool-call rows are taught to skip (e.g. a set measured by an earlier "
        "run); planning rows run every block; no calibration",
    )
    router_lm_grad: bool = setting(
        True, "the LM (and distillation) loss reaches the routers through the straight-through gate; false = the "
        "routers learn only from the losses on their probabilities (soft_mean, bce, oracle, targets)",
    )
    bridge_calibration_steps: int = setting(
        32, "router.bridge_rank > 0: tool-call training steps the skip bridges are fitted on (reduced-rank least "
        "squares to each block's residual update, at full depth) before training; 0 = start them at zero",
    )

    # ---- checkpoints and logging ----
    checkpoint_every: int = setting(500, "save a resumable checkpoint every N optimizer steps (0 = never)")
    keep_checkpoints: int = setting(2, "keep only the newest N checkpoints")
    log_every: int = setting(10, "one metrics record (bar + metrics.jsonl) every N optimizer steps")
    eval_every: int = setting(0, "teacher-forced val loss every N optimizer steps (0 = only at the end)")
    eval_examples: int = setting(64, "size of the val subset (half tool calls, half planning when available)")
    output_dir: str | None = setting(None, "where checkpoints, metrics.jsonl and adapter/ go (--output-dir wins)")
    progress: bool = setting(True, "show the tqdm progress bar")

    # ---- the options of recipes the ablation rejected: train.experimental.* (config/experimental.py) ----
    experimental: TrainExperimental = group(TrainExperimental, GROUP_HELP)

    def __post_init__(self):
        check_choices(self, "train")
        for name in ("steps", "batch_size", "grad_accum", "eval_examples", "keep_checkpoints", "log_every"):
            check_range("train", name, getattr(self, name), 1)
        for name in ("warmup_steps", "checkpoint_every", "eval_every"):
            check_range("train", name, getattr(self, name), 0)
        check_range("train", "lr", self.lr, 0.0, low_open=True)
        if self.router_lr is not None:
            check_range("train", "router_lr", self.router_lr, 0.0, low_open=True)
        check_range("train", "min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check_range("train", "weight_decay", self.weight_decay, 0.0)
        check_range("train", "max_grad_norm", self.max_grad_norm, 0.0)
        check_range("train", "reg_weight", self.reg_weight, 0.0)
        if self.reg_weight_planning is not None:
            if self.regularizer not in ("soft_mean", "hard_ste"):
                raise ConfigError(
                    f"train.reg_weight_planning needs a per-row regulariser (soft_mean or hard_ste), "
                    f"not train.regularizer={self.regularizer!r}"
                )
        check_range("train", "bce_weight", self.bce_weight, 0.0)
        if not self.router_lm_grad and self.regularizer in ("hard_ste", "budget"):
            raise ConfigError(
                f"train.router_lm_grad=false leaves train.regularizer={self.regularizer!r} without a gradient (it "
                "penalises the hard gate, whose gradient is the straight-through one): use soft_mean or none"
            )
        if not self.router_lm_grad and self.router_loss == "oracle":
            raise ConfigError("train.router_loss=oracle measures skip costs through the straight-through gate: it "
                              "needs train.router_lm_grad=true")
        check_range("train", "oracle_skip_tool", self.oracle_skip_tool, 0.0, 1.0)
        check_range("train", "oracle_calibration_steps", self.oracle_calibration_steps, 1)
        check_range("train", "bridge_calibration_steps", self.bridge_calibration_steps, 0)
        if self.oracle_source == "fixed":
            blocks = self.oracle_skip_blocks
            if not blocks or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in blocks):
                raise ConfigError("train.oracle_source=fixed needs train.oracle_skip_blocks: a non-empty list of block "
                                  f"indices >= 0, got {blocks!r}")
        elif self.oracle_skip_blocks is not None:
            raise ConfigError("train.oracle_skip_blocks is read only with train.oracle_source=fixed "
                              f"(got train.oracle_source={self.oracle_source!r})")
        check_range("train", "oracle_skip_planning", self.oracle_skip_planning, 0.0, 1.0)
        if self.warmup_steps >= self.steps:
            raise ConfigError(f"train.warmup_steps ({self.warmup_steps}) must be < train.steps ({self.steps}); "
                              f"for a short run set both, e.g. --set train.steps={self.steps} --set train.warmup_steps=0")

    @property
    def effective_router_lr(self) -> float:
        return self.lr if self.router_lr is None else self.router_lr
