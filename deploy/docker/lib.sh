# Shared by the image scripts of this folder (sourced, not run): the FROM-scratch recipe's two
# steps that do not depend on what the image holds.

# copy_with_libs BINARY ROOTFS: the binary's dynamic loader and every library `ldd` lists,
# at their own paths under ROOTFS (the binary itself is the caller's to place).
copy_with_libs() {
    local lib
    for lib in $(ldd "$1" 2>/dev/null | grep -o '/[^ ]*' | sort -u); do
        cp --parents -L "$lib" "$2/"
    done
}

# build_tagged NAME CONTEXT TAG...: a legacy-builder build (no buildx here) of CONTEXT under
# every TAG; removes the image the first tag pointed to before (the legacy builder leaves it
# dangling), reports the size on stderr and prints the image id.
build_tagged() {
    local name=$1 ctx=$2 old id t
    shift 2
    local args=()
    for t in "$@"; do args+=(-t "$t"); done
    old=$("$docker" image inspect -f '{{.Id}}' "$1" 2>/dev/null || true)
    DOCKER_BUILDKIT=0 "$docker" build -q "${args[@]}" "$ctx" >/dev/null
    id=$("$docker" image inspect -f '{{.Id}}' "$1")
    if [ -n "$old" ] && [ "$old" != "$id" ]; then
        "$docker" image rm "$old" >/dev/null 2>&1 || true
    fi
    echo "$name: $* ($(( $("$docker" image inspect -f '{{.Size}}' "$id") / 1000000 )) MB)" >&2
    echo "$id"
}
