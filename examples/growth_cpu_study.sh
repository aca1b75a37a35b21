#!/usr/bin/env bash
# Depth growth against training from scratch at equal training FLOPs, as run on a 2-core CPU machine (docs/results.md):
# each arm trained from scratch at 12 layers for TRAIN_ITERS iterations, and MIDAS-grown (midas, blocks of 2, 4
# stages: 6 -> 8 -> 10 -> 12 layers, prop-1) for the iterations that spend the same FLOPs; two seeds; then
# tools/ab_summary.py (held-out loss and the depth metrics, from the final 12-layer checkpoints).
#
#   apt-get install python3.11-doc && python examples/prepare_docs_corpus.py --output data/pydocs
#   bash examples/growth_cpu_study.sh            # 6 arms x 2 seeds; results in runs/growth_cpu/summary
#
# The arms: megatron-core's Pre-LN with its depth-scaled output init (pre:scaled, the baseline) and LNS under both
# output-layer inits, each from scratch and grown. The recipe is the paper's (--recipe paper), as in
# examples/ab_cpu_study.sh, at its smaller size (64 hidden).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHON=${PYTHON:-python}
export DATA_PATH=${DATA_PATH:-data/pydocs/docs_text_document} TOKENIZER_MODEL=${TOKENIZER_MODEL:-data/pydocs/tokenizer.json}
export RECIPE=paper PRESET=tiny MICRO_BATCH_SIZE=16 GLOBAL_BATCH_SIZE=16 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
ROOT=${ROOT:-runs/growth_cpu}
ITERS=${TRAIN_ITERS:-300}
ARMS=${ARMS:-pre:scaled lns:plain lns:scaled}
SEEDS=${SEEDS:-1234 1235}
EVAL_INTERVAL=25
MODEL=(--num-layers 12 --hidden-size "${HIDDEN_SIZE:-64}" --num-attention-heads 4 --ffn-hidden-size "${FFN_HIDDEN_SIZE:-176}"
       --seq-length 128 --max-position-embeddings 128 --log-interval 50 --eval-interval "$EVAL_INTERVAL" --eval-iters 4
       --depth-log-interval 100 --num-workers 1)
GROWTH=(--depth-growth midas --growth-block-size 2 --growth-stages 4 --growth-schedule prop-1)
# The grown arm's iterations: the multiple of EVAL_INTERVAL whose schedule spends the FLOPs nearest to ITERS at 12 layers.
GROWN_ITERS=$("$PYTHON" - "$ITERS" "$EVAL_INTERVAL" "$TOKENIZER_MODEL" "${MODEL[@]}" "${GROWTH[@]}" <<'PY'
import sys
from tokenizers import Tokenizer
from lns_megatron.config import parse_args
from lns_megatron.data.datasets import padded_vocab_size
from lns_megatron.training import growth
from lns_megatron.training.metrics import flops_per_iteration

iters, step, tokenizer, flags = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
vocab = padded_vocab_size(Tokenizer.from_file(tokenizer).get_vocab_size(), 128, 1)
def spent(train_iters):
    c = parse_args(["--preset", "tiny", "--mock-data", "--vocab-size", "8", "--global-batch-size", "16",
                    "--save", "unused", "--train-iters", str(train_iters), *flags])
    plan = growth.schedule(c)
    per = lambda d: flops_per_iteration(growth.stage_config(c, plan, plan.depths.index(d)), vocab)
    return plan.flops_fraction(train_iters, per) * train_iters / iters
best = min(range(step, 4 * iters, step), key=lambda t: abs(spent(t) - 1))
print(best)
print(f"growth_cpu_study: grown arms train {best} iterations, {spent(best):.4f} of the FLOPs of {iters} at 12 layers",
      file=sys.stderr)
PY
)
for arm in $ARMS; do
    scheme=${arm%%:*} init=${arm##*:}
    for how in scratch midas; do
        for seed in $SEEDS; do
            name="$scheme-$init"; iters=$ITERS; extra=()
            if [ "$how" = midas ]; then name="$name-midas"; iters=$GROWN_ITERS; extra=("${GROWTH[@]}"); fi
            run="$ROOT/$name/seed$seed"
            echo "=== $scheme, output-layer init $init, $how, seed $seed -> $run"
            NORM_SCHEME=$scheme OUTPUT_LAYER_INIT=$init CHECKPOINT_DIR="$run/ckpt" TENSORBOARD_DIR="$run/tb" \
                TRAIN_ITERS=$iters bash examples/pretrain_gpt_lns.sh --seed "$seed" "${MODEL[@]}" "${extra[@]}" "$@"
        done
    done
done
"$PYTHON" tools/ab_summary.py --runs "$ROOT" --num-samples "${NUM_SAMPLES:-64}"
