#!/usr/bin/env bash
# Create .venv at the repo root with torch, a CPU-only torchsort build when no GPU is present,
# and this package editable with all extras. Re-running it is fast: a stamp records the inputs.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV=.venv
PIP="$VENV/bin/python -m pip"
STAMP="$VENV/.neco-setup-stamp"
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
EXTRAS="diffsort,torchsort,lightly,solo,eval,scann,hf,train,docs,dev"

# The kernel's source and build script are inputs too: a changed kernel is rebuilt here.
fingerprint="$(cat pyproject.toml setup.py scripts/setup.sh neco_loss/sorting/kernels/csrc/soft_sort.cpp \
    | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$fingerprint" ]]; then
    exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
echo "neco-loss setup: installing into $VENV (takes a few minutes the first time)"
$PIP install --quiet --disable-pip-version-check $TORCH_PINS setuptools wheel

if ! "$VENV/bin/python" -c "import torchsort" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        $PIP install --quiet --no-build-isolation --no-deps torchsort
    else
        # No GPU: torchsort's build tries CUDA whenever nvcc is on PATH and then fails.
        # Build the CPU extension with every directory holding nvcc removed from PATH.
        cpu_path="$(tr ':' '\n' <<<"$PATH" | while read -r dir; do
            [[ -x "$dir/nvcc" ]] || printf '%s:' "$dir"; done)"
        env PATH="${cpu_path%:}" FORCE_CUDA=0 $PIP install --quiet --no-build-isolation --no-deps torchsort
    fi
fi

# --no-build-isolation: setup.py compiles the C++ kernel against this venv's torch (the kernel
# must match the torch it runs with). Without a compiler the install still succeeds and the
# check below warns (NECO_REQUIRE_KERNEL=1, as in CI, makes both an error).
$PIP install --quiet --disable-pip-version-check --no-build-isolation -e ".[$EXTRAS]"
"$VENV/bin/python" -c "from neco_loss.sorting.kernels.cpp import build_info; print('neco-loss kernel:', build_info())"
echo "$fingerprint" >"$STAMP"
echo "neco-loss setup: done"
