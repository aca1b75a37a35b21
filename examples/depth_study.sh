#!/bin/bash
# Pre-LN vs LNS at equal settings, then a depth report of both side by side.
# The model flags and the data are the same for the two runs; only --norm-scheme differs.
#
#   DATA_PATH=data/docs_text_document TOKENIZER_MODEL=data/tokenizer.json bash examples/depth_study.sh
#
# Extra arguments go to both runs (e.g. --train-iters 200). Outputs: $OUT_DIR/{pre,lns}
# (checkpoints and TensorBoard) and $OUT_DIR/depth_report (report.json, plots, summary.md).
set -euo pipefail
cd "$(dirname "$0")/.."

: "${DATA_PATH:?set DATA_PATH to a prefix written by tools/preprocess_data.py}"
: "${TOKENIZER_MODEL:?set TOKENIZER_MODEL to the tokenizer the data was prepared with}"
OUT_DIR=${OUT_DIR:-runs/depth_study}
GPUS=${GPUS:-$(python -c 'import torch; print(torch.cuda.device_count())')}

if [ "$GPUS" -gt 0 ]; then  # 24 layers: deep enough for the curse of depth to show
    MODEL=(--num-layers 24 --hidden-size 256 --num-attention-heads 8 --ffn-hidden-size 704 --seq-length 256)
    TRAIN=(--micro-batch-size 64 --global-batch-size 64 --train-iters "${TRAIN_ITERS:=1500}" --bf16)
    NPROC=1
else  # a CPU-sized version of the same study
    MODEL=(--num-layers 12 --hidden-size 128 --num-attention-heads 4 --ffn-hidden-size 352 --seq-length 128)
    TRAIN=(--micro-batch-size 16 --global-batch-size 16 --train-iters "${TRAIN_ITERS:=300}")
    NPROC=1
fi

for scheme in pre lns; do
    python -m torch.distributed.run --nproc_per_node "$NPROC" --master_port "${MASTER_PORT:-29511}" \
        -m lns_megatron.pretrain \
        --normalization RMSNorm --swiglu --disable-bias-linear --position-embedding-type rope \
        --untie-embeddings-and-output-weights "${MODEL[@]}" --norm-scheme "$scheme" \
        "${TRAIN[@]}" --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters $((TRAIN_ITERS / 15)) --lr-decay-style cosine --weight-decay 0.1 \
        --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --seed 1234 \
        --data-path "$DATA_PATH" --split 969,30,1 \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_MODEL" --num-workers 2 \
        --log-interval 50 --eval-interval 500 --eval-iters 10 --depth-log-interval 100 \
        --save "$OUT_DIR/$scheme" --save-interval 100000 --tensorboard-dir "$OUT_DIR/$scheme/tensorboard" "$@"
done

python tools/depth_report.py --load "$OUT_DIR/lns" --compare "$OUT_DIR/pre" \
    --num-samples "${NUM_SAMPLES:-64}" --output "$OUT_DIR/depth_report"
