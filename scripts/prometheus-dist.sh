#!/usr/bin/env bash
# Prometheus and promtool without installing anything system-wide: downloads Debian's
# `prometheus` package (`apt-get download`, which needs no root) and unpacks it with
# `dpkg-deb -x` into ${HINDSIGHT_CACHE:-$HOME/.cache/hindsight}/prometheus-<version>/, then
# prints that directory. The tree holds usr/bin/prometheus and usr/bin/promtool (Go binaries that
# need only libc). Idempotent: a complete unpacked tree is reused without touching apt.
#
# Used by the tests (promtool check/test, a real Prometheus scraping `hindsight up`) and to build
# the Prometheus image. Set PROMETHEUS_DEB=/path/to/prometheus_*.deb to unpack a package you
# already have instead of downloading one.
set -euo pipefail

cache="${HINDSIGHT_CACHE:-$HOME/.cache/hindsight}"
mkdir -p "$cache"

complete() { [ -x "$1/usr/bin/prometheus" ] && [ -x "$1/usr/bin/promtool" ]; }

# One unpacker at a time (tests run in parallel threads and binaries).
exec 9>"$cache/.prometheus-dist.lock"
flock 9

for dir in "$cache"/prometheus-*/; do
    dir="${dir%/}"
    if [ -d "$dir" ] && complete "$dir"; then
        echo "$dir"
        exit 0
    fi
done

work="$(mktemp -d "$cache/.prometheus-dist.XXXXXX")"
trap 'rm -rf "$work"' EXIT

deb="${PROMETHEUS_DEB:-}"
if [ -z "$deb" ]; then
    command -v apt-get >/dev/null || {
        echo "prometheus-dist: apt-get not found: this script needs a Debian-based system" \
            "(or PROMETHEUS_DEB=path/to/prometheus.deb)" >&2
        exit 1
    }
    candidate() { apt-cache policy prometheus 2>/dev/null | awk '/Candidate:/ {print $2}'; }
    if [ -z "$(candidate)" ] || [ "$(candidate)" = "(none)" ]; then
        # The package lists are empty (a fresh container): only root can refresh them.
        if [ "$(id -u)" = 0 ]; then
            echo "prometheus-dist: package lists empty; running apt-get update" >&2
            apt-get update -qq >&2 || {
                echo "prometheus-dist: apt-get update failed" >&2
                exit 1
            }
        else
            echo "prometheus-dist: apt knows no 'prometheus' package and refreshing its lists" \
                "needs root: run 'sudo apt-get update' once, or set PROMETHEUS_DEB" >&2
            exit 1
        fi
    fi
    if [ -z "$(candidate)" ] || [ "$(candidate)" = "(none)" ]; then
        echo "prometheus-dist: no 'prometheus' package in the configured apt sources" >&2
        exit 1
    fi
    # apt-get download writes into the current directory; as root it warns that the _apt
    # user cannot write there (harmless), so its output goes to stderr.
    (cd "$work" && apt-get download -qq prometheus >&2) || {
        echo "prometheus-dist: 'apt-get download prometheus' failed" >&2
        exit 1
    }
    deb="$(ls "$work"/prometheus_*.deb 2>/dev/null | head -n1)"
    [ -n "$deb" ] || {
        echo "prometheus-dist: apt-get download left no prometheus_*.deb" >&2
        exit 1
    }
fi

[ -f "$deb" ] || {
    echo "prometheus-dist: no such package file: $deb" >&2
    exit 1
}
version="$(dpkg-deb -f "$deb" Version)" || {
    echo "prometheus-dist: $deb is not a Debian package" >&2
    exit 1
}
# Debian versions may hold ':' (epoch) and '+': keep the directory name plain.
version="${version#*:}"
dest="$cache/prometheus-${version//[^A-Za-z0-9.+_-]/_}"
dpkg-deb -x "$deb" "$work/tree"
complete "$work/tree" || {
    echo "prometheus-dist: $deb holds no usr/bin/prometheus and usr/bin/promtool" >&2
    exit 1
}
"$work/tree/usr/bin/promtool" --version >/dev/null 2>&1 || {
    echo "prometheus-dist: the unpacked promtool does not run on this machine" >&2
    exit 1
}
rm -rf "$dest"
mv "$work/tree" "$dest"
echo "$dest"
