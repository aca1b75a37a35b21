#!/usr/bin/env bash
# A fair Pre-LN vs LNS comparison: examples/ab_norm_schemes.sh with the schemes pre and lns, each under both
# output-layer inits (pre:scaled is megatron-core's own Pre-LN, the baseline users run; pre:plain and
# lns:plain the paper's arms, whose code inits every layer N(0, 0.02); lns:scaled the fourth corner).
#
#   SEEDS="1 2" bash examples/ab_pre_vs_lns.sh [driver flags]      # ARMS="pre:scaled lns:plain" to choose
set -euo pipefail
SCHEMES="pre lns" exec bash "$(dirname "$0")/ab_norm_schemes.sh" "$@"
