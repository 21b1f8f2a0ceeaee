#!/usr/bin/env bash
# The offline ablation of RESULTS.md (issues 5 and 8): every recipe x seed trained for 50 steps on the offline
# config, evaluated with the same reduced harness, then one table. Each recipe is an overlay file,
# experiments/<recipe>.yaml, over the current configs/offline-smollm2.yaml (whose default is `bridge_drop_nll_stopgrad`;
# before session 7 `drop_nll_stopgrad`) that names every key the recipe sets (the non-bridge recipes pin
# router.bridge_rank=0; the bridge_* recipes set 16), read by `layerroute train --overlay`.
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
# the recipes: experiments/<recipe>.yaml, overlays of configs/offline-smollm2.yaml naming every key the recipe sets
# (experiments/README.md: what each is and its verdict); the warm_* recipes also start LoRA from the lora_only run of
# the same seed (train.experimental.init_lora, added below: a path under $OUT)
RECIPES=experiments
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
  [ -f "$RECIPES/$name.yaml" ] || {
    echo "unknown recipe $name (known: $(cd "$RECIPES" && ls -- *.yaml | sed 's/\.yaml$//' | tr '\n' ' '))" >&2; exit 2; }
  dir=$OUT/$name-s$seed
  if [ ! -f "$dir/train/adapter/layerroute.json" ]; then
    resume=(); [ -d "$dir/train/checkpoints" ] && resume=(--resume)
    warm=(); [[ $name == warm_* ]] && warm=(--set "train.experimental.init_lora=$OUT/lora_only-s$seed/train/adapter")
    "$BIN/layerroute" train --config configs/offline-smollm2.yaml --overlay "$RECIPES/$name.yaml" "${warm[@]}" \
      --set train.seed="$seed" --set train.progress=false --output-dir "$dir/train" "${resume[@]}"
  fi
  if [ ! -f "$dir/$EVAL_DIR/eval.json" ]; then
    # shellcheck disable=SC2086
    "$BIN/layerroute" eval --config configs/offline-smollm2.yaml --adapter "$dir/train/adapter" $EVAL \
      --output-dir "$dir/$EVAL_DIR"
  fi
done
table
