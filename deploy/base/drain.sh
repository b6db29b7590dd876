#!/bin/sh
# preStop hook of the fish-s2 pod: let the streams already running finish before Triton gets SIGTERM
# (after SIGTERM Triton refuses every new step of a running ensemble stream, so they must end first).
#
#   drain.sh [SETTLE_S [MAX_S]]     defaults 10 and 90
#
# 1. Sleep SETTLE_S while the pod's removal from the Service endpoints reaches kube-proxy, DNS and proxies.
# 2. Poll Triton's metrics every POLL_S seconds until fish_s2_requests_active + fish_s2_requests_queued
#    reads 0 twice in a row, for at most MAX_S seconds (D). A request is capped at 1024 frames = 47.6 s
#    of audio, 15-50 s at RTF 0.3-1.0, hence D = 90.
# Exits 0 in every case: when drained, when D has passed, or when the metrics cannot be read (no server).
#
# Timing: the kubelet counts preStop time against terminationGracePeriodSeconds, and Triton then needs up
# to --exit-timeout-secs to unload, so the Deployment keeps
#     terminationGracePeriodSeconds >= SETTLE_S + MAX_S + exit timeout     (tests/test_deploy.py checks it)
#
# Environment (tests): FISH_S2_DRAIN_METRICS_URL (default http://127.0.0.1:8002/metrics),
# FISH_S2_DRAIN_POLL_S (default 2), FISH_S2_DRAIN_LOG (default /proc/1/fd/1: the container's log).
set -u

SETTLE_S="${1:-10}"
MAX_S="${2:-90}"
POLL_S="${FISH_S2_DRAIN_POLL_S:-2}"
METRICS_URL="${FISH_S2_DRAIN_METRICS_URL:-http://127.0.0.1:8002/metrics}"
LOG="${FISH_S2_DRAIN_LOG:-/proc/1/fd/1}"

log() {
    { echo "drain: $*" >> "$LOG"; } 2>/dev/null || echo "drain: $*" >&2
}

# Requests in flight (active + queued) as an integer, or "unreachable".
in_flight() {
    python3 - "$METRICS_URL" <<'PY'
import re, sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
        text = r.read().decode("utf-8", "replace")
except Exception:
    print("unreachable")
    sys.exit(0)
line = re.compile(r"^fish_s2_requests_(?:active|queued)(?:\{[^}]*\})?\s+(\S+)")
print(int(sum(float(m.group(1)) for m in map(line.match, text.splitlines()) if m)))
PY
}

log "settling ${SETTLE_S} s, then waiting up to ${MAX_S} s for in-flight requests"
sleep "$SETTLE_S"
deadline=$(( $(date +%s) + MAX_S ))
zeros=0
while :; do
    n="$(in_flight)"
    if [ "$n" = "unreachable" ]; then
        log "metrics at ${METRICS_URL} unreachable: nothing to wait for"
        exit 0
    fi
    # The engine's count drops to 0 at a stream's last frame, while its last chunk is still in
    # codec_decoder/postprocess: call it drained on two zero readings POLL_S apart.
    if [ "$n" = "0" ]; then zeros=$(( zeros + 1 )); else zeros=0; fi
    if [ "$zeros" -ge 2 ]; then
        log "drained"
        exit 0
    fi
    left=$(( deadline - $(date +%s) ))
    if [ "$left" -le 0 ]; then
        log "${n:-unknown} request(s) in flight after ${MAX_S} s: stopping anyway"
        exit 0
    fi
    if [ "$left" -lt "$POLL_S" ]; then sleep "$left"; else sleep "$POLL_S"; fi
done
