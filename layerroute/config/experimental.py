"""The options of the recipes the ablation rejected: `train.experimental.*` and `router.experimental.*`.

They are kept so that old adapters (their layerroute.json and the training config they store), the committed
configs and the overlays of experiments/ still load and run the same, but they are not the method: each recipe that
sets them is an overlay under experiments/ (experiments/README.md: what it is, its verdict; RESULTS.md and
docs/results/ablation.md: the figures). `layerroute config --describe` lists them after the method's settings, under
their own heading.

Each group sits inside the section whose code reads it, beside the main setting that turns it on
(`train.regularizer: budget` reads `train.experimental.target_run_rate`, `router.kind: mlp` reads
`router.experimental.bottleneck`), so a section keeps its own validation and an adapter's router section stays whole.
Before the move these keys sat directly in their section (`train.distill_weight`); `RENAMED_KEYS` (built from the
groups below) still reads them under those names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from .fields import check_choices, check_range, setting

REJECTED = "rejected by the ablation (RESULTS.md / docs/results/ablation.md)"
GROUP = "experimental"
GROUP_HELP = f"the options of recipes {REJECTED}; experiments/*.yaml set them, the method never does"

BlockDropOn = Literal["all", "tool_call"]


@dataclass
class TrainExperimental:
    """train.experimental: the training options of rejected recipes (experiments/*.yaml)."""

    target_run_rate: float = setting(
        0.8, "train.regularizer=budget (experiments/budget.yaml): the run-rate (fraction of blocks run) "
        "to aim at")
    oracle_epsilon: float = setting(
        0.01, "train.router_loss=oracle (experiments/oracle_first_order.yaml): a block whose "
        "first-order skip cost (-dNLL/dgate, nats) is below this is a skip target"
    )
    block_drop_rate: float = setting(
        0.0, "experiments/block_drop.yaml: LayerSkip-style block dropping while training: block l "
        "dropped with prob rate*l/(L-1) (0 = off)"
    )
    block_drop_on: BlockDropOn = setting(
        "all", "experiments/block_drop.yaml: which steps get block dropping: all, or tool_call "
        "(planning keeps all)")
    distill_weight: float = setting(
        0.0, "experiments/distill.yaml: self-distillation: weight of KL(full-depth || routed) on the "
        "step's tokens")
    distill_temperature: float = setting(1.0, "experiments/distill.yaml: softmax temperature of the distillation KL")
    oracle_greedy_candidates: int = setting(
        12, "train.oracle_source=greedy_* (experiments/*greedy*.yaml): after round one (the single "
        "removals), try only this many blocks of lowest single-removal cost (0 = every block); each round costs "
        "one pass over the calibration steps per candidate",
    )
    prompt_full_depth: bool = setting(
        False, "experiments/drop_nll_stopgrad_prompt_full.yaml: each step's context runs every "
        "block; the gates skip for the step's own tokens only (train for decode-only skipping; evaluate it with "
        "eval.prompt_full_depth). drop_* costs are measured the same way",
    )
    init_lora: str | None = setting(
        None, "experiments/warm_*.yaml: start LoRA from this adapter directory's LoRA instead of "
        "zero (e.g. one trained at full depth, so routed training adapts a tuned model to its skipped path); its "
        "routers are not read",
    )

    def __post_init__(self):
        section = "train." + GROUP
        check_choices(self, section)
        check_range(section, "target_run_rate", self.target_run_rate, 0.0, 1.0)
        check_range(section, "block_drop_rate", self.block_drop_rate, 0.0, 1.0)
        check_range(section, "distill_weight", self.distill_weight, 0.0)
        check_range(section, "distill_temperature", self.distill_temperature, 0.0, low_open=True)
        check_range(section, "oracle_greedy_candidates", self.oracle_greedy_candidates, 0)


@dataclass
class RouterExperimental:
    """router.experimental: the router options of rejected recipes (experiments/mlp_router.yaml, pool_last_turn)."""

    bottleneck: int = setting(64, "router.kind=mlp (experiments/mlp_router.yaml): hidden width of "
                              "the mlp router")
    turn_token: str = setting(
        "<|im_start|>", "router.pooling=last_turn (experiments/pool_last_turn.yaml): the token that "
        "opens a chat turn (ChatML's)")

    def __post_init__(self):
        check_range("router." + GROUP, "bottleneck", self.bottleneck, 1)


def renamed_keys(cls) -> dict[str, str]:
    """The old place of each setting of group `cls` (directly in its section) -> its place now."""
    return {f.name: f"{GROUP}.{f.name}" for f in dataclasses.fields(cls)}
