#!/usr/bin/env bash
# On the GPU machine, once per carried transfer: verify its pieces (sha256) and copy them to the staging
# folder outside the repository copy ($LNS_GPU_KIT_STAGE, default $TMPDIR/lns-gpu-kit), which lasts while
# the machine stays warm. Prints which transfers are staged and which are still to carry.
#
#   bash tools/gpu/stage.sh .gpu-kit/transfer-1
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-python3}" tools/gpu/kit.py stage "$@"
