#!/usr/bin/env bash
# Preprocessing on many machines: a SLURM array of SHARDS tasks, each tokenizing its contiguous range
# of the sorted input files (tools/preprocess_data.py --shard I/N), then one job that merges the shards
# in order (tools/merge_datasets.py). The merged .bin/.idx are byte for byte what one run over all the
# files writes; the merge refuses a set with a shard missing, or cut from another file list.
#
#   INPUT='/shared/corpus/*.jsonl.zst' OUTPUT=/shared/data/corpus TOKENIZER_MODEL=/shared/tokenizer \
#   SHARDS=64 bash examples/preprocess_slurm_array.sh            # submits the array and the merge
#   ... bash examples/preprocess_slurm_array.sh local             # the same steps on this machine
#
# -> $OUTPUT_text_document.bin/.idx/.json, for --data-path $OUTPUT_text_document. The shards go to
# $OUTPUT_shards/ (every node must see INPUT and OUTPUT: a shared filesystem). A failed or preempted
# task leaves nothing that looks complete; re-running the script redoes only what is missing.
# Extra sbatch flags: SBATCH_ARGS="--partition cpu --time 4:00:00". One --json-keys key per run (KEY).
set -euo pipefail
PYTHON=${PYTHON:-python}  # the interpreter with torch and lns_megatron (a venv's, say)

: "${INPUT:?set INPUT to the corpus: a file, a glob or a directory}"
: "${OUTPUT:?set OUTPUT to the output prefix, e.g. /shared/data/corpus}"
: "${TOKENIZER_MODEL:?set TOKENIZER_MODEL to the tokenizer file or directory}"
export INPUT OUTPUT TOKENIZER_MODEL
export REPO=${REPO:-$(cd "$(dirname "$0")/.." && pwd)}  # sbatch runs a copy of this script elsewhere
export SHARDS=${SHARDS:-8} KEY=${KEY:-text} TOKENIZER_TYPE=${TOKENIZER_TYPE:-HuggingFaceTokenizer}
export WORKERS=${WORKERS:-${SLURM_CPUS_PER_TASK:-$(nproc)}}
export SHARD_DIR=${SHARD_DIR:-${OUTPUT}_shards}

shard() {  # shard I: skipped when a previous run already finished it
    local prefix
    prefix="$SHARD_DIR/$(printf '%05d' "$1")"
    if [ -f "${prefix}_${KEY}_document.idx" ]; then
        echo "shard $1/$SHARDS: done before (${prefix}_${KEY}_document.idx)"
        return
    fi
    "$PYTHON" "$REPO/tools/preprocess_data.py" --input "$INPUT" --shard "$1/$SHARDS" --json-keys "$KEY" \
        --output-prefix "$prefix" --tokenizer-type "$TOKENIZER_TYPE" --tokenizer-model "$TOKENIZER_MODEL" \
        --append-eod --workers "$WORKERS" ${PREPROCESS_ARGS:-}
}

merge() {
    "$PYTHON" "$REPO/tools/merge_datasets.py" --input "$SHARD_DIR" --output-prefix "${OUTPUT}_${KEY}_document" --overwrite
}

case "${1:-submit}" in
    submit)
        mkdir -p "$SHARD_DIR"
        array=$(sbatch --parsable --array="0-$((SHARDS - 1))" --job-name=preprocess --cpus-per-task="$WORKERS" \
            --output="$SHARD_DIR/%x-%A_%a.out" ${SBATCH_ARGS:-} "$0" shard)
        sbatch --dependency="afterok:${array%%;*}" --job-name=merge-shards --output="$SHARD_DIR/%x-%j.out" \
            ${SBATCH_ARGS:-} "$0" merge
        ;;
    shard) shard "${SLURM_ARRAY_TASK_ID:?run as a SLURM array task, or with: local}" ;;
    merge) merge ;;
    local)  # every shard here, one after another, then the merge
        mkdir -p "$SHARD_DIR"
        for ((i = 0; i < SHARDS; i++)); do shard "$i"; done
        merge
        ;;
    *) echo "usage: $0 [submit|local|shard|merge]" >&2; exit 2 ;;
esac
