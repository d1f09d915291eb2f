#!/usr/bin/env bash
# Build `hindsight` with candle's CUDA backend, on a machine with or without a CUDA toolkit.
#
# Installs CUDA 13.0 from PyPI (nvcc, runtime, cuBLAS, cuRAND, NVRTC: about 1.2 GB) into a
# venv, adds what the PyPI wheels lack for linking (unversioned .so links, a libcuda.so stub;
# the real libcuda comes with the NVIDIA driver at run time), then runs
#   cargo build --release --features cuda --bin hindsight   (cuda,nccl with --nccl)
# and prints the binary's path last (target/cuda/release/hindsight). Every step is skipped
# when already done.
#
# With --nccl it also installs NCCL from PyPI (nvidia-nccl-cu13, about 200 MB; the library the
# learner's NCCL all-reduce links) and builds with `--features cuda,nccl` instead.
#
# usage: scripts/cuda-toolchain.sh [--nccl] [--check | --env | --setup] [CARGO ARGS...]
#   (none)    set up what is missing, build, print the binary's path
#   --nccl    NCCL too (also HINDSIGHT_NCCL=1): set up, check, print the environment, build
#   --setup   set up only
#   --env     print the environment as `export` lines: eval "$(scripts/cuda-toolchain.sh --env)"
#             (also what running the binary needs: LD_LIBRARY_PATH with the CUDA libraries)
#   --check   print the environment and what is installed, change nothing (exit 1: not set up)
#
# environment:
#   HINDSIGHT_CUDA_DIR  where the toolchain goes (default ~/.cache/hindsight/cuda-13.0)
#   CUDA_COMPUTE_CAP    GPU architecture of the kernels (default: the GPU's from nvidia-smi,
#                       else 90 = H100/H200)
#   PYTHON              Python 3 that creates the venv (default python3)
#   CARGO_TARGET_DIR    default target/cuda, so that the CPU build in target/ stays as it is
set -euo pipefail

SPEC='cuda-toolkit[nvcc,cudart,crt,nvvm,cccl,cublas,curand,nvrtc]==13.0.2'
# NCCL >= 2.30: cudarc's bindings are 2.30's; 2.30 is also the first to allow two ranks on one
# GPU (NCCL_MULTI_RANK_GPU_ENABLE=1), which the one-GPU test machine needs.
NCCL_SPEC='nvidia-nccl-cu13==2.32.6'
RELEASE=13.0
LIBS="cudart cublas cublasLt curand nvrtc"

