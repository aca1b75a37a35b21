#!/usr/bin/env bash
# Pretrain a LLaMA-style GPT with LayerNorm Scaling (lns_megatron on megatron-core).
#
# One node:    bash examples/pretrain_gpt_lns.sh
# Multi-node:  on every node, NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node 0> bash examples/pretrain_gpt_lns.sh
# Real data:   DATA_PATH="0.7 data/a_text_document 0.3 data/b_text_document" TOKENIZER_MODEL=tok/ bash ...
# Extra arguments are passed to lns_megatron.pretrain and override the defaults below.
# Layout:      PRESET=llama-8b (8xH100) or llama-70b (64xH100) take the preset's layout (--preset-layout: TP, PP,
#              VPP, sequence parallelism, recompute, distributed optimizer, micro-batch) unless TP or PP is set.
# PRINT_ONLY=1 prints the torchrun command instead of running it.
#
# With GPUs: PRESET=llama-1b, bf16 (FP8 hybrid when Transformer Engine is installed), the distributed
# optimizer, overlapped gradient reduce and parameter gather; sized for 8xH100 per node.
# Without a GPU: the tiny preset on the CPU (gloo), so this script runs on any machine.
set -euo pipefail
PYTHON=${PYTHON:-python}  # the interpreter with torch and lns_megatron (a venv's, say)
cd "$(dirname "$0")/.."

if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    HAVE_GPU=1
else
    HAVE_GPU=0
fi

# What the user set (a --recipe fills batch and length itself unless these are given).
USER_GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-}
USER_TRAIN_ITERS=${TRAIN_ITERS:-}
USER_PARALLEL=${TP:-}${PP:-}
USER_MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-}
RECIPE=${RECIPE:-}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-6000}
NORM_SCHEME=${NORM_SCHEME:-lns}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-checkpoints/${PRESET:-default}-${NORM_SCHEME}}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-runs/${PRESET:-default}-${NORM_SCHEME}}

if [ "$HAVE_GPU" = 1 ]; then
    GPUS_PER_NODE=${GPUS_PER_NODE:-8}
    PRESET=${PRESET:-llama-1b}
    TP=${TP:-1}
    PP=${PP:-1}
    MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-4}
    GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-512}
    TRAIN_ITERS=${TRAIN_ITERS:-20000}
    VOCAB_SIZE=${VOCAB_SIZE:-32000}
    PRECISION_ARGS=(--bf16)
    if [ "${FP8:-1}" = 1 ] && "$PYTHON" -c "import transformer_engine" 2>/dev/null; then
        PRECISION_ARGS+=(--transformer-impl transformer_engine --fp8-format hybrid --fp8-recipe delayed
                         --fp8-amax-history-len 1024)
    fi
    PARALLEL_EXTRA=(--use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather)
    LOG_ARGS=(--log-interval 10 --eval-interval 1000 --eval-iters 20 --save-interval 1000 --depth-log-interval 100)
    LR_ARGS=(--lr 3e-4 --min-lr 3e-5 --lr-warmup-fraction 0.1)
    NUM_WORKERS=${NUM_WORKERS:-2}
else
    GPUS_PER_NODE=${GPUS_PER_NODE:-1}
    PRESET=${PRESET:-tiny}
    TP=${TP:-1}
    PP=${PP:-1}
    MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-4}
    GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-$((MICRO_BATCH_SIZE * GPUS_PER_NODE * NNODES / (TP * PP)))}
    TRAIN_ITERS=${TRAIN_ITERS:-50}
    VOCAB_SIZE=${VOCAB_SIZE:-512}
    PRECISION_ARGS=()
    PARALLEL_EXTRA=()
    LOG_ARGS=(--log-interval 10 --eval-interval 25 --eval-iters 2 --depth-log-interval 25)
    LR_ARGS=(--lr 1e-3 --min-lr 1e-4 --lr-warmup-fraction 0.1)
    NUM_WORKERS=${NUM_WORKERS:-0}
