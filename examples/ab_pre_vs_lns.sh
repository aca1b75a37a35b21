#!/usr/bin/env bash
# A fair Pre-LN vs LNS comparison: the same model, data, recipe and seeds; the arms differ in
# --norm-scheme and --output-layer-init only (checked from each run's pretrain_config.json), then one
# summary of them all (AB_DIR/summary/summary.md, summary.json, plots) and TensorBoard side by side.
#
#   ARMS="pre:scaled pre:plain lns:plain lns:scaled" SEEDS="1 2" bash examples/ab_pre_vs_lns.sh [driver flags]
#
# ARMS: SCHEME:INIT pairs; pre:scaled is megatron-core's own Pre-LN (the baseline users run), pre:plain
# and lns:plain the paper's arms (its code inits every layer N(0, 0.02)), lns:scaled the fourth corner.
# Every run goes through examples/pretrain_gpt_lns.sh (so NNODES, DATA_PATH, PRESET, RECIPE, ... apply);
# extra arguments go to every run. A finished run is skipped, an interrupted one resumed.
set -euo pipefail
cd "$(dirname "$0")/.."
AB_DIR=${AB_DIR:-runs/ab}
ARMS=${ARMS:-pre:scaled pre:plain lns:plain lns:scaled}
SEEDS=${SEEDS:-1234 1235}
for arm in $ARMS; do
    scheme=${arm%%:*} init=${arm##*:}
    for seed in $SEEDS; do
        run="$AB_DIR/$scheme-$init/seed$seed"
        echo "=== $scheme, output-layer init $init, seed $seed -> $run"
        NORM_SCHEME=$scheme OUTPUT_LAYER_INIT=$init CHECKPOINT_DIR="$run/ckpt" TENSORBOARD_DIR="$run/tb" \
            bash examples/pretrain_gpt_lns.sh --seed "$seed" "$@"
    done
done
python tools/ab_summary.py --runs "$AB_DIR" --num-samples "${NUM_SAMPLES:-32}"
echo "TensorBoard: tensorboard --logdir $AB_DIR"
