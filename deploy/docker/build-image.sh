#!/usr/bin/env bash
# Builds the Hindsight image from a binary built here, pulling nothing (no registry needed):
# a FROM-scratch image holding the binary, the shared libraries `ldd` lists, a non-root user
# (10001) and data directories it owns. Every role is a subcommand of the one entrypoint.
#
# usage: deploy/docker/build-image.sh [--binary PATH] [--tag NAME:TAG]... [--cuda-libs DIR]
#   --binary     the hindsight binary (default target/release/hindsight)
#   --tag        image tags (default hindsight:<workspace version> and hindsight:latest)
#   --print-dockerfile  print the Dockerfile this script builds with, build nothing
#   --cuda-libs  also copy every lib*.so* under DIR (the CUDA runtime of a CUDA build, NCCL; see
#                build-cuda-image.sh) into /usr/local/cuda/lib and set LD_LIBRARY_PATH to it;
#                repeatable
# Prints the image id last. Environment: DOCKER (default docker).
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
docker=${DOCKER:-docker}
# shellcheck source=deploy/docker/lib.sh
. "$root/deploy/docker/lib.sh"
binary=$root/target/release/hindsight
cuda_libs=
print_only=
tags=()
while [ $# -gt 0 ]; do
    case $1 in
        --binary) binary=$2; shift 2 ;;
        --tag) tags+=("$2"); shift 2 ;;
        --cuda-libs) cuda_libs="$cuda_libs${cuda_libs:+:}$2"; shift 2 ;;
        --print-dockerfile) print_only=1; shift ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "build-image: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)
dockerfile() {
    echo 'FROM scratch'
    echo 'COPY rootfs/ /'
    # Named volumes mounted on these start out owned by the image's user.
    echo 'COPY --chown=10001:10001 data/ /data/'
    echo 'COPY tmp/ /tmp/'
    echo 'USER 10001:10001'
    echo 'WORKDIR /data'
    if [ -n "$cuda_libs" ]; then
        echo 'ENV HOME=/data HINDSIGHT_CACHE_DIR=/data/cache LD_LIBRARY_PATH=/usr/local/cuda/lib'
    else
        echo 'ENV HOME=/data HINDSIGHT_CACHE_DIR=/data/cache'
    fi
    echo 'EXPOSE 50051 50052 9101 9102 9103'
    # Every role answers /readyz on its metrics port; `health --local` finds the port from
    # HINDSIGHT_METRICS_ADDR (the role's own setting). No shell is needed.
    echo 'HEALTHCHECK --interval=5s --timeout=3s --start-period=60s --retries=3 CMD ["/usr/local/bin/hindsight", "health", "--local"]'
    echo 'ENTRYPOINT ["/usr/local/bin/hindsight"]'
    echo 'CMD ["--help"]'
    echo "LABEL org.opencontainers.image.title=hindsight org.opencontainers.image.version=$version org.opencontainers.image.licenses=Apache-2.0"
}
if [ -n "$print_only" ]; then dockerfile; exit 0; fi
[ ${#tags[@]} -gt 0 ] || tags=("hindsight:$version" "hindsight:latest")
[ -x "$binary" ] || { echo "build-image: no binary at $binary (run: cargo build --release --bin hindsight)" >&2; exit 2; }
command -v "$docker" >/dev/null || { echo "build-image: '$docker' not found: a Docker engine is needed" >&2; exit 2; }

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
fs=$ctx/rootfs
mkdir -p "$fs/usr/local/bin" "$fs/etc" "$ctx/data/cache" "$ctx/data/wal" "$ctx/data/checkpoints" \
    "$ctx/data/secrets" "$ctx/data/run" "$ctx/data/weights" "$ctx/tmp"
cp -L "$binary" "$fs/usr/local/bin/hindsight"
strip "$fs/usr/local/bin/hindsight" 2>/dev/null || true
copy_with_libs "$binary" "$fs"
if [ -n "$cuda_libs" ]; then
    mkdir -p "$fs/usr/local/cuda/lib"
    # Not lib/stubs: the driver's libcuda comes from the host.
    IFS=: read -r -a dirs <<<"$cuda_libs"
    for dir in "${dirs[@]}"; do
        find -L "$dir" -maxdepth 1 -name 'lib*.so*' -exec cp -L {} "$fs/usr/local/cuda/lib/" \;
    done
fi
printf 'root:x:0:0:root:/root:/sbin/nologin\nhindsight:x:10001:10001:hindsight:/data:/sbin/nologin\n' >"$fs/etc/passwd"
printf 'root:x:0:\nhindsight:x:10001:\n' >"$fs/etc/group"
echo "hindsight $version $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)" >"$fs/etc/hindsight-release"

dockerfile >"$ctx/Dockerfile"
chmod 1777 "$ctx/tmp"

build_tagged build-image "$ctx" "${tags[@]}"
