#!/usr/bin/env bash
# The network-namespace tests by hand (tests/netns_harness: each host a namespace of its
# own; needs root, iproute2, nftables, tc and TUN devices).
#
#   bash scripts/netns.sh test [ARGS]   build, then run tests/netns*.rs (ARGS go to the
#                                       test binaries, e.g. --ignored, --nocapture, a name)
#   bash scripts/netns.sh list          the harness's namespaces on this machine
#   bash scripts/netns.sh clean         remove those whose test process is gone
#   bash scripts/netns.sh clean --all   remove all of them (no netns test may be running)
#
# Skipped checks (no namespaces here, no TUN devices) are listed at the end, as in test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=scfmnet-

list() {
    ip netns list 2>/dev/null | awk '{print $1}' | grep "^$prefix" || true
}

remove() {
    local ns=$1 pid
    for pid in $(ip netns pids "$ns" 2>/dev/null); do
        kill -KILL "$pid" 2>/dev/null || true
    done
    ip netns del "$ns" && echo "removed $ns"
}

case "${1:-test}" in
    test)
        shift || true
        export SCFM_SKIP_LOG="$PWD/target/skipped-netns.log"
        mkdir -p target && : > "$SCFM_SKIP_LOG"
        cargo build --release
        status=0
        cargo test --release -p scfm-tests --test netns --test netns_coordinator \
            --test netns_links -- "$@" || status=$?
        n=$(wc -l < "$SCFM_SKIP_LOG")
        echo "[netns] skipped: $n"
        sed 's/^/[netns]   /' "$SCFM_SKIP_LOG"
        exit "$status"
        ;;
    list)
        list
        ;;
    clean)
        for ns in $(list); do
            owner=${ns#"$prefix"}
            owner=${owner%%-*}
            if [ "${2:-}" = --all ] || [ ! -d "/proc/$owner" ]; then
                remove "$ns"
            fi
        done
        ;;
    *)
        sed -n '2,10p' "$0"
        exit 2
        ;;
esac
