#!/usr/bin/env bash
# The dense-vs-MoE study of docs/results.md ("Sparsity and the curse of depth"), on a 2-core CPU machine: the
# same 12 x 64 model dense and as a mixture of experts with equal active parameters (4 experts of 88, top-2:
# 2 x 88 = the dense 176-wide MLP), each under pre:scaled, pre:plain, lns:scaled and lns:plain, two seeds,
# the corpus and recipe of examples/ab_cpu_study.sh; then one A/B summary per model, with the depth report's
# layer-utilization metrics.
#
#   apt-get install python3.11-doc && python examples/prepare_docs_corpus.py --output data/pydocs
#   bash examples/sparsity_cpu_study.sh   # 16 runs x 2-3 minutes, then two summaries; runs/sparsity/{dense,moe}/summary
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${ROOT:-runs/sparsity}
export HIDDEN_SIZE=64 FFN_HIDDEN_SIZE=176 TRAIN_ITERS=${TRAIN_ITERS:-300} SCHEMES="pre lns"
AB_DIR="$ROOT/dense" bash examples/ab_cpu_study.sh "$@"
AB_DIR="$ROOT/moe" bash examples/ab_cpu_study.sh --num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 88 \
    --moe-aux-loss-coeff 0.01 "$@"
