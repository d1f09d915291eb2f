#!/usr/bin/env bash
# The multi-rank learner on a GPU, as one short run for a lent machine (one GPU): logs and
# results in one folder. Each step is `hindsight bench ranks` (real learner steps: gradients,
# the collective, AdamW; every run ends with the ranks' weight-digest check, so ranks that
# disagree fail it):
#   1. nccl-1rank   the NCCL path with world size 1 (communicator, in-place all-reduce on the
#                   compute stream, watchdog) and a training step on the GPU
#   2. tcp-2ranks   two ranks on cuda:0 over the TCP collective (gradients through the host)
#   3. nccl-2ranks  two NCCL ranks sharing cuda:0 (NCCL >= 2.30 with
#                   NCCL_MULTI_RANK_GPU_ENABLE=1; "Duplicate GPU detected" otherwise)
#   4. cpu-2ranks   the same bench on the CPU, for the side-by-side table
# Then the step time, the time in the reduction and the collective's bytes of each, side by
# side, in summary.txt.
#
# usage: scripts/gpu-ranks.sh [BINARY] [RESULTS_DIR]
#   BINARY       a `--features cuda,nccl` build (default: what `scripts/cuda-toolchain.sh --nccl`
#                builds, target/cuda/release/hindsight)
#   RESULTS_DIR  default: bench/out/gpu-ranks-<date>-<time>
# Environment: HINDSIGHT_BENCH_MODEL (default smollm2; tiny for a quick check),
# HINDSIGHT_BENCH_SEQUENCES (16), HINDSIGHT_BENCH_STEPS (3), STEP_TIMEOUT (seconds per step,
# default 240).
set -euo pipefail
abs() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
[ $# -ge 1 ] && bin=$(abs "$1")
[ $# -ge 2 ] && out=$(abs "$2")
cd "$(dirname "$0")/.."
bin=${bin:-$(abs "${CARGO_TARGET_DIR:-target/cuda}")/release/hindsight}
out=${out:-bench/out/gpu-ranks-$(date +%Y%m%d-%H%M%S)}
model=${HINDSIGHT_BENCH_MODEL:-smollm2}
sequences=${HINDSIGHT_BENCH_SEQUENCES:-16}
steps=${HINDSIGHT_BENCH_STEPS:-3}
step_timeout=${STEP_TIMEOUT:-240}
[ -x "$bin" ] || { echo "gpu-ranks: no binary at $bin (build it: scripts/cuda-toolchain.sh --nccl)" >&2; exit 1; }

nvidia-smi >/dev/null 2>&1 || { echo "gpu-ranks: nvidia-smi failed: no NVIDIA GPU or driver here" >&2; exit 1; }
# The CUDA 13 and NCCL libraries the binary links: scripts/cuda-toolchain.sh's, else those of
# python3's nvidia wheels (PyTorch's cu130 build has them; its NCCL may be older than 2.30,
# which refuses two ranks on one GPU: put a newer libnccl.so.2 first on LD_LIBRARY_PATH).
if scripts/cuda-toolchain.sh --nccl --check >/dev/null 2>&1; then
    eval "$(scripts/cuda-toolchain.sh --nccl --env)"
elif nv=$(python3 -c 'import nvidia, os; print(list(nvidia.__path__)[0])' 2>/dev/null); then
    for lib in "$nv/cu13/lib" "$nv/nccl/lib"; do
        [ -d "$lib" ] && export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$lib
    done
fi
if ldd "$bin" | grep 'not found'; then
    echo "gpu-ranks: libraries missing for $bin (set up: scripts/cuda-toolchain.sh --nccl --setup)" >&2
    exit 1
fi
mkdir -p "$out"
echo "gpu-ranks: $bin -> $out (model $model)"
nvidia-smi -q >"$out/nvidia-smi.txt"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw --format=csv -l 1 \
    >"$out/gpu-usage.csv" &
smi=$!
trap 'kill $smi 2>/dev/null || true' EXIT

# The model once, before anything is timed.
"$bin" fetch-model --model "$model" >"$out/fetch-model.log" 2>&1 || true

status=0
run() {
    local name=$1
    shift
    echo "gpu-ranks: $name: $*"
    local started=$SECONDS
    if timeout "$step_timeout" env "$@" "$bin" bench ranks --model "$model" --sequences "$sequences" \
        --steps "$steps" --warmup 1 --out "$out/$name" >"$out/$name.log" 2>&1; then
        echo "gpu-ranks: $name: ok in $((SECONDS - started)) s"
    else
        echo "gpu-ranks: $name: FAILED (exit $?) after $((SECONDS - started)) s; last lines:" >&2
        tail -n 15 "$out/$name.log" >&2
        status=1
    fi
}
run nccl-1rank HINDSIGHT_BENCH_DEVICE=cuda:0 HINDSIGHT_BENCH_COLLECTIVE=nccl HINDSIGHT_BENCH_CONFIGS=1x4
run tcp-2ranks HINDSIGHT_BENCH_DEVICE=cuda:0 HINDSIGHT_BENCH_COLLECTIVE=tcp HINDSIGHT_BENCH_CONFIGS=1x4,2x4
run nccl-2ranks NCCL_MULTI_RANK_GPU_ENABLE=1 NCCL_DEBUG=WARN HINDSIGHT_BENCH_DEVICE=cuda:0 \
    HINDSIGHT_BENCH_COLLECTIVE=nccl HINDSIGHT_BENCH_CONFIGS=2x4
run cpu-2ranks HINDSIGHT_BENCH_DEVICE=cpu HINDSIGHT_BENCH_COLLECTIVE=tcp HINDSIGHT_BENCH_CONFIGS=1x8,2x4

python3 - "$out" >"$out/summary.txt" <<'EOF' || true
import json, os, sys
out = sys.argv[1]
print(f"{'run':<12} {'config':>6} {'device':>7} {'collective':>10} {'step s':>8} {'reduce s':>9} {'MB/step':>8}  weights")
for name in ["nccl-1rank", "tcp-2ranks", "nccl-2ranks", "cpu-2ranks"]:
    path = os.path.join(out, name, "ranks.json")
    if not os.path.exists(path):
        print(f"{name:<12} (no result)")
        continue
    for r in json.load(open(path))["results"]:
        print(f"{name:<12} {r['config']:>6} {r['device']:>7} {r['collective']:>10} "
              f"{r['step_seconds']:8.3f} {r['reduce_seconds']:9.4f} "
              f"{r['collective_bytes_per_step'] / 1e6:8.1f}  {r['weights_sha256'].removeprefix('sha256:')[:12]}")
EOF
cat "$out/summary.txt"
echo "gpu-ranks: results in $out"
exit $status
