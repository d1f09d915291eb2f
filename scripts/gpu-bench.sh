#!/usr/bin/env bash
# The GPU benchmark run: `hindsight bench generate` and `hindsight bench train` on CUDA, logs and
# results in one folder, with nvidia-smi's view of the GPU before and during the run.
#
# usage: scripts/gpu-bench.sh [BINARY] [RESULTS_DIR]
#   BINARY       a `--features cuda` build (default: what scripts/cuda-toolchain.sh builds,
#                target/cuda/release/hindsight, or release/hindsight under $CARGO_TARGET_DIR)
#   RESULTS_DIR  default: bench/out/gpu-<date>-<time>
# The benches' other flags go in as their environment variables (HINDSIGHT_BENCH_MODEL,
# HINDSIGHT_BENCH_BATCH_SIZES, HINDSIGHT_BENCH_NO_PEER=true, ...; see `hindsight bench generate --help`).
set -euo pipefail
abs() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
[ $# -ge 1 ] && bin=$(abs "$1")
[ $# -ge 2 ] && out=$(abs "$2")
cd "$(dirname "$0")/.."
bin=${bin:-$(abs "${CARGO_TARGET_DIR:-target/cuda}")/release/hindsight}
out=${out:-bench/out/gpu-$(date +%Y%m%d-%H%M%S)}
[ -x "$bin" ] || { echo "gpu-bench: no binary at $bin (build it: scripts/cuda-toolchain.sh)" >&2; exit 1; }

# The GPU and its driver. The kernels are PTX from CUDA 13.0, which needs a driver for CUDA >= 13.0.
nvidia-smi || { echo "gpu-bench: nvidia-smi failed: no NVIDIA GPU or driver here" >&2; exit 1; }
driver_cuda=$(nvidia-smi | grep -o 'CUDA Version: [0-9]*' | grep -o '[0-9]*$' || echo 0)
[ "$driver_cuda" -ge 13 ] || { echo "gpu-bench: the driver supports CUDA $driver_cuda, this build needs 13.0 or newer" >&2; exit 1; }

# The CUDA 13 libraries the binary links (cuBLAS, cuRAND, runtime): scripts/cuda-toolchain.sh's,
# else those of python3's nvidia wheels (PyTorch's cu130 build has them).
if scripts/cuda-toolchain.sh --check >/dev/null 2>&1; then
    eval "$(scripts/cuda-toolchain.sh --env)"
elif lib=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null) &&
    [ -d "$lib" ]; then
    export LD_LIBRARY_PATH=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
if ldd "$bin" | grep 'not found'; then
    echo "gpu-bench: libraries missing for $bin (set up: scripts/cuda-toolchain.sh --setup)" >&2
    exit 1
fi

# The PyTorch peers: bench/.venv's python (bench/README.md), else a python3 that has torch and
# transformers (a GPU machine's own, e.g. PyTorch's cu130 image).
if [ -z "${HINDSIGHT_BENCH_PYTHON:-}" ] && [ ! -x bench/.venv/bin/python ] &&
    python3 -c 'import torch, transformers' 2>/dev/null; then
    export HINDSIGHT_BENCH_PYTHON=python3
fi

mkdir -p "$out"
echo "gpu-bench: $bin -> $out"
nvidia-smi -q >"$out/nvidia-smi.txt"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw --format=csv -l 1 \
    >"$out/gpu-usage.csv" &
smi=$!
trap 'kill $smi 2>/dev/null || true' EXIT

status=0
for bench in generate train; do
    echo "gpu-bench: hindsight bench $bench --device cuda --out $out/$bench"
    "$bin" bench "$bench" --device cuda --out "$out/$bench" 2>&1 | tee "$out/$bench.log" ||
        { status=1; echo "gpu-bench: bench $bench failed (see $out/$bench.log)" >&2; }
done
echo "gpu-bench: results in $out"
exit $status