fi
CHECKPOINT_DIR=${CHECKPOINT_DIR/default/$PRESET}
LAYOUT_FROM_PRESET=0
if [ -z "$USER_PARALLEL" ] && "$PYTHON" -c "import sys; from lns_megatron.config import PRESET_LAYOUTS
sys.exit(0 if sys.argv[1] in PRESET_LAYOUTS else 1)" "$PRESET"; then
    LAYOUT_FROM_PRESET=1
fi
MICRO_BATCH_ARGS=(--micro-batch-size "$MICRO_BATCH_SIZE")
if [ "$LAYOUT_FROM_PRESET" = 1 ] && [ -z "$USER_MICRO_BATCH_SIZE" ]; then
    MICRO_BATCH_ARGS=()  # the layout's
fi
TENSORBOARD_DIR=${TENSORBOARD_DIR/default/$PRESET}

GPT_MODEL_ARGS=(--preset "$PRESET" --norm-scheme "$NORM_SCHEME" --output-layer-init "${OUTPUT_LAYER_INIT:-plain}")
if [ -n "$RECIPE" ]; then  # the recipe's optimizer, schedule, precision, batch and length (lr/steps by preset)
    TRAINING_ARGS=(--recipe "$RECIPE" "${MICRO_BATCH_ARGS[@]}"
                   ${USER_GLOBAL_BATCH_SIZE:+--global-batch-size "$USER_GLOBAL_BATCH_SIZE"}
                   ${USER_TRAIN_ITERS:+--train-iters "$USER_TRAIN_ITERS"})
    [ "$HAVE_GPU" = 1 ] || TRAINING_ARGS+=(--no-bf16)  # CPUs here have no fast bf16 matmul
else
    TRAINING_ARGS=("${MICRO_BATCH_ARGS[@]}" --global-batch-size "$GLOBAL_BATCH_SIZE"
                   --train-iters "$TRAIN_ITERS" "${LR_ARGS[@]}" --lr-decay-style cosine --weight-decay 0.1
                   --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 "${PRECISION_ARGS[@]}")
fi
if [ "$LAYOUT_FROM_PRESET" = 1 ]; then  # the preset's TP, PP, VPP, SP, recompute and micro-batch
    MODEL_PARALLEL_ARGS=(--preset-layout "${PARALLEL_EXTRA[@]}")
else
    MODEL_PARALLEL_ARGS=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" "${PARALLEL_EXTRA[@]}")
fi
if [ -n "${DATA_PATH:-}" ]; then
    # shellcheck disable=SC2206  # a blend is several words: "0.7 a 0.3 b"
    DATA_ARGS=(--data-path $DATA_PATH --split 969,30,1 --tokenizer-type "${TOKENIZER_TYPE:-HuggingFaceTokenizer}"
               --tokenizer-model "${TOKENIZER_MODEL:?set TOKENIZER_MODEL to the tokenizer used by tools/preprocess_data.py}")
else
    DATA_ARGS=(--mock-data --vocab-size "$VOCAB_SIZE")
fi
DATA_ARGS+=(--num-workers "$NUM_WORKERS")
EVAL_AND_LOGGING_ARGS=("${LOG_ARGS[@]}" --save "$CHECKPOINT_DIR" --tensorboard-dir "$TENSORBOARD_DIR")
if [ -f "$CHECKPOINT_DIR/latest_checkpointed_iteration.txt" ]; then
    EVAL_AND_LOGGING_ARGS+=(--load "$CHECKPOINT_DIR")  # resume
fi

COMMAND=("$PYTHON" -m torch.distributed.run
    --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK"
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
    -m lns_megatron.pretrain
    "${GPT_MODEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${MODEL_PARALLEL_ARGS[@]}" "${DATA_ARGS[@]}"
    "${EVAL_AND_LOGGING_ARGS[@]}" "$@")
if [ "${PRINT_ONLY:-0}" = 1 ]; then
    printf '%q ' "${COMMAND[@]}"
    echo
    exit 0
fi
exec "${COMMAND[@]}"
