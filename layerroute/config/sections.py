"""The model, router, lora and eval sections of a run config (train: config/train.py; data: data/config.py).

Each section is a dataclass; every field carries a one-line description in `metadata["help"]`. Values are
checked at construction (`__post_init__`) and errors name the offending key (`router.kind`, `eval.kv_policy`, ...),
so a wrong config stops a run before any model is loaded.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal, get_args

from .. import chat_template
from ..errors import ConfigError
from .experimental import GROUP_HELP, REJECTED, RouterExperimental, renamed_keys
from .fields import check_choices, check_range, group, setting

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES = get_args(Dtype)  # the choices of every --dtype flag (config/flags.py; default auto)
AttnImplementation = Literal["sdpa", "eager"]
RouterKind = Literal["linear", "mlp"]
Pooling = Literal["mean", "last", "last_turn"]
KvPolicy = Literal["exact", "kv_preserving"]
AccuracyConfiguration = Literal["base", "lora_full_depth", "routed", "routed_no_lora", "shortgpt", "random"]

@dataclass
class ModelConfig:
    """Which frozen base model to load."""

    name: str = setting(
        "smollm2-135m-instruct",
        "hub id, local folder, .gguf file, 'smollm2-135m-instruct' (packaged offline default) or 'shape:<preset>'",
    )
    dtype: Dtype = setting(
        "auto", "frozen weights' dtype: auto (bfloat16 where bf16 matmuls are native: CUDA with bf16, a CPU with "
        "AVX-512 BF16 or AMX; else float32: emulated bf16 is ~40x slower), float32, bfloat16 or float16; the dtype "
        "used is recorded (run config, adapter). LoRA, routers, skip bridges and their optimizer state stay fp32 "
        "(docs/results/bf16.md)")
    device: str = setting("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:N'")
    attn_implementation: AttnImplementation = setting("sdpa", "transformers attention backend: sdpa or eager")
    seed: int = setting(0, "seed for the random weights of shape presets")
    tokenizer: str | None = setting(
        None, "tokenizer folder/name; default: the model's own (shape presets: SmolLM2's when installed)"
    )
    chat_template: str | None = setting(
        None, "chat template for a base model without one (replaces the tokenizer's own): a preset (chatml: "
        "SmolLM2's/Qwen2.5's ChatML with Hermes tools), a Jinja file, or inline Jinja; saved into the adapter",
    )
    plain_text_tokens: list = setting(
        [], "added tokens to encode as ordinary text (their BPE pieces) everywhere text becomes ids, e.g. "
        "['<tool_call>', '</tool_call>'] for a model whose rows for those added tokens are untrained; decoded text "
        "is unchanged (layerroute.tokenizer)",
    )

    def __post_init__(self):
        check_choices(self, "model")
        plain = self.plain_text_tokens
        if not isinstance(plain, list) or not all(isinstance(t, str) and t for t in plain) or len(set(plain)) != len(plain):
            raise ConfigError(
                f"model.plain_text_tokens must be a list of distinct non-empty strings, got {self.plain_text_tokens!r}"
            )
        if not self.name:
            raise ConfigError("model.name must not be empty")
        chat_template.validate(self.chat_template)


@dataclass
class RouterConfig:
    """One router per decoder block."""

    # old places of keys, still read (adapters' layerroute.json written before router.experimental)
    RENAMED_KEYS: typing.ClassVar[dict] = renamed_keys(RouterExperimental)

    kind: RouterKind = setting(
        "linear", f"linear = Linear(hidden, 1) as in the paper; mlp = bottleneck MLP ({REJECTED}: "
        "experiments/mlp_router.yaml)")
    pooling: Pooling = setting(
        "mean", "how context states are pooled: mean (masked), last (last context token) or last_turn (mean over "
        "the context's last message and the assistant header, from the second-to-last turn_token); last and "
        f"last_turn were {REJECTED}: experiments/pool_last*.yaml",
    )
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
        "layerroute.nn.bridge)",
    )

    # ---- the options of recipes the ablation rejected: router.experimental.* (config/experimental.py) ----
    experimental: RouterExperimental = group(RouterExperimental, GROUP_HELP)

    def __post_init__(self):
        check_choices(self, "router")
        check_range("router", "bridge_rank", self.bridge_rank, 0)
        check_range("router", "threshold", self.threshold, 0.0, 1.0, low_open=True)
        check_range("router", "init_bias_spread", self.init_bias_spread, 0.0)


@dataclass
class LoraSettings:
    """LoRA adapters through peft on the attention projections."""

    enabled: bool = setting(True, "train LoRA adapters (false = routers only)")
    r: int = setting(8, "LoRA rank")
    alpha: int = setting(16, "LoRA alpha (scale = alpha / r)")
    dropout: float = setting(0.05, "dropout on the LoRA input")
    targets: list = setting(["q_proj", "k_proj", "v_proj", "o_proj"], "module names that get adapters")

    def __post_init__(self):
        check_range("lora", "r", self.r, 1)
        check_range("lora", "dropout", self.dropout, 0.0, 1.0)
        if not self.targets or not all(isinstance(t, str) for t in self.targets):
            raise ConfigError(f"lora.targets must be a non-empty list of module names, got {self.targets!r}")


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
    accuracy_configs: list[AccuracyConfiguration] = setting(
        ["base", "lora_full_depth", "routed", "shortgpt"],
        "configurations scored by free-running generation (shortgpt and random need eval.baselines; "
        "routed_no_lora = the routers without LoRA)",
    )
    accuracy_batch_size: int = setting(
        8, "steps generated together in free-running accuracy (length-sorted, left-padded; each row keeps its "
        "own gates, stop tokens and budget); 1 = one at a time. Same greedy outputs up to float order",
    )
    accuracy_planning_sources: list = setting(
        [], "data sources (labels) the planning steps of free-running accuracy are drawn from ([] = every "
        "planning step), e.g. [gsm8k_test] for real GSM8K test problems only",
    )
    accuracy_teacher_forced: bool = setting(
        True, "also teacher-force each generated step (one forward more per step and configuration) to check "
        "the cheap teacher-forced exact rate against real generations",
    )
    max_new_tokens_tool: int = setting(96, "generation budget for a tool-call step")
    max_new_tokens_planning: int = setting(256, "generation budget for a planning step")
    thresholds: list = setting([0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], "gate thresholds of the sweep ([] = skip)")
    baselines: bool = setting(True, "evaluate the ShortGPT and random-skip baselines at equal FLOPs")
    calibration_steps: int = setting(32, "training steps used to measure ShortGPT block influence")
    bootstrap: int = setting(1000, "bootstrap resamples for the differential's confidence interval")
    kv_policy: KvPolicy = setting("exact", "cache policy counted in FLOPs and used in generation")
    prompt_full_depth: bool = setting(
        False, "routed (and equal-FLOP baseline) configurations run each step's context through every block and "
        "skip for the step's own tokens only (FLOPs counted so): a diagnostic of where skipping hurts",
    )
    constrained: bool = setting(
        False, "free-running accuracy decodes each tool-call step under its tools' grammar (xgrammar: a call of an "
        "offered function with schema-valid arguments, then end of turn; layerroute/infer/constrain.py)",
    )
    drafts: list = setting(
        [], "free-running accuracy decodes each step alone with these lossless drafters (grammar, lookup, suffix: "
        "layerroute/infer/drafts.py), verified in one forward: the same greedy tokens in fewer forwards. [] = off "
        "(batched: on this CPU batches of 8 gave 2.5x the steps per CPU-minute, drafts 1.75x)",
    )
    seed: int = setting(0, "seed for sampling steps, random-skip patterns and the bootstrap")

    def __post_init__(self):
        known = ("grammar", "lookup", "suffix")
        if not isinstance(self.drafts, list) or any(d not in known for d in self.drafts):
            raise ConfigError(f"eval.drafts must be a list of {', '.join(known)}, got {self.drafts!r}")
        check_range("eval", "batch_size", self.batch_size, 1)
        check_range("eval", "accuracy_batch_size", self.accuracy_batch_size, 1)
        if not all(isinstance(s, str) and s for s in self.accuracy_planning_sources):
            raise ConfigError(f"eval.accuracy_planning_sources must be source labels, got {self.accuracy_planning_sources!r}")
        if any(not 0 < t < 1 for t in self.thresholds):
            raise ConfigError(f"eval.thresholds must lie in (0, 1), got {self.thresholds}")
        for name in ("accuracy_steps_per_type", "accuracy_length_matched_per_type"):
            _check_counts_per_type(name, getattr(self, name))
        check_choices(self, "eval")

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
