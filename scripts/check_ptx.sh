#!/usr/bin/env bash
# Assembles every ptx/*.ptx with the pinned ptxas (PyPI nvidia-cuda-nvcc-cu12,
# see scripts/cuda-toolchain.txt) for sm_80, sm_86, sm_89 and sm_90, as the
# driver's JIT will on A100 / RTX 30xx / RTX 40xx / H100. No GPU is needed.
#
#   bash scripts/check_ptx.sh [VENV]
#
# VENV defaults to $FERROTUNE_NVRTC_VENV, then .venv-cuda in the repository;
# $PTXAS overrides the ptxas binary. Prints one row per kernel: for each
# arch, "registers spill-store/spill-load bytes", plus the stack frame in
# bytes where it is not zero.
#
# Fails (exit 1) on any ptxas error or warning (warnings are errors), and on
# any spill (non-zero spill stores or loads) on any arch. A stack frame alone
# is not a spill (e.g. sincosf's slow path for huge angles keeps a small local
# array) and is only reported. Exit 2: ptxas not found.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
archs=(sm_80 sm_86 sm_89 sm_90)

venv=${1:-${FERROTUNE_NVRTC_VENV:-$repo/.venv-cuda}}
ptxas=${PTXAS:-}
if [[ -z $ptxas ]]; then
    for cand in "$venv"/lib/python3*/site-packages/nvidia/cuda_nvcc/bin/ptxas; do
        [[ -x $cand ]] && ptxas=$cand && break
    done
fi
if [[ -z $ptxas || ! -x $ptxas ]]; then
    echo "error: ptxas not found in $venv (PyPI nvidia-cuda-nvcc-cu12, pinned in scripts/cuda-toolchain.txt)." >&2
    echo "  install it with: bash scripts/install_cuda_toolchain.sh [VENV]" >&2
    exit 2
fi

shopt -s nullglob
ptx_files=("$repo"/ptx/*.ptx)
if (( ${#ptx_files[@]} == 0 )); then
    echo "error: no PTX in $repo/ptx (run scripts/regen_ptx.py)" >&2
    exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
records=$tmp/records   # module kernel arch regs spill_st spill_ld stack
: >"$records"
failed=0

echo "ptxas: $("$ptxas" --version | grep -o "release .*")"
# Assemble all (module, arch) pairs in parallel; read the logs back in order.
export CHECK_PTX_TMP=$tmp CHECK_PTX_DIR=$repo/ptx
for ptx in "${ptx_files[@]}"; do
    for arch in "${archs[@]}"; do printf '%s %s\n' "$(basename "$ptx" .ptx)" "$arch"; done
done | xargs -P "$(nproc 2>/dev/null || echo 2)" -n 2 bash -c '
    out=$CHECK_PTX_TMP/$1.$2
    "$0" -arch="$2" -v --warning-as-error "$CHECK_PTX_DIR/$1.ptx" -o "$out.cubin" >"$out.log" 2>&1
    echo $? >"$out.rc"' "$ptxas"

for ptx in "${ptx_files[@]}"; do
    module=$(basename "$ptx" .ptx)
    for arch in "${archs[@]}"; do
        log=$tmp/$module.$arch.log
        if [[ "$(cat "$tmp/$module.$arch.rc" 2>/dev/null)" != 0 ]]; then
            echo "error: ptxas -arch=$arch failed on ptx/$module.ptx:" >&2
            sed 's/^/    /' "$log" >&2 || true
            failed=1
            continue
        fi
        # ptxas -v prints, per kernel:
        #   ptxas info    : Compiling entry function 'NAME' for 'sm_80'
        #   ptxas info    : Function properties for NAME
        #       S bytes stack frame, T bytes spill stores, L bytes spill loads
        #   ptxas info    : Used R registers, ...
        awk -v module="$module" -v arch="$arch" '
            /Compiling entry function/ { split($0, q, "'"'"'"); name = q[2]; stack = st = ld = 0 }
            /bytes stack frame/ { stack = $1; st = $5; ld = $9 }
            /Used [0-9]+ registers/ {
                for (i = 1; i <= NF; i++) if ($i == "Used") regs = $(i + 1)
                if (name != "") print module, name, arch, regs, st, ld, stack
                name = ""
            }' "$log" >>"$records"
    done
done

# One row per kernel, one column per arch.
awk -v archs="${archs[*]}" '
    BEGIN { n = split(archs, A, " ") }
    {
        key = $2
        if (!(key in seen)) { seen[key] = 1; order[++k] = key; mod[key] = $1 }
        cell = sprintf("%3d %d/%d", $4, $5, $6)
        if ($7 != 0) cell = cell sprintf(" f%d", $7)
        c[key, $3] = cell
        if ($5 != 0 || $6 != 0) { spills[++s] = sprintf("%s on %s: %d bytes spill stores, %d bytes spill loads", key, $3, $5, $6) }
    }
    END {
        printf "%-28s", "kernel (regs st/ld [f=stack])"
        for (i = 1; i <= n; i++) printf " %-17s", A[i]
        printf "\n"
        for (j = 1; j <= k; j++) {
            key = order[j]
            printf "%-28s", key
            for (i = 1; i <= n; i++) printf " %-17s", ((key, A[i]) in c) ? c[key, A[i]] : "-"
            printf "\n"
        }
        for (i = 1; i <= s; i++) print "error: spill: " spills[i] > "/dev/stderr"
        printf "%d kernels x %d archs\n", k, n
        exit(s > 0 ? 1 : 0)
    }' "$records" || failed=1

if (( failed )); then
    echo "check_ptx: FAILED" >&2
    exit 1
fi
echo "check_ptx: ok (no errors, no warnings, no spills)"
