#!/usr/bin/env bash
# The offline ablation of RESULTS.md (issues 5 and 8): every recipe x seed trained for 50 steps on the offline
# config, evaluated with the same reduced harness, then one table. Recipes are written as overrides of the current
# configs/offline-smollm2.yaml (whose default is `bridge_drop_nll_stopgrad`; before session 7 `drop_nll_stopgrad`),
# so each line names its whole recipe (the base strings pin router.bridge_rank=0; the bridge_* recipes set 16).
#
#   benchmarks/ablation_offline.sh                       # everything (~18 min per recipe x seed on 2 cores)
#   benchmarks/ablation_offline.sh plus:0 plus:1         # some recipe:seed pairs only
#   benchmarks/ablation_offline.sh --table               # only the table, from the finished evaluations
#   benchmarks/ablation_offline.sh --accuracy [PAIRS]    # + tool-call accuracy on 48 steps
#                                                        #   (LoRA full depth vs routed, paired) in <run>/eval_accuracy
#   benchmarks/ablation_offline.sh --splits [PAIRS]      # + free-running accuracy on each split's own draw
#                                                        #   (full: 32 tool-call / 8 planning steps; length-matched:
#                                                        #   all 47 tool-call / 8 planning), LoRA full depth, routed
#                                                        #   and both equal-FLOP baselines, in <run>/eval_splits
#                                                        #   (the table keeps the seeds of the committed
#                                                        #   benchmarks/results/ablation_splits_offline.json)
#   benchmarks/ablation_offline.sh --prompt-full-depth [PAIRS]  # the same, with each step's context run
#                                                        #   through every block (skipping for the step's own tokens
#                                                        #   only), in <run>/eval_accuracy_prompt_full_depth
#
# Runs go to runs/ablation/<recipe>-s<seed>/{train,eval}; finished parts are skipped, so it can be re-run after an
# interruption (an interrupted training resumes from its last checkpoint, an interrupted evaluation from the stages
# it finished: <run>/<eval dir>/partial/, since session 11). One thread per job: on 2 cores run two
# copies with different pairs rather than one with two threads.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-runs/ablation}
SPLITS_KEPT=${SPLITS_KEPT:-benchmarks/results/ablation_splits_offline.json}
EVAL="--set eval.thresholds=[] --set eval.max_steps_per_type=12 --set eval.accuracy_steps_per_type=4"
# the same harness with free-running tool-call accuracy on 48 steps drawn from the whole eval split (317 tool-call
# steps: 242 BFCL live_*, 75 held-out steps of the seen categories), scored for LoRA full depth and routed only (the
# pair the accuracy target compares, step by step)
ACC_EVAL="$EVAL --set eval.accuracy_steps_per_type={\"tool_call\":48,\"planning\":4} --set eval.accuracy_configs=[lora_full_depth,routed]"
# the same harness with free-running accuracy on both splits (issue 8's table: BFCL AST on the unseen live_* steps
# and GSM8K-style exact match, full and length-matched), each split from its own draw, a step in both generated once
# per configuration; base is left out (LoRA off and every block open: the same for every adapter)
SPLIT_EVAL="$EVAL --set eval.accuracy_steps_per_type={\"tool_call\":32,\"planning\":8} --set eval.accuracy_length_matched_per_type={\"tool_call\":47,\"planning\":8} --set eval.accuracy_configs=[lora_full_depth,routed,shortgpt,random]"
# plus, the offline default before influence_stopgrad: a per-step-type penalty (lambda 4 on tool calls, -1 on
# planning), the LM loss reaching the routers through the straight-through gate, router lr 1e-3
PLUS="--set router.bridge_rank=0 --set train.regularizer=hard_ste --set train.reg_weight=4.0 --set train.reg_weight_planning=-1.0 --set train.router_loss=none --set train.bce_weight=1.0 --set train.router_lr=1e-3 --set train.router_lm_grad=true"
# the paper-style recipe (lambda 0.3 on every row, uniform router init, one joint gradient clip)
PAPER="$PLUS --set train.reg_weight=0.3 --set train.reg_weight_planning=null --set train.clip_per_group=false --set router.init_bias_spread=0"
# supervised routers: per-step influence targets, 30% of the blocks on tool calls (drop_nll_stopgrad, the current
# default, swaps in static targets from measured removal costs)
INFL="--set router.bridge_rank=0 --set train.regularizer=none --set train.reg_weight=0 --set train.reg_weight_planning=null --set train.router_loss=influence --set train.bce_weight=2.0 --set train.oracle_skip_tool=0.3 --set train.router_lm_grad=false --set train.router_lr=3e-3 --set train.oracle_source=influence"
declare -A RECIPE=(
  [paper_soft_mean]="$PAPER --set train.regularizer=soft_mean"
  [hard_ste]="$PAPER --set train.regularizer=hard_ste"
  [budget]="$PAPER --set train.regularizer=budget"
  [drop_distill]="$PAPER --set train.block_drop_rate=0.3 --set train.block_drop_on=tool_call --set train.distill_weight=1.0"
  [typed1]="$PAPER --set train.reg_weight=1.0 --set train.reg_weight_planning=0.0"
  [typed3]="$PAPER --set train.reg_weight=3.0 --set train.reg_weight_planning=0.0"
  [typed1_pgclip]="$PAPER --set train.reg_weight=1.0 --set train.reg_weight_planning=0.0 --set train.clip_per_group=true"
  [typed1_pgclip_spread]="$PAPER --set train.reg_weight=1.0 --set train.reg_weight_planning=0.0 --set train.clip_per_group=true --set router.init_bias_spread=2.0"
  [typed2_neg_pgclip_spread]="$PLUS --set train.reg_weight=2.0"
  [plus]="$PLUS"
  # each of issue 8's options alone on top of the paper recipe
  [block_drop]="$PAPER --set train.regularizer=soft_mean --set train.block_drop_rate=0.3 --set train.block_drop_on=tool_call"
  [distill]="$PAPER --set train.regularizer=soft_mean --set train.distill_weight=1.0"
  [oracle_first_order]="$PAPER --set train.regularizer=soft_mean --set train.router_loss=oracle"
  [mlp_router]="$PAPER --set train.regularizer=soft_mean --set router.kind=mlp"
  # supervised routers: per-step ShortGPT-influence skip targets (30% of the blocks on tool calls, none on
  # planning), no skip penalty; per-group clip and influence-ordered init as in plus; first with the LM loss
  # reaching the routers (router lr 1e-3) ...
  [influence_oracle]="$INFL --set train.router_lm_grad=true --set train.router_lr=1e-3"
  # ... and the LM loss kept away from the routers (they learn from the targets alone), router lr 3e-3
  [influence_stopgrad]="$INFL"
  [influence_stopgrad_kd]="$INFL --set train.distill_weight=1.0"
  [influence_stopgrad_150steps]="$INFL --set train.steps=150"
  # static per-type targets: the 9 blocks whose single removal costs least NLL on 8 tool-call training steps
  [drop_nll_stopgrad]="$INFL --set train.oracle_source=drop_nll --set train.oracle_calibration_steps=8"
  # ... with fewer blocks skipped on tool calls (6 and 3 of 30): where does routed tool-call accuracy hold?
  [drop_nll_stopgrad_skip20]="$INFL --set train.oracle_source=drop_nll --set train.oracle_calibration_steps=8 --set train.oracle_skip_tool=0.2"
  [drop_nll_stopgrad_skip10]="$INFL --set train.oracle_source=drop_nll --set train.oracle_calibration_steps=8 --set train.oracle_skip_tool=0.1"
  # ... trained for decode-only skipping: each step's context runs every block, the 9 blocks skip the step's own
  # tokens only (drop_nll costs measured the same way); evaluated with --prompt-full-depth
  [drop_nll_stopgrad_prompt_full]="$INFL --set train.oracle_source=drop_nll --set train.oracle_calibration_steps=8 --set train.prompt_full_depth=true"
  # the same static targets ranked by what greedy decoding needs: the blocks whose single removal adds the fewest
  # token errors (targets that are no longer the argmax given the gold prefix; NLL breaks ties), 9 and 3 blocks
  [drop_errors_stopgrad]="$INFL --set train.oracle_source=drop_errors --set train.oracle_calibration_steps=8"
  [drop_errors_stopgrad_skip10]="$INFL --set train.oracle_source=drop_errors --set train.oracle_calibration_steps=8 --set train.oracle_skip_tool=0.1"
  # the 3 blocks grown one at a time, each the one whose removal together with those already chosen adds the fewest
  # token errors (12 candidates after round one), on 16 calibration steps instead of 8 (token errors are counts)
  [greedy_errors_stopgrad_skip10]="$INFL --set train.oracle_source=greedy_errors --set train.oracle_calibration_steps=16 --set train.oracle_skip_tool=0.1"
  # the 3-block drop_errors recipe warm-started from the full-depth LoRA of the same seed (lora_only, trained first):
  # 50 more steps adapt a tuned model to its skipped path (@SEED@ is the seed; costs are measured on that LoRA)
  [warm_drop_errors_stopgrad_skip10]="$INFL --set train.oracle_source=drop_errors --set train.oracle_calibration_steps=8 --set train.oracle_skip_tool=0.1 --set train.init_lora=$OUT/lora_only-s@SEED@/train/adapter"
  # ... and with the cold recipe's blocks [10, 21, 25] fixed, so that only the warm start differs from
  # drop_errors_stopgrad_skip10 (the warm LoRA's own costs chose early blocks, 4, 5, 7, in seed 0)
  [warm_fixed_stopgrad_skip10]="$INFL --set train.oracle_source=fixed --set train.oracle_skip_blocks=[10,21,25] --set train.init_lora=$OUT/lora_only-s@SEED@/train/adapter"
  # ... trained 4x as long (200 steps) on the fixed skipped path: does the gap to full depth close with training?
  [warm_fixed_stopgrad_skip10_200steps]="$INFL --set train.oracle_source=fixed --set train.oracle_skip_blocks=[10,21,25] --set train.init_lora=$OUT/lora_only-s@SEED@/train/adapter --set train.steps=200"
  # skip bridges (router.bridge_rank 16): each block gets a rank-16 linear stand-in, fitted in closed form on 32
  # tool-call training steps before training (the drop_* costs are then measured with the bridges in place) and
  # trained with LoRA where its block is skipped; 3 blocks (as drop_errors_stopgrad_skip10) and 9 (as the default)
  [bridge_drop_errors_stopgrad_skip10]="$INFL --set train.oracle_source=drop_errors --set train.oracle_calibration_steps=8 --set train.oracle_skip_tool=0.1 --set router.bridge_rank=16"
  [bridge_drop_nll_stopgrad]="$INFL --set train.oracle_source=drop_nll --set train.oracle_calibration_steps=8 --set router.bridge_rank=16"
  # ... warm-started from the full-depth LoRA of the same seed (bridges fitted on it, costs measured with them)
  [warm_bridge_drop_errors_stopgrad_skip10]="$INFL --set train.oracle_source=drop_errors --set train.oracle_calibration_steps=8 --set train.oracle_skip_tool=0.1 --set router.bridge_rank=16 --set train.init_lora=$OUT/lora_only-s@SEED@/train/adapter"
  # bridge_drop_nll_stopgrad (the default) trained 4x as long (200 steps): bridges and more steps on the skipped path
  # together, at the default's 9 blocks (session 8)
  [bridge_drop_nll_stopgrad_200steps]="$INFL --set train.oracle_source=drop_nll --set train.oracle_calibration_steps=8 --set router.bridge_rank=16 --set train.steps=200"
  # bridge_drop_nll_stopgrad with the 9 blocks grown one at a time (each the block whose removal together with those
  # already chosen, bridges in place, adds the least NLL on the same 8 calibration steps) instead of the 9 cheapest
  # single removals (session 8)
  [bridge_greedy_nll_stopgrad]="$INFL --set train.oracle_source=greedy_nll --set train.oracle_calibration_steps=8 --set router.bridge_rank=16"
  # the accuracy reference: the same training with no block ever a skip target (routers taught to stay open), so
  # LoRA is trained at full depth only, not for a skipped path too
  [lora_only]="$INFL --set train.oracle_skip_tool=0.0"
  # ... trained 200 steps: the reference for the 200-step recipes (same number of LoRA updates)
  [lora_only_200steps]="$INFL --set train.oracle_skip_tool=0.0 --set train.steps=200"
  # router capacity, pooling: the last context token instead of the masked mean (on the paper recipe, like mlp_router)
  [pool_last]="$PAPER --set train.regularizer=soft_mean --set router.pooling=last"
  # ... and the mean over the context's last turn (the newest message and the assistant header)
  [pool_last_turn]="$PAPER --set train.regularizer=soft_mean --set router.pooling=last_turn"
)
# recipe:seed pairs in RESULTS.md (hard_ste: one seed, because its gradient is soft_mean's: bit-identical adapters)
ALL="paper_soft_mean:0 paper_soft_mean:1 paper_soft_mean:2 hard_ste:0 budget:0 budget:1 budget:2 drop_distill:0
typed1:0 typed3:0 typed1_pgclip:0 typed1_pgclip_spread:0 typed2_neg_pgclip_spread:0 plus:0 plus:1 plus:2
block_drop:0 oracle_first_order:0 mlp_router:0 influence_oracle:0 influence_stopgrad:0 influence_stopgrad:1
influence_stopgrad:2 influence_stopgrad_kd:0 drop_nll_stopgrad:0 drop_nll_stopgrad:1 drop_nll_stopgrad:2
influence_stopgrad_150steps:0 block_drop:1 block_drop:2 oracle_first_order:1 oracle_first_order:2 mlp_router:1
distill:0 pool_last:0 mlp_router:2 pool_last_turn:0 pool_last_turn:1 pool_last_turn:2 pool_last:1 distill:1
pool_last:2 distill:2 bridge_drop_nll_stopgrad:0 bridge_drop_nll_stopgrad:1 bridge_drop_nll_stopgrad:2
bridge_drop_errors_stopgrad_skip10:0 warm_fixed_stopgrad_skip10_200steps:0 warm_bridge_drop_errors_stopgrad_skip10:0
bridge_drop_nll_stopgrad_200steps:0 lora_only_200steps:0 bridge_greedy_nll_stopgrad:0"
# the pairs that `--accuracy` (48 tool-call steps) and `--prompt-full-depth` evaluate when none are named (RESULTS.md,
# session 4)
ACCURACY_PAIRS="drop_nll_stopgrad:0 drop_nll_stopgrad_skip20:0 drop_nll_stopgrad_skip10:0 paper_soft_mean:0
drop_errors_stopgrad_skip10:0 drop_errors_stopgrad:0 lora_only:0 drop_errors_stopgrad_skip10:1
lora_only:1 drop_errors_stopgrad_skip10:2 greedy_errors_stopgrad_skip10:0 warm_drop_errors_stopgrad_skip10:0
warm_fixed_stopgrad_skip10:0 warm_fixed_stopgrad_skip10:1"
# (trains the recipes that are not there first, lora_only:N before warm_*:N; session 5 added drop_errors_*,
# lora_only:0; session 6 the rest)
PROMPT_PAIRS="drop_nll_stopgrad:0 drop_nll_stopgrad_skip10:0 drop_nll_stopgrad_prompt_full:0"
# the pairs that `--splits` evaluates when none are named (session 9): the paper's recipe and the default, 3 seeds
SPLIT_PAIRS="paper_soft_mean:0 bridge_drop_nll_stopgrad:0 paper_soft_mean:1 bridge_drop_nll_stopgrad:1
paper_soft_mean:2 bridge_drop_nll_stopgrad:2"

