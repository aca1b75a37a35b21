#!/usr/bin/env bash
# The paper's comparison: the same model and data with Pre-LN and with LayerNorm Scaling,
# into two TensorBoard runs side by side:  tensorboard --logdir runs/ab
# Environment and extra arguments as in pretrain_gpt_lns.sh (PRESET, DATA_PATH, NNODES, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
AB_DIR=${AB_DIR:-runs/ab}
for scheme in pre lns; do
    echo "=== norm scheme: $scheme"
    NORM_SCHEME=$scheme TENSORBOARD_DIR="$AB_DIR/$scheme" CHECKPOINT_DIR="${AB_CHECKPOINTS:-checkpoints/ab}/$scheme" \
        bash examples/pretrain_gpt_lns.sh "$@"
done
echo "TensorBoard: tensorboard --logdir $AB_DIR   (compare 'lm loss', 'lm loss validation' and depth/*)"
