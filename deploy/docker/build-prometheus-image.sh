#!/usr/bin/env bash
# Builds hindsight-prometheus:<version> (and :latest) without pulling: Debian's `prometheus`
# package (server and promtool; Go binaries that need only libc), unpacked by
# scripts/prometheus-dist.sh, in a FROM-scratch image running as `nobody`, with
# deploy/prometheus/ (scrape config, recording and alerting rules) baked into /etc/prometheus.
#
# usage: deploy/docker/build-prometheus-image.sh [--tag NAME:TAG]...
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
docker=${DOCKER:-docker}
# shellcheck source=deploy/docker/lib.sh
. "$root/deploy/docker/lib.sh"
tags=()
while [ $# -gt 0 ]; do
    case $1 in
        --tag) tags+=("$2"); shift 2 ;;
        -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
        *) echo "build-prometheus-image: unknown argument $1" >&2; exit 2 ;;
    esac
done
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)
[ ${#tags[@]} -gt 0 ] || tags=("hindsight-prometheus:$version" "hindsight-prometheus:latest")

dist=$("$root/scripts/prometheus-dist.sh" | tail -1)
[ -x "$dist/usr/bin/prometheus" ] || { echo "build-prometheus-image: no prometheus binary under $dist" >&2; exit 2; }

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
fs=$ctx/rootfs
mkdir -p "$fs/bin" "$fs/etc/prometheus" "$ctx/prometheus"
cp -L "$dist/usr/bin/prometheus" "$dist/usr/bin/promtool" "$fs/bin/"
copy_with_libs "$fs/bin/prometheus" "$fs"
copy_with_libs "$fs/bin/promtool" "$fs"
cp -r "$root/deploy/prometheus/." "$fs/etc/prometheus/"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/prometheus:/sbin/nologin\n' >"$fs/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$fs/etc/group"
cat >"$ctx/Dockerfile" <<DOCKERFILE
FROM scratch
COPY rootfs/ /
COPY --chown=65534:65534 prometheus/ /prometheus/
USER 65534:65534
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus", "--web.enable-lifecycle"]
LABEL org.opencontainers.image.title=hindsight-prometheus org.opencontainers.image.version=$version
DOCKERFILE

build_tagged build-prometheus-image "$ctx" "${tags[@]}"
