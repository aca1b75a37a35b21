#!/usr/bin/env bash
# Norm schemes A/B'd fairly: the same model, data, recipe and seeds; the arms differ in --norm-scheme and
# --output-layer-init only (checked from each run's pretrain_config.json), then one summary of them all
# (AB_DIR/summary/summary.md, summary.json, plots) and TensorBoard side by side.
#
#   SCHEMES="lns peri mix dyt bhyt" INITS="scaled plain" SEEDS="1 2 3" bash examples/ab_norm_schemes.sh [driver flags]
#   ARMS="pre:scaled lns:plain" bash examples/ab_norm_schemes.sh ...      # or name the SCHEME:INIT arms
#
# Every scheme runs under each init of INITS (default both); pre:scaled, megatron-core's own Pre-LN (the
# baseline Megatron-LM users run), is always one of the arms. Every run goes through
# examples/pretrain_gpt_lns.sh (so NNODES, DATA_PATH, PRESET, RECIPE, ... apply); extra arguments go to
# every run (e.g. --mix-ln-alpha, --dyt-alpha-init). A finished run is skipped, an interrupted one resumed.
set -euo pipefail
export PYTHON=${PYTHON:-python}  # the interpreter with torch and lns_megatron (a venv's, say), for every run
cd "$(dirname "$0")/.."
AB_DIR=${AB_DIR:-runs/ab}
SCHEMES=${SCHEMES:-pre lns peri peri-lns post mix deepnorm dyt bhyt}
INITS=${INITS:-scaled plain}
SEEDS=${SEEDS:-1234 1235}
if [ -z "${ARMS:-}" ]; then
    ARMS=""
    for scheme in $SCHEMES; do for init in $INITS; do ARMS="$ARMS $scheme:$init"; done; done
fi
case " $ARMS " in *" pre:scaled "*) ;; *) ARMS="pre:scaled $ARMS" ;; esac
for arm in $ARMS; do
    scheme=${arm%%:*} init=${arm##*:}
    for seed in $SEEDS; do
        run="$AB_DIR/$scheme-$init/seed$seed"
        echo "=== $scheme, output-layer init $init, seed $seed -> $run"
        NORM_SCHEME=$scheme OUTPUT_LAYER_INIT=$init CHECKPOINT_DIR="$run/ckpt" TENSORBOARD_DIR="$run/tb" \
            bash examples/pretrain_gpt_lns.sh --seed "$seed" "$@"
    done
done
"$PYTHON" tools/ab_summary.py --runs "$AB_DIR" --num-samples "${NUM_SAMPLES:-32}"
echo "TensorBoard: tensorboard --logdir $AB_DIR"