table() {
  # one table per kind of evaluation: eval/ -> table, eval_accuracy/ -> table_accuracy (48 tool-call steps per
  # seed), eval_accuracy_prompt_full_depth/ -> table_prompt_full_depth, eval_splits/ -> table_splits
  local kind args name
  for kind in eval:table eval_accuracy:table_accuracy eval_accuracy_prompt_full_depth:table_prompt_full_depth \
              eval_splits:table_splits; do
    args=()
    for name in paper_soft_mean hard_ste budget block_drop distill drop_distill oracle_first_order mlp_router typed1 \
                typed3 typed1_pgclip typed1_pgclip_spread typed2_neg_pgclip_spread plus influence_oracle \
                influence_stopgrad influence_stopgrad_kd drop_nll_stopgrad influence_stopgrad_150steps \
                drop_nll_stopgrad_skip20 drop_nll_stopgrad_skip10 drop_nll_stopgrad_prompt_full pool_last \
                drop_errors_stopgrad drop_errors_stopgrad_skip10 greedy_errors_stopgrad_skip10 \
                warm_drop_errors_stopgrad_skip10 warm_fixed_stopgrad_skip10 warm_fixed_stopgrad_skip10_200steps lora_only \
                pool_last_turn bridge_drop_errors_stopgrad_skip10 bridge_drop_nll_stopgrad \
                warm_bridge_drop_errors_stopgrad_skip10 bridge_drop_nll_stopgrad_200steps lora_only_200steps \
                bridge_greedy_nll_stopgrad; do
      compgen -G "$OUT/$name-s*/${kind%%:*}/eval.json" > /dev/null &&
        args+=(--recipe "$name=$OUT/$name-s*/${kind%%:*}/eval.json")
    done
    # the splits table grows on the committed one (per-seed rows; the runs behind them are not kept between
    # machines): a seed evaluated again replaces its row. Copy the new ablation.json back to keep what was added.
    if [ "${kind%%:*}" = eval_splits ] && [ -f "$SPLITS_KEPT" ]; then args+=(--include "$SPLITS_KEPT"); fi
    if [ ${#args[@]} -gt 0 ]; then "$BIN/layerroute" ablation "${args[@]}" --output-dir "$OUT/${kind##*:}"; fi
  done
}

if [ "${1:-}" = "--table" ]; then table; exit 0; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
EVAL_DIR=eval
if [ "${1:-}" = "--accuracy" ]; then shift; EVAL=$ACC_EVAL; EVAL_DIR=eval_accuracy; ALL=$ACCURACY_PAIRS; fi
if [ "${1:-}" = "--splits" ]; then shift; EVAL=$SPLIT_EVAL; EVAL_DIR=eval_splits; ALL=$SPLIT_PAIRS; fi
if [ "${1:-}" = "--prompt-full-depth" ]; then
  shift; EVAL="$ACC_EVAL --set eval.prompt_full_depth=true"; EVAL_DIR=eval_accuracy_prompt_full_depth
  ALL=$PROMPT_PAIRS
fi
for pair in ${*:-$ALL}; do
  name=${pair%%:*}; seed=${pair##*:}
  [ -n "${RECIPE[$name]+x}" ] || { echo "unknown recipe $name (known: ${!RECIPE[*]})" >&2; exit 2; }
  dir=$OUT/$name-s$seed
  if [ ! -f "$dir/train/adapter/layerroute.json" ]; then
    resume=(); [ -d "$dir/train/checkpoints" ] && resume=(--resume)
    # shellcheck disable=SC2086  # the recipe is a list of --set flags
    "$BIN/layerroute" train --config configs/offline-smollm2.yaml ${RECIPE[$name]//@SEED@/$seed} --set train.seed="$seed" \
      --set train.progress=false --output-dir "$dir/train" "${resume[@]}"
  fi
  if [ ! -f "$dir/$EVAL_DIR/eval.json" ]; then
    # shellcheck disable=SC2086
    "$BIN/layerroute" eval --config configs/offline-smollm2.yaml --adapter "$dir/train/adapter" $EVAL \
      --output-dir "$dir/$EVAL_DIR"
  fi
done
table
