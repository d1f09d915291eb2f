#!/usr/bin/env bash
# The CUDA variant, hindsight:<version>-cuda: the binary built by scripts/cuda-toolchain.sh
# (candle's CUDA backend; PyPI's CUDA 13.0 runtime) plus the CUDA runtime libraries it uses
# (cudart, cuBLAS, cuRAND, NVRTC) and NCCL (the learner ranks' all-reduce: the build has the
# `cuda,nccl` features), in the same FROM-scratch layout as build-image.sh. The
# driver's libcuda.so.1 is not in the image: the NVIDIA container toolkit mounts it
# (`docker run --gpus all`, or `nvidia.com/gpu` on Kubernetes).
#
# usage: deploy/docker/build-cuda-image.sh [--tag NAME:TAG]...
# Runs only where the toolchain can be set up; it was run on a lent GPU machine only if the
# closing note of the change says so.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)
tags=()
while [ $# -gt 0 ]; do
    case $1 in
        --tag) tags+=(--tag "$2"); shift 2 ;;
        *) echo "build-cuda-image: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ ${#tags[@]} -gt 0 ] || tags=(--tag "hindsight:$version-cuda" --tag "hindsight:latest-cuda")
binary=$("$root/scripts/cuda-toolchain.sh" --nccl | tail -1)
eval "$("$root/scripts/cuda-toolchain.sh" --nccl --env)"
# The CUDA libraries the binary loads (dynamic-linking cudarc opens them by name at run time,
# so ldd does not list them all): every lib*.so* of the toolchain's lib directory and NCCL's.
nccl_lib=$(dirname "$CUDA_ROOT")/nccl/lib
[ -d "$CUDA_ROOT/lib" ] && [ -d "$nccl_lib" ] ||
    { echo "build-cuda-image: no $CUDA_ROOT/lib or $nccl_lib (scripts/cuda-toolchain.sh --nccl --setup)" >&2; exit 2; }
exec "$root/deploy/docker/build-image.sh" --binary "$binary" --cuda-libs "$CUDA_ROOT/lib" \
    --cuda-libs "$nccl_lib" "${tags[@]}"