root=$(cd "$(dirname "$0")/.." && pwd)
dir=${HINDSIGHT_CUDA_DIR:-$HOME/.cache/hindsight/cuda-$RELEASE}
target=${CARGO_TARGET_DIR:-$root/target/cuda}
case $target in /*) ;; *) target=$PWD/$target ;; esac
cuda=$dir/cuda # -> the wheels' nvidia/cu13 tree: bin/ include/ lib/ nvvm/
nccl=$dir/nccl # -> the NCCL wheel's nvidia/nccl tree: include/ lib/

say() { echo "cuda-toolchain: $*" >&2; }
die() { say "error: $*"; exit 1; }

mode=build
with_nccl=${HINDSIGHT_NCCL:-0}
[ "$with_nccl" = 1 ] || with_nccl=0
if [ "${1:-}" = --nccl ]; then
    with_nccl=1
    shift
fi
case "${1:-}" in
    --check | --env | --setup) mode=${1#--}; shift ;;
    -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
esac

compute_cap() {
    if [ -n "${CUDA_COMPUTE_CAP:-}" ]; then
        echo "$CUDA_COMPUTE_CAP"
    elif cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1) &&
        [ -n "$cap" ]; then
        echo "${cap/./}"
    else
        echo 90
    fi
}

nvcc_ok() {
    [ -x "$cuda/bin/nvcc" ] && "$cuda/bin/nvcc" --version 2>/dev/null | grep -q "release $RELEASE,"
}

install_toolkit() {
    if nvcc_ok; then
        say "nvcc $RELEASE: present ($cuda/bin/nvcc)"
        return
    fi
    command -v "${PYTHON:-python3}" >/dev/null || die "no ${PYTHON:-python3}: Python 3 with venv and pip is needed"
    if [ ! -x "$dir/bin/pip" ]; then
        say "creating venv $dir"
        "${PYTHON:-python3}" -m venv "$dir"
    fi
    say "pip install '$SPEC' (about 1.2 GB)"
    "$dir/bin/pip" install --disable-pip-version-check --progress-bar off "$SPEC" >&2
    local tree
    tree=$("$dir/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
    [ -x "$tree/bin/nvcc" ] || die "no nvcc in $tree after pip install"
    say "linking $cuda -> $tree"
    ln -sfn "$tree" "$cuda"
    nvcc_ok || die "$cuda/bin/nvcc is not release $RELEASE"
}

install_nccl() {
    if [ -e "$nccl/lib/libnccl.so" ]; then
        say "NCCL: present ($(readlink -f "$nccl/lib/libnccl.so"))"
        return
    fi
    [ -x "$dir/bin/pip" ] || die "no venv at $dir (the CUDA toolkit is installed first)"
    say "pip install '$NCCL_SPEC' (about 200 MB)"
    "$dir/bin/pip" install --disable-pip-version-check --progress-bar off "$NCCL_SPEC" >&2
    local tree lib
    tree=$("$dir/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "nccl"))')
    [ -d "$tree/lib" ] || die "no nvidia/nccl/lib in the venv after pip install"
    say "linking $nccl -> $tree"
    ln -sfn "$tree" "$nccl"
    lib=$(cd "$nccl/lib" && ls libnccl.so.[0-9]* 2>/dev/null | sort | head -n1)
    [ -n "$lib" ] || die "no libnccl.so.* in $nccl/lib"
    say "linking lib/libnccl.so -> $lib"
    ln -sfn "$lib" "$nccl/lib/libnccl.so"
}

# The wheels ship only versioned libraries (libcublas.so.13); the linker wants libcublas.so.
link_unversioned() {
    local name lib
    for name in $LIBS; do
        [ -e "$cuda/lib/lib$name.so" ] && continue
        lib=$(cd "$cuda/lib" && ls "lib$name".so.[0-9]* 2>/dev/null | sort | head -n1)
        [ -n "$lib" ] || die "no lib$name.so.* in $cuda/lib"
        say "linking lib/lib$name.so -> $lib"
        ln -s "$lib" "$cuda/lib/lib$name.so"
    done
}

# cudarc (candle's CUDA bindings) links libcuda, which only the driver installs. For linking,
# a stub that defines every driver entry point and has the real library's soname
# (libcuda.so.1) is enough; it lives in lib/stubs, which is never on LD_LIBRARY_PATH.
make_stub() {
    local stub=$cuda/lib/stubs/libcuda.so shipped
    if [ -e "$stub" ]; then
        say "libcuda.so stub: present ($stub)"
        return
    fi
    mkdir -p "$cuda/lib/stubs"
    shipped=$(find -L "$dir" -path '*/stubs/libcuda.so' -print -quit 2>/dev/null || true)
    if [ -n "$shipped" ]; then
        say "libcuda.so stub: linking the wheels' $shipped"
        ln -s "$shipped" "$stub"
        return
    fi
    command -v cc >/dev/null || die "no C compiler (cc) to build the libcuda.so stub"
    say "libcuda.so stub: building $stub from cuda.h's entry points"
    local tmp
    tmp=$(mktemp -d)
    # cuda.h's names (its macros name the versioned symbols, e.g. cuMemAlloc_v2), plus the
    # names cudarc's bindings declare, when its source is in the cargo registry.
    {
        grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\b' "$cuda/include/cuda.h" "$cuda"/include/cudaTypedefs.h 2>/dev/null || true
        for f in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys/mod.rs; do
            if [ -f "$f" ]; then
                grep -oE '^\s+fn cu[A-Z][A-Za-z0-9_]*\(' "$f" | sed -E 's/^\s+fn //; s/\($//' || true
            fi
        done
    } | sort -u |
        awk '{ printf "int %s(void) { return 34; } /* CUDA_ERROR_STUB_LIBRARY */\n", $1 }' >"$tmp/libcuda.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$tmp/libcuda.so" "$tmp/libcuda.c"
    mv "$tmp/libcuda.so" "$stub"
    rm -rf "$tmp"
    say "libcuda.so stub: $(nm -D --defined-only "$stub" | wc -l) symbols"
}

