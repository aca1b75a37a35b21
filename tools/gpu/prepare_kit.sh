#!/usr/bin/env bash
# Prepare, on a CPU machine with package-registry access, everything an offline GPU machine needs to run
# tools/gpu/run_checks.sh: megatron-core and Transformer Engine wheels for its Python, TE's PyTorch
# extension prebuilt against its torch, split into transfers that each fit one carry.
#
#   bash tools/gpu/prepare_kit.sh            # writes .gpu-kit/transfer-1 ... transfer-K and .gpu-kit/manifest.json
#
# Re-running reuses the downloads, the build venv and the built wheel. Outputs live in $KIT_DIR (ignored by git).
set -euo pipefail
cd "$(dirname "$0")/../.."

# What the GPU machine runs (tools/gpu/README: see /work/shared/GPU.md for how it was read off the machine).
PYTHON_VERSION=${PYTHON_VERSION:-3.12}     # the GPU machine's Python (3.12.3 there)
TORCH_VERSION=${TORCH_VERSION:-2.11.0}     # the GPU machine's torch: TE's extension is tied to its ABI
CUDA_MAJOR=${CUDA_MAJOR:-13}               # torch 2.11.0's CUDA build on PyPI is CUDA 13.0 (+cu130)
NVCC_SPEC=${NVCC_SPEC:-13.0.*}             # nvcc and headers of that CUDA, for the extension's build
MCORE_VERSION=${MCORE_VERSION:-0.16.1}     # megatron-core to test there
TE_VERSION=${TE_VERSION:-2.11.0}           # megatron-core 0.16.1 declares transformer-engine >=2.9,<2.12
BASE_REQS=${BASE_REQS:-"packaging>=24.2 psutil"}   # megatron-core's METADATA needs; psutil: dist_checkpointing's writer
TE_REQS=${TE_REQS:-"pydantic>=2,<3"}       # transformer-engine-cu13's METADATA needs (einops, onnx, onnxscript: on the machine)
PART_MIB=${PART_MIB:-59}                   # parts below 60 MiB
TRANSFER_MIB=${TRANSFER_MIB:-62}           # one carry is 64 MiB, the repository copy itself under 1 MiB
BUILD_PYTHON=${BUILD_PYTHON:-$(command -v "python$PYTHON_VERSION" || echo "$HOME/.pyenv/versions/3.12.1/bin/python")}
MAX_JOBS=${MAX_JOBS:-2}

KIT_DIR=${KIT_DIR:-.gpu-kit}
mkdir -p "$KIT_DIR"
KIT_ABS=$(cd "$KIT_DIR" && pwd)
DL=$KIT_DIR/downloads
BUILD=$KIT_DIR/build
VENV=$BUILD/venv${PYTHON_VERSION/./}
mkdir -p "$DL" "$BUILD/wheels"
say() { echo "prepare_kit: $*"; }
fail() { echo "prepare_kit: error: $*" >&2; exit 2; }

PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64)
pip_download() {  # wheels for the GPU machine's Python and platform, not this machine's
    python3 -m pip download -q --python-version "$PYTHON_VERSION" --implementation cp --abi "cp${PYTHON_VERSION/./}" \
        --abi abi3 --abi none "${PLATFORMS[@]}" --platform any --only-binary=:all: -d "$1" "${@:2}" \
        2> >(grep -v "is neither a file nor a directory" >&2)  # this machine's local indexes lack most names
}

say "1/4 downloading wheels for Python $PYTHON_VERSION into $DL"
mkdir -p "$DL/base" "$DL/te"
pip_download "$DL/base" --no-deps "megatron-core==$MCORE_VERSION"
# shellcheck disable=SC2086
pip_download "$DL/base" $BASE_REQS
pip_download "$DL/te" --no-deps "transformer-engine==$TE_VERSION" "transformer-engine-cu$CUDA_MAJOR==$TE_VERSION"
# shellcheck disable=SC2086
pip_download "$DL/te" $TE_REQS
python3 tools/gpu/kit.py fetch transformer-engine-torch "transformer_engine_torch-$TE_VERSION.tar.gz" "$DL" >/dev/null

TE_TORCH_WHEEL=$(ls "$BUILD/wheels"/transformer_engine_torch-"$TE_VERSION"-cp"${PYTHON_VERSION/./}"-*.whl 2>/dev/null | head -1 || true)
if [ -n "$TE_TORCH_WHEEL" ] && [ -f "$BUILD/wheels/.built-for-torch-$TORCH_VERSION" ]; then
    say "2/4 reusing $TE_TORCH_WHEEL (built for torch $TORCH_VERSION)"
    say "3/4 (built already)"
