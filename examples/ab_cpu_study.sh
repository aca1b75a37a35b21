#!/usr/bin/env bash
# The Pre-LN/LNS comparison published in docs/results.md, as run on a 2-core CPU machine: four arms (each norm
# scheme under both output-layer inits), two seeds each, the paper's recipe, a real-text corpus.
#
#   apt-get install python3.11-doc && python examples/prepare_docs_corpus.py --output data/pydocs
#   bash examples/ab_cpu_study.sh            # 8 runs x about 6 minutes (2 cores); results in runs/ab_cpu/summary
#   SCHEMES="pre lns peri peri-lns post mix deepnorm dyt bhyt" HIDDEN_SIZE=64 FFN_HIDDEN_SIZE=176 TRAIN_ITERS=300 \
#       AB_DIR=runs/ab_cpu_all bash examples/ab_cpu_study.sh   # every scheme, at the size of docs/results.md's second table
#
# The model (12 layers x 128, SwiGLU, RoPE, untied embeddings, 4.5M parameters) and the budget (400
# iterations of 16 x 128 tokens, 0.8M tokens, under one epoch of the corpus) are what this machine trains in
# well under an hour per arm; the recipe is the paper's (--recipe paper) except its batch, length and steps
# (given here) and bf16 (fp32 on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
export DATA_PATH=${DATA_PATH:-data/pydocs/docs_text_document} TOKENIZER_MODEL=${TOKENIZER_MODEL:-data/pydocs/tokenizer.json}
export AB_DIR=${AB_DIR:-runs/ab_cpu} RECIPE=paper PRESET=tiny MICRO_BATCH_SIZE=16 GLOBAL_BATCH_SIZE=16 TRAIN_ITERS=${TRAIN_ITERS:-400}
export SCHEMES=${SCHEMES:-pre lns} SEEDS=${SEEDS:-1234 1235} NUM_SAMPLES=${NUM_SAMPLES:-64}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
bash examples/ab_norm_schemes.sh --num-layers 12 --hidden-size "${HIDDEN_SIZE:-128}" --num-attention-heads 4 \
    --ffn-hidden-size "${FFN_HIDDEN_SIZE:-352}" \
    --seq-length 128 --max-position-embeddings 128 --log-interval 50 --eval-interval 100 --eval-iters 10 \
    --depth-log-interval 100 --num-workers 1 "$@"