print_env() {
    local cap extra=
    cap=$(compute_cap)
    [ "$with_nccl" = 1 ] && extra=":$nccl/lib"
    cat <<EOF
export CUDA_ROOT='$cuda'
export CUDA_PATH='$cuda'
export CUDA_HOME='$cuda'
export CUDA_COMPUTE_CAP='$cap'
export CARGO_TARGET_DIR='$target'
export PATH='$cuda/bin':"\$PATH"
export LIBRARY_PATH='$cuda/lib:$cuda/lib/stubs$extra'\${LIBRARY_PATH:+:\$LIBRARY_PATH}
export LD_LIBRARY_PATH='$cuda/lib$extra'\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
EOF
}

check() {
    local ready=0 name
    print_env
    if nvcc_ok; then
        say "nvcc: $("$cuda/bin/nvcc" --version | grep -o 'release [^,]*, V[0-9.]*')"
    else
        say "nvcc $RELEASE: missing (run scripts/cuda-toolchain.sh --setup)"
        ready=1
    fi
    for name in $LIBS; do
        if [ -e "$cuda/lib/lib$name.so" ]; then
            say "lib$name.so: $(readlink -f "$cuda/lib/lib$name.so")"
        else
            say "lib$name.so: missing"
            ready=1
        fi
    done
    if [ "$with_nccl" = 1 ]; then
        if [ -e "$nccl/lib/libnccl.so" ]; then
            say "libnccl.so: $(readlink -f "$nccl/lib/libnccl.so")"
        else
            say "libnccl.so: missing (run scripts/cuda-toolchain.sh --nccl --setup)"
            ready=1
        fi
    fi
    if [ -e "$cuda/lib/stubs/libcuda.so" ]; then
        say "libcuda.so stub: $cuda/lib/stubs/libcuda.so"
    else
        say "libcuda.so stub: missing"
        ready=1
    fi
    if command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1; then
        say "GPU: $(nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader | head -n1)," \
            "driver's $(nvidia-smi | grep -o 'CUDA Version: [0-9.]*')"
    else
        say "GPU: none visible (building needs none; running needs a driver for CUDA >= $RELEASE)"
    fi
    return $ready
}

case $mode in
    check) check; exit ;;
    env) nvcc_ok || die "not set up: run scripts/cuda-toolchain.sh --setup"; print_env; exit ;;
esac

install_toolkit
link_unversioned
make_stub
[ "$with_nccl" = 1 ] && install_nccl
features=cuda
[ "$with_nccl" = 1 ] && features=cuda,nccl
[ "$mode" = setup ] && { say "set up: eval \"\$(scripts/cuda-toolchain.sh --env)\""; exit 0; }

eval "$(print_env)"
say "CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP; CUDA_ROOT=$CUDA_ROOT"
cd "$root"
say "cargo build --release --features $features --bin hindsight $*"
exe=$(cargo build --release --features "$features" --bin hindsight --message-format=json-render-diagnostics "$@" |
    "${PYTHON:-python3}" -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "hindsight":
        print(m["executable"])')
[ -n "$exe" ] || die "cargo built no hindsight binary"
say "built; run it with the CUDA libraries on LD_LIBRARY_PATH: eval \"\$(scripts/cuda-toolchain.sh --env)\""
echo "$exe"
