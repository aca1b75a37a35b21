#!/usr/bin/env bash
# Fine-tune a Hugging Face model as LNS (or Pre-LN, NORM_SCHEME=pre) with DeepSpeed ZeRO.
#
# The model: an lns_megatron checkpoint exported with  tools/export_hf.py --keep-lns  (LNS kept), or any
# Llama-family model directory. The data: JSON lines with "prompt" and "response" (prompt masked from the loss).
#
# One node:    MODEL=hf/lns-1b DATA=sft.jsonl bash examples/finetune_lns_deepspeed.sh
# A/B:         NORM_SCHEME=pre OUTPUT_DIR=runs/sft-pre MODEL=hf/lns-1b DATA=sft.jsonl bash ...
# Multi-node:  a DeepSpeed hostfile ("node-0 slots=8" per line), then either
#                HOSTFILE=hostfile bash ...                       (node 0 starts every node over ssh/pdsh)
#                HOSTFILE=hostfile NODE_RANK=<0..N-1> MASTER_ADDR=<node 0> bash ...   (on every node, no ssh)
# ZERO=3 selects examples/ds_zero3.json. Extra arguments go to lns_megatron.finetune and override these.
# Without a GPU it runs on the CPU (DeepSpeed's CPU accelerator, gloo), GPUS_PER_NODE processes per node.
set -euo pipefail
PYTHON=${PYTHON:-python}  # the interpreter with torch and lns_megatron (a venv's, say)
ROOT="$(cd "$(dirname "$0")/.." && pwd)"  # paths you give stay relative to where you run it

: "${MODEL:?set MODEL to a Hugging Face model directory (tools/export_hf.py --keep-lns writes one)}"
: "${DATA:?set DATA to a JSON lines file of {\"prompt\": ..., \"response\": ...}}"
NORM_SCHEME=${NORM_SCHEME:-lns}
ZERO=${ZERO:-2}
OUTPUT_DIR=${OUTPUT_DIR:-runs/sft-${NORM_SCHEME}}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    GPUS_PER_NODE=${GPUS_PER_NODE:-8}
    PRECISION_ARGS=(--bf16)
else
    GPUS_PER_NODE=${GPUS_PER_NODE:-1}
    PRECISION_ARGS=()
fi
DS_CONFIG="$ROOT/examples/ds_zero${ZERO}.json"
[ -f "$DS_CONFIG" ] || { echo "finetune_lns_deepspeed.sh: ZERO=$ZERO: no $DS_CONFIG (use 2 or 3)" >&2; exit 2; }

LAUNCH=("$PYTHON" -m deepspeed.launcher.runner --num_gpus "$GPUS_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
if [ -n "${HOSTFILE:-}" ]; then
    LAUNCH+=(--hostfile "$HOSTFILE")
    if [ -n "${NODE_RANK:-}" ]; then
        LAUNCH+=(--no_ssh --node_rank "$NODE_RANK")
    fi
else
    LAUNCH+=(--hostfile /dev/null)  # this node only, whatever /job/hostfile says
fi

exec "${LAUNCH[@]}" "$ROOT/tools/finetune_hf.py" \
    --model "$MODEL" --data "$DATA" --output-dir "$OUTPUT_DIR" --norm-scheme "$NORM_SCHEME" \
    --deepspeed "$DS_CONFIG" "${PRECISION_ARGS[@]}" \
    --seq-length "${SEQ_LENGTH:-2048}" --micro-batch-size "${MICRO_BATCH_SIZE:-4}" \
    --gradient-accumulation-steps "${GRAD_ACCUM:-1}" --lr "${LR:-2e-5}" --epochs "${EPOCHS:-3}" \
    --logging-steps 10 --depth-log-interval 50 "$@"