else
    say "2/4 build venv $VENV (Python $PYTHON_VERSION, torch $TORCH_VERSION: several GB of CUDA wheels the first time)"
    [ -x "$BUILD_PYTHON" ] || fail "no Python $PYTHON_VERSION at BUILD_PYTHON=$BUILD_PYTHON; install one (pyenv install $PYTHON_VERSION) or set BUILD_PYTHON"
    [ -x "$VENV/bin/python" ] || "$BUILD_PYTHON" -m venv "$VENV"
    if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
        "$VENV/bin/pip" install -q "torch==$TORCH_VERSION" "nvidia-cuda-nvcc==$NVCC_SPEC" "nvidia-cuda-crt==$NVCC_SPEC" \
            "nvidia-nvvm==$NVCC_SPEC" "nvidia-cuda-cccl==$NVCC_SPEC" setuptools wheel pybind11 ninja
    fi
    say "3/4 building transformer_engine_torch $TE_VERSION against torch $TORCH_VERSION (11 to 35 minutes on 2 cores)"
    SP=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    [ -d "$SP/nvidia/cu$CUDA_MAJOR/bin" ] || fail "$SP/nvidia/cu$CUDA_MAJOR/bin is missing: torch $TORCH_VERSION is not a CUDA $CUDA_MAJOR build; set CUDA_MAJOR and NVCC_SPEC"
    rm -f "$BUILD/wheels"/transformer_engine_torch-*.whl "$BUILD/wheels"/.built-for-torch-*
    # Only g++ compiles it (a CppExtension linking against torch alone); nvcc is asked only for its version.
    (cd "$KIT_ABS/build" && env CUDA_HOME="$SP/nvidia/cu$CUDA_MAJOR" PATH="$SP/nvidia/cu$CUDA_MAJOR/bin:$KIT_ABS/build/venv${PYTHON_VERSION/./}/bin:$PATH" \
        CPATH="$SP/nvidia/cudnn/include:$SP/nvidia/nccl/include" NVTE_FRAMEWORK=pytorch NVTE_PYTORCH_FORCE_BUILD=TRUE \
        MAX_JOBS="$MAX_JOBS" "$KIT_ABS/build/venv${PYTHON_VERSION/./}/bin/pip" wheel --no-build-isolation --no-deps \
        "$KIT_ABS/downloads/transformer_engine_torch-$TE_VERSION.tar.gz" -w wheels) > "$BUILD/build-te-torch.log" 2>&1 \
        || fail "the build failed; see $BUILD/build-te-torch.log"
    touch "$BUILD/wheels/.built-for-torch-$TORCH_VERSION"
    TE_TORCH_WHEEL=$(ls "$BUILD/wheels"/transformer_engine_torch-"$TE_VERSION"-*.whl)
fi

TORCH_FULL=$("$VENV/bin/python" -c "import torch; print(torch.__version__)" 2>/dev/null || echo "$TORCH_VERSION")
TORCH_CUDA=$("$VENV/bin/python" -c "import torch; print(torch.version.cuda)" 2>/dev/null || echo "$CUDA_MAJOR")
GLIBC=$(unzip -p "$TE_TORCH_WHEEL" '*.so' > "$BUILD/te_torch.so" && objdump -T "$BUILD/te_torch.so" 2>/dev/null \
        | grep -o 'GLIBC_[0-9.]*' | sort -V | tail -1 || echo unknown)

say "4/4 splitting into transfers of at most $TRANSFER_MIB MiB (parts of $PART_MIB MiB)"
ROLES=()
for f in "$DL"/base/*.whl; do ROLES+=(--role "base:$f"); done
for f in "$DL"/te/*.whl "$TE_TORCH_WHEEL"; do ROLES+=(--role "te:$f"); done
python3 tools/gpu/kit.py pack "$KIT_DIR" "${ROLES[@]}" --part-mib "$PART_MIB" --transfer-mib "$TRANSFER_MIB" \
    --version python="$PYTHON_VERSION" --version torch="$TORCH_FULL" --version torch_cuda="$TORCH_CUDA" \
    --version megatron-core="$MCORE_VERSION" --version transformer-engine="$TE_VERSION" \
    --version te_torch_max_glibc="$GLIBC"
K=$(ls -d "$KIT_DIR"/transfer-* | wc -l)
say "done: $K transfers in $KIT_DIR, manifest $KIT_DIR/manifest.json. On the GPU machine, one command per transfer:"
for k in $(seq 1 "$K"); do
    if [ "$k" -lt "$K" ]; then
        echo "  carry [\"$KIT_DIR/transfer-$k\"]: bash tools/gpu/stage.sh $KIT_DIR/transfer-$k"
    else  # run_checks.sh stages the transfers carried with it
        echo "  carry [\"$KIT_DIR/transfer-$k\"]: bash tools/gpu/run_checks.sh \$OUT"
    fi
done
