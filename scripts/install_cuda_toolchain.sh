#!/usr/bin/env bash
# Installs the pinned CUDA PTX toolchain (scripts/cuda-toolchain.txt: NVRTC
# 12.4 + CUDA 12.4 headers + ptxas 12.4, all PyPI wheels with pinned hashes)
# into a Python venv. Needs only python3 (>= 3.8, with venv and pip) and
# access to PyPI; no GPU, no system CUDA. Used by CI and by developers.
#
#   bash scripts/install_cuda_toolchain.sh [VENV]     # default: .venv-cuda in the repo
#
# Idempotent: a venv already holding exactly these pins is left alone.
# With the default .venv-cuda present, `cargo build` regenerates ptx/ from
# cuda/ (build.rs); a venv elsewhere is used when FERROTUNE_NVRTC_VENV names it.
# $PYTHON picks the interpreter (default python3).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${1:-$repo/.venv-cuda}
python=${PYTHON:-python3}
req=$repo/scripts/cuda-toolchain.txt
stamp=$venv/.ferrotune-cuda-toolchain

if [[ -f $stamp && -x $venv/bin/python ]] && cmp -s "$req" "$stamp"; then
    echo "CUDA toolchain in $venv is up to date"
    exit 0
fi

if ! command -v "$python" >/dev/null; then
    echo "error: $python not found; install Python 3 (with venv and pip) or set PYTHON" >&2
    exit 1
fi
if [[ ! -x $venv/bin/python ]]; then
    if ! "$python" -m venv "$venv"; then
        echo "error: '$python -m venv $venv' failed (on Debian/Ubuntu: apt-get install python3-venv)" >&2
        exit 1
    fi
fi
echo "installing the pinned CUDA toolchain into $venv"
"$venv/bin/python" -m pip install --disable-pip-version-check --no-input --quiet \
    --only-binary=:all: --require-hashes -r "$req"
cp "$req" "$stamp"
echo "CUDA toolchain installed in $venv:"
"$venv/bin/python" -m pip list --disable-pip-version-check --format=freeze 2>/dev/null | grep '^nvidia-' | sed 's/^/    /'
if [[ $venv == "$repo/.venv-cuda" ]]; then
    echo "(touch build.rs once if this repo was already built: cargo then regenerates ptx/ from cuda/)"
fi
