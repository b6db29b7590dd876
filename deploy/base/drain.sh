#!/bin/sh
# preStop hook of the fish-s2 pod: refuse new streams, then let the streams already running finish before
# Triton gets SIGTERM (after SIGTERM Triton refuses every new step of a running ensemble stream).
#
#   drain.sh [SETTLE_S [MAX_S]]     defaults 10 and 90 (fish_s2.serving.drain.SETTLE_S, MAX_S)
#
# 1. Create the drain flag ($FISH_S2_DRAIN_FILE, set on the container): preprocess now answers every new
#    tts request with UNAVAILABLE, and fish_s2's client retries it on another replica.
# 2. Sleep SETTLE_S while the pod's removal from the Service endpoints reaches kube-proxy, DNS and proxies.
# 3. Poll Triton's metrics every POLL_S seconds until the engine (fish_s2_requests_active + _queued) and
#    the chunks queued for codec_decoder and postprocess read 0 twice in a row with no chunk finished in
#    between, for at most MAX_S seconds (D). A request is capped at 1024 frames = 47.6 s of audio,
#    15-50 s at RTF 0.3-1.0, hence D = 90.
# Exits 0 in every case: when drained, when D has passed, or when the metrics cannot be read (no server).
# The same code drains the launcher (python -m fish_s2.serving.server) on SIGTERM.
#
# Timing: the kubelet counts preStop time against terminationGracePeriodSeconds, and Triton then needs up
# to --exit-timeout-secs to unload, so the Deployment keeps
#     terminationGracePeriodSeconds >= SETTLE_S + MAX_S + exit timeout     (tests/test_deploy.py checks it)
#
# Environment: FISH_S2_DRAIN_FILE (no flag when unset), FISH_S2_DRAIN_METRICS_URL (default
# http://127.0.0.1:8002/metrics), FISH_S2_DRAIN_POLL_S (default 2), FISH_S2_DRAIN_LOG (default
# /proc/1/fd/1: the container's log).
exec python3 -m fish_s2.serving.drain "$@"
