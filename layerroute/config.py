"""Typed, validated settings for every run, loaded from commented YAML plus `--set key=value` overrides.

Each section is a dataclass; every field carries a one-line description in `metadata["help"]`. Values are
checked at construction (`__post_init__`) and errors name the offending key (`router.kind`, `train.lr`, ...),
so a wrong config stops a run before any model is loaded.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import chat_template
from .errors import ConfigError


def setting(default, help: str, **kwargs):
    """A dataclass field with a one-line description (shown by `layerroute config --describe`)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


def _check_choice(section: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{section}.{name} must be one of {list(choices)}, got {value!r}")


def _check_range(section: str, name: str, value, low=None, high=None, low_open=False) -> None:
    if low is not None and (value < low or (low_open and value == low)):
        raise ConfigError(f"{section}.{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{section}.{name} must be <= {high}, got {value!r}")


@dataclass
class ModelConfig:
    """Which frozen base model to load."""

    name: str = setting(
        "smollm2-135m-instruct",
        "hub id, local folder, .gguf file, 'smollm2-135m-instruct' (packaged offline default) or 'shape:<preset>'",
    )
    dtype: str = setting("float32", "weights dtype: float32, bfloat16 or float16 (bf16 on GPU for the paper run)")
    device: str = setting("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:N'")
    attn_implementation: str = setting("sdpa", "transformers attention backend: sdpa or eager")
    seed: int = setting(0, "seed for the random weights of shape presets")
    tokenizer: str | None = setting(
        None, "tokenizer folder/name; default: the model's own (shape presets: SmolLM2's when installed)"
    )
    chat_template: str | None = setting(
        None, "chat template for a base model without one (replaces the tokenizer's own): a preset (chatml: "
        "SmolLM2's/Qwen2.5's ChatML with Hermes tools), a Jinja file, or inline Jinja; saved into the adapter",
    )

    def __post_init__(self):
        _check_choice("model", "dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _check_choice("model", "attn_implementation", self.attn_implementation, ("sdpa", "eager"))
        if not self.name:
            raise ConfigError("model.name must not be empty")
        chat_template.validate(self.chat_template)


@dataclass
class RouterConfig:
    """One router per decoder block."""

    kind: str = setting("linear", "linear = Linear(hidden, 1) as in the paper; mlp = bottleneck MLP")
    bottleneck: int = setting(64, "hidden width of the mlp router")
    pooling: str = setting(
        "mean", "how context states are pooled: mean (masked), last (last context token) or last_turn (mean over "
        "the context's last message and the assistant header, from the second-to-last turn_token)",
    )
    turn_token: str = setting("<|im_start|>", "pooling=last_turn: the token that opens a chat turn (ChatML's)")
    threshold: float = setting(0.5, "run the block when sigmoid(logit) > threshold")
    init_bias: float = setting(2.0, "initial router bias, the same for every block (sigmoid(2) = 0.88: all run)")
    init_bias_spread: float = setting(
        0.0, "spread the initial biases by block influence (ShortGPT's measure on 16 training steps): the least "
        "influential block starts at init_bias, the most influential at init_bias + spread (linear in rank); "
        "0 = uniform",
    )
    normalize_input: bool = setting(True, "RMS-normalise the pooled state (no parameters) before the router")
    bridge_rank: int = setting(
        0, "0 = a skipped block contributes nothing (the paper); r > 0 = a rank-r linear skip bridge on the block's "
        "normed input stands in for it (fitted in closed form before training, then trained with LoRA; "
        "layerroute.bridge)",
    )

    def __post_init__(self):
        _check_range("router", "bridge_rank", self.bridge_rank, 0)
        _check_choice("router", "kind", self.kind, ("linear", "mlp"))
        _check_choice("router", "pooling", self.pooling, ("mean", "last", "last_turn"))
        _check_range("router", "threshold", self.threshold, 0.0, 1.0, low_open=True)
        _check_range("router", "init_bias_spread", self.init_bias_spread, 0.0)
        _check_range("router", "bottleneck", self.bottleneck, 1)


@dataclass
class LoraSettings:
    """LoRA adapters through peft on the attention projections."""

    enabled: bool = setting(True, "train LoRA adapters (false = routers only)")
    r: int = setting(8, "LoRA rank")
    alpha: int = setting(16, "LoRA alpha (scale = alpha / r)")
    dropout: float = setting(0.05, "dropout on the LoRA input")
    targets: list = setting(["q_proj", "k_proj", "v_proj", "o_proj"], "module names that get adapters")

    def __post_init__(self):
        _check_range("lora", "r", self.r, 1)
        _check_range("lora", "dropout", self.dropout, 0.0, 1.0)
        if not self.targets or not all(isinstance(t, str) for t in self.targets):
            raise ConfigError(f"lora.targets must be a non-empty list of module names, got {self.targets!r}")


REGULARIZERS = ("soft_mean", "hard_ste", "budget", "none")
ROUTER_LOSSES = ("none", "bce", "oracle", "influence")
# router_loss=influence's sources of skip targets; the drop_* ones are static per step type (measured before training)
ORACLE_SOURCES = ("influence", "drop_nll", "drop_errors", "greedy_nll", "greedy_errors", "fixed")
STATIC_ORACLES = ("drop_nll", "drop_errors", "greedy_nll", "greedy_errors", "fixed")
GREEDY_ORACLES = ("greedy_nll", "greedy_errors")


@dataclass
class TrainConfig:
    """The optimisation run: what the loss is, how long, how fast, how often to log and save."""

    steps: int = setting(3000, "optimizer steps (each = batch_size x grad_accum x processes steps of data)")
    batch_size: int = setting(4, "steps (agent turns) per micro-batch and process")
    grad_accum: int = setting(4, "micro-batches accumulated per optimizer step")
    lr: float = setting(2e-4, "peak learning rate of the LoRA adapters")
    router_lr: float | None = setting(None, "peak learning rate of the routers (null = lr)")
    schedule: str = setting("cosine", "learning-rate schedule after warm-up: cosine (to min_lr_ratio) or constant")
    warmup_steps: int = setting(0, "linear warm-up from 0 over this many optimizer steps")
    min_lr_ratio: float = setting(0.0, "cosine ends at lr x min_lr_ratio")
    weight_decay: float = setting(0.0, "AdamW weight decay on the LoRA matrices (never on routers)")
    max_grad_norm: float = setting(1.0, "clip the global gradient norm to this (0 = no clipping)")
    clip_per_group: bool = setting(
        False, "clip LoRA's and the routers' gradient norms separately (each to max_grad_norm) instead of jointly"
    )
    seed: int = setting(0, "seeds LoRA init, data order, dropout (the data split has its own data.seed)")
    regularizer: str = setting(
        "soft_mean",
        "skip reward: soft_mean (paper: mean sigmoid prob), hard_ste (mean straight-through hard gate: the same "
        "gradient as soft_mean, only the logged value is the run-rate itself), "
        "budget ((mean run-rate - target_run_rate)^2 per micro-batch) or none",
    )
    reg_weight: float = setting(0.1, "lambda: weight of the regulariser in the loss")
    reg_weight_planning: float | None = setting(
        None, "lambda for planning rows only (soft_mean/hard_ste); null = reg_weight for every row (the paper). "
        "Tool-call rows keep reg_weight: the step-type label sets where skipping is rewarded, the routers still "
        "decide from the context alone. Negative = running blocks is rewarded on planning rows",
    )
    target_run_rate: float = setting(0.8, "budget regulariser: the run-rate (fraction of blocks run) to aim at")
    router_loss: str = setting(
        "none", "none; bce (LayerRoute-BCE: skip tool calls, run planning); oracle (first-order per-block skip "
        "costs); influence (per step: skip the oracle_skip_tool / oracle_skip_planning fraction of blocks with the "
        "lowest ShortGPT influence 1 - cos(h_in, block(h_in)) in that step's own forward)",
    )
    bce_weight: float = setting(1.0, "weight of the bce router loss")
    block_drop_rate: float = setting(
        0.0, "LayerSkip-style block dropping while training: block l dropped with prob rate*l/(L-1) (0 = off)"
    )
    block_drop_on: str = setting("all", "which steps get block dropping: all, or tool_call (planning keeps all)")
    distill_weight: float = setting(0.0, "self-distillation: weight of KL(full-depth || routed) on the step's tokens")
    distill_temperature: float = setting(1.0, "softmax temperature of the distillation KL")
    oracle_epsilon: float = setting(
        0.01, "router_loss=oracle: a block whose first-order skip cost (-dNLL/dgate, nats) is below this is a skip target"
    )
    oracle_skip_tool: float = setting(
        0.3, "router_loss=influence: fraction of blocks that are skip targets on tool-call rows (rounded per row)"
    )
    oracle_skip_planning: float = setting(0.0, "router_loss=influence: the same on planning rows")
    oracle_source: str = setting(
        "influence", "router_loss=influence: which blocks are the skip targets: influence (per step, the lowest "
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
    oracle_greedy_candidates: int = setting(
        12, "oracle_source=greedy_*: after round one (the single removals), try only this many blocks of lowest "
        "single-removal cost (0 = every block); each round costs one pass over the calibration steps per candidate",
    )
    router_lm_grad: bool = setting(
        True, "the LM (and distillation) loss reaches the routers through the straight-through gate; false = the "
        "routers learn only from the losses on their probabilities (soft_mean, bce, oracle, influence)",
    )
    prompt_full_depth: bool = setting(
        False, "each step's context runs every block; the gates skip for the step's own tokens only (train for "
        "decode-only skipping; evaluate it with eval.prompt_full_depth). drop_* costs are measured the same way",
    )
    init_lora: str | None = setting(
        None, "start LoRA from this adapter directory's LoRA instead of zero (e.g. one trained at full depth, so "
        "routed training adapts a tuned model to its skipped path); its routers are not read",
    )
    bridge_calibration_steps: int = setting(
        32, "router.bridge_rank > 0: tool-call training steps the skip bridges are fitted on (reduced-rank least "
        "squares to each block's residual update, at full depth) before training; 0 = start them at zero",
    )
    checkpoint_every: int = setting(500, "save a resumable checkpoint every N optimizer steps (0 = never)")
    keep_checkpoints: int = setting(2, "keep only the newest N checkpoints")
    log_every: int = setting(10, "one metrics record (bar + metrics.jsonl) every N optimizer steps")
    eval_every: int = setting(0, "teacher-forced val loss every N optimizer steps (0 = only at the end)")
    eval_examples: int = setting(64, "size of the val subset (half tool calls, half planning when available)")
    precision: str = setting("fp32", "fp32, or bf16 (autocast through accelerate's mixed_precision; GPU)")
    output_dir: str | None = setting(None, "where checkpoints, metrics.jsonl and adapter/ go (--output-dir wins)")
    progress: bool = setting(True, "show the tqdm progress bar")

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "eval_examples", "keep_checkpoints", "log_every"):
            _check_range("train", name, getattr(self, name), 1)
        for name in ("warmup_steps", "checkpoint_every", "eval_every"):
            _check_range("train", name, getattr(self, name), 0)
        _check_range("train", "lr", self.lr, 0.0, low_open=True)
        if self.router_lr is not None:
            _check_range("train", "router_lr", self.router_lr, 0.0, low_open=True)
        _check_choice("train", "schedule", self.schedule, ("cosine", "constant"))
        _check_range("train", "min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _check_range("train", "weight_decay", self.weight_decay, 0.0)
        _check_range("train", "max_grad_norm", self.max_grad_norm, 0.0)
        _check_choice("train", "regularizer", self.regularizer, REGULARIZERS)
        _check_range("train", "reg_weight", self.reg_weight, 0.0)
        if self.reg_weight_planning is not None:
            if self.regularizer not in ("soft_mean", "hard_ste"):
                raise ConfigError(
                    f"train.reg_weight_planning needs a per-row regulariser (soft_mean or hard_ste), "
                    f"not train.regularizer={self.regularizer!r}"
                )
        _check_range("train", "target_run_rate", self.target_run_rate, 0.0, 1.0)
        _check_choice("train", "router_loss", self.router_loss, ROUTER_LOSSES)
        _check_range("train", "bce_weight", self.bce_weight, 0.0)
        _check_choice("train", "precision", self.precision, ("fp32", "bf16"))
        _check_range("train", "block_drop_rate", self.block_drop_rate, 0.0, 1.0)
        _check_choice("train", "block_drop_on", self.block_drop_on, ("all", "tool_call"))
        _check_range("train", "distill_weight", self.distill_weight, 0.0)
        _check_range("train", "distill_temperature", self.distill_temperature, 0.0, low_open=True)
        if not self.router_lm_grad and self.regularizer in ("hard_ste", "budget"):
            raise ConfigError(
                f"train.router_lm_grad=false leaves train.regularizer={self.regularizer!r} without a gradient (it "
                "penalises the hard gate, whose gradient is the straight-through one): use soft_mean or none"
            )
        if not self.router_lm_grad and self.router_loss == "oracle":
            raise ConfigError("train.router_loss=oracle measures skip costs through the straight-through gate: it "
                              "needs train.router_lm_grad=true")
        _check_range("train", "oracle_skip_tool", self.oracle_skip_tool, 0.0, 1.0)
        _check_choice("train", "oracle_source", self.oracle_source, ORACLE_SOURCES)
        _check_range("train", "oracle_calibration_steps", self.oracle_calibration_steps, 1)
        _check_range("train", "oracle_greedy_candidates", self.oracle_greedy_candidates, 0)
        _check_range("train", "bridge_calibration_steps", self.bridge_calibration_steps, 0)
        if self.oracle_source == "fixed":
            blocks = self.oracle_skip_blocks
            if not blocks or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in blocks):
                raise ConfigError("train.oracle_source=fixed needs train.oracle_skip_blocks: a non-empty list of block "
                                  f"indices >= 0, got {blocks!r}")
        elif self.oracle_skip_blocks is not None:
            raise ConfigError("train.oracle_skip_blocks is read only with train.oracle_source=fixed "
                              f"(got train.oracle_source={self.oracle_source!r})")
        _check_range("train", "oracle_skip_planning", self.oracle_skip_planning, 0.0, 1.0)
        if self.warmup_steps >= self.steps:
            raise ConfigError(f"train.warmup_steps ({self.warmup_steps}) must be < train.steps ({self.steps})")

    @property
    def effective_router_lr(self) -> float:
        return self.lr if self.router_lr is None else self.router_lr


# ------------------------------------------------------------------------------------------------------------
# Generic construction from dicts, with type checks that name the key.


def _type_ok(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        return isinstance(value, origin)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _accepts_float(annotation) -> bool:
    if annotation is float:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return float in typing.get_args(annotation)
    return False


def from_dict(cls, data: dict | None, section: str):
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types (naming `section.key`)."""
    data = dict(data or {})
    if not isinstance(data, dict):
        raise ConfigError(f"{section} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {section}.{unknown[0]} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = from_dict(annotation, value, f"{section}.{name}")
            continue
        if _accepts_float(annotation):
            if isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            elif isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
                value = float(value)  # PyYAML reads `2e-4` (no dot) as a string: YAML 1.1's float needs one
        if not _type_ok(value, annotation):
            raise ConfigError(
                f"{section}.{name} must be of type {getattr(annotation, '__name__', annotation)}, "
                f"got {type(value).__name__} {value!r}"
            )
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{section}: {err}") from err


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


_KEY_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings (value parsed as YAML) to a raw config dict.

    List items are addressed by index: `data.sources[0].limit=50`."""
    raw = copy.deepcopy(raw)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = [int(i) if i else name for name, i in _KEY_PART.findall(key)]
        if not parts:
            raise ConfigError(f"--set {item!r}: empty key")
        node = raw
        for part, nxt in zip(parts[:-1], parts[1:], strict=True):
            if isinstance(part, int):
                if not isinstance(node, list) or part >= len(node):
                    raise ConfigError(f"--set {key}: index [{part}] does not exist")
                node = node[part]
            else:
                if not isinstance(node, dict):
                    raise ConfigError(f"--set {key}: {part} is not a section")
                if node.get(part) is None:
                    node[part] = [] if isinstance(nxt, int) else {}
                node = node[part]
        last, value = parts[-1], yaml.safe_load(text)
        if isinstance(last, int):
            if not isinstance(node, list) or last >= len(node):
                raise ConfigError(f"--set {key}: index [{last}] does not exist")
            node[last] = value
        else:
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: the parent of {last} is not a section")
            node[last] = value
    return raw


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    with path.open() as fh:
        raw = yaml.safe_load(fh) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def describe(cls, section: str) -> list[str]:
    """One line per field: `section.name = default  # help`."""
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        lines.append(f"{section}.{f.name} = {default!r}  # {f.metadata.get('help', '')}")
    return lines


# ------------------------------------------------------------------------------------------------------------
# A whole run: every section of one YAML file.

@dataclass
class EvalConfig:
    """How much to evaluate (CPU-sized defaults; raise them on a GPU)."""

    batch_size: int = setting(4, "steps per teacher-forced batch")
    max_steps_per_type: int = setting(64, "cap on eval steps per step type, in each split (0 = all)")
    accuracy_steps_per_type: int | dict = setting(
        12, "steps per type scored by free-running generation (0 = skip); a mapping sets each type apart, e.g. "
        "{tool_call: 48, planning: 4}. Drawn from the perplexity sample when it holds that many, else from the "
        "whole eval split (so accuracy can use far more steps than the teacher-forced passes)",
    )
    accuracy_length_matched_per_type: int | dict = setting(
        0, "length-matched steps per type also scored by free-running generation (0 = none; a mapping as above). "
        "Drawn from the whole length-matched split; a step in both draws is generated once",
    )
    accuracy_configs: list = setting(
        ["base", "lora_full_depth", "routed", "shortgpt"],
        "configurations scored by free-running generation (shortgpt and random need eval.baselines)",
    )
    max_new_tokens_tool: int = setting(96, "generation budget for a tool-call step")
    max_new_tokens_planning: int = setting(256, "generation budget for a planning step")
    thresholds: list = setting([0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], "gate thresholds of the sweep ([] = skip)")
    baselines: bool = setting(True, "evaluate the ShortGPT and random-skip baselines at equal FLOPs")
    calibration_steps: int = setting(32, "training steps used to measure ShortGPT block influence")
    bootstrap: int = setting(1000, "bootstrap resamples for the differential's confidence interval")
    kv_policy: str = setting("exact", "cache policy counted in FLOPs and used in generation")
    prompt_full_depth: bool = setting(
        False, "routed (and equal-FLOP baseline) configurations run each step's context through every block and "
        "skip for the step's own tokens only (FLOPs counted so): a diagnostic of where skipping hurts",
    )
    seed: int = setting(0, "seed for sampling steps, random-skip patterns and the bootstrap")

    def __post_init__(self):
        _check_range("eval", "batch_size", self.batch_size, 1)
        _check_choice("eval", "kv_policy", self.kv_policy, ("exact", "kv_preserving"))
        if any(not 0 < t < 1 for t in self.thresholds):
            raise ConfigError(f"eval.thresholds must lie in (0, 1), got {self.thresholds}")
        for name in ("accuracy_steps_per_type", "accuracy_length_matched_per_type"):
            _check_counts_per_type(name, getattr(self, name))
        for c in self.accuracy_configs:
            _check_choice("eval", "accuracy_configs", c, ("base", "lora_full_depth", "routed", "shortgpt", "random"))

    def accuracy_steps(self, step_type: str, split: str = "full") -> int:
        """Steps of this type scored by free-running generation in the draw of `split` (full or length_matched)."""
        counts = self.accuracy_steps_per_type if split == "full" else self.accuracy_length_matched_per_type
        return counts.get(step_type, 0) if isinstance(counts, dict) else counts


def _check_counts_per_type(name: str, counts) -> None:
    """A count >= 0, or a mapping of step type to such counts (eval.accuracy_* settings)."""
    if isinstance(counts, dict):
        unknown = sorted(set(counts) - {"tool_call", "planning"})
        if unknown:
            hint = " (YAML needs a space after the colon: {tool_call: 48})" if ":" in unknown[0] else ""
            raise ConfigError(f"eval.{name}: unknown step type {unknown[0]!r} (known: tool_call, planning){hint}")
        values = list(counts.values())
    else:
        values = [counts]
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in values):
        raise ConfigError(f"eval.{name} must be counts >= 0, got {counts!r}")


RUN_SECTIONS = ("model", "router", "lora", "data", "train", "eval")


def _data_config_class():
    """The data section's dataclass lives with the data module (layerroute.data.config)."""
    try:
        from .data.config import DataConfig
    except ModuleNotFoundError as err:  # pragma: no cover - only while the data module is not there
        if err.name and err.name.startswith("layerroute"):
            return None
        raise
    return DataConfig


@dataclass
class RunConfig:
    """One training run: model, router, lora, data and train sections of a YAML file."""

    model: ModelConfig = setting(None, "the frozen base model")
    router: RouterConfig = setting(None, "one router per block")
    lora: LoraSettings = setting(None, "LoRA adapters")
    data: Any = setting(None, "step data (layerroute.data.config.DataConfig)")
    train: TrainConfig = setting(None, "the optimisation run")
    eval: EvalConfig = setting(None, "evaluation after training (layerroute eval, make demo)")

    def __post_init__(self):
        self.model = self.model or ModelConfig()
        self.router = self.router or RouterConfig()
        self.lora = self.lora or LoraSettings()
        self.train = self.train or TrainConfig()
        self.eval = self.eval or EvalConfig()
        if self.data is None:
            data_cls = _data_config_class()
            self.data = data_cls() if data_cls is not None else {}

    @classmethod
    def from_dict(cls, raw: dict) -> RunConfig:
        """Validate every section (unknown sections/keys and wrong types named) without loading anything."""
        if not isinstance(raw, dict):
            raise ConfigError(f"a run config must be a mapping of sections, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(RUN_SECTIONS))
        if unknown:
            raise ConfigError(f"unknown section {unknown[0]!r} (known: {', '.join(RUN_SECTIONS)})")
        for name in RUN_SECTIONS:
            if raw.get(name) is not None and not isinstance(raw[name], dict):
                raise ConfigError(f"section {name} must be a mapping of keys, got {type(raw[name]).__name__}")
        data_cls = _data_config_class()
        data = raw.get("data") or {}
        return cls(
            model=from_dict(ModelConfig, raw.get("model"), "model"),
            router=from_dict(RouterConfig, raw.get("router"), "router"),
            lora=from_dict(LoraSettings, raw.get("lora"), "lora"),
            data=data_cls.from_dict(data) if data_cls is not None else dict(data),
            train=from_dict(TrainConfig, raw.get("train"), "train"),
            eval=from_dict(EvalConfig, raw.get("eval"), "eval"),
        )

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> RunConfig:
        """Read a YAML run config and apply `section.key=value` overrides; errors name the key."""
        return cls.from_dict(apply_overrides(load_yaml(path), overrides or []))

    def to_dict(self) -> dict:
        out = {}
        for name in RUN_SECTIONS:
            value = getattr(self, name)
            if dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            out[name] = value
        return out
