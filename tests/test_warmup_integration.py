"""Through a fresh real Triton server on the CPU (the cpu profile's repository, tiny checkpoint, free
ports): the server reports ready only after dual_ar planned its memory and warmed up and the codec
decoded its warm-up chunks, the plan is exported as metrics, and the first request's time to first
audio is that of later ones."""

import re
import statistics
import urllib.request

import pytest

from fish_s2.client import TTSClient
from fish_s2.serving import metrics
from fish_s2.serving.repository import generate
from fish_s2.serving.server import TritonServer, free_ports, pytriton_dist

try:
    pytriton_dist()
except FileNotFoundError as e:
    pytest.skip(f"no Triton server binary: {e}", allow_module_level=True)


@pytest.fixture(scope="module")
def fresh(tiny_checkpoint, tmp_path_factory):
    """A server that has served nothing yet: (server, metrics scraped the moment it reported ready)."""
    root = tmp_path_factory.mktemp("warmup")
    generate("cpu", tiny_checkpoint, root / "art", root / "repo")
    server = TritonServer(root / "repo", root / "run", *free_ports(3)).start()
    try:
        with urllib.request.urlopen(server.metrics_url, timeout=5) as r:
            yield server, r.read().decode()
    finally:
        server.stop()


def _gauge(text: str, name: str, **labels) -> float:
    label = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
    match = re.search(rf"^{re.escape(name + label)} (\S+)$", text, re.M)
    assert match, f"{name}{label} not exported"
    return float(match.group(1))


def test_ready_only_after_the_plan_and_the_warm_up(fresh):
    server, text = fresh
    assert _gauge(text, metrics.WARMUP.name, model="dual_ar") > 0          # set before ready was reported
    assert _gauge(text, metrics.WARMUP.name, model="codec_decoder") > 0
    assert _gauge(text, "fish_s2_kv_slots") == 16                          # derived, capped at max_slots
    assert _gauge(text, "fish_s2_kv_tokens_per_slot") == 2048 + 1024
    assert _gauge(text, "fish_s2_memory_planned_bytes", component="slow-AR KV") == \
        16 * 3072 * _gauge(text, "fish_s2_kv_bytes_per_token")
    assert _gauge(text, "fish_s2_memory_planned_bytes", component="total") > 0
    # the warm-up gauges above are set at the end of each model's initialize, and were scraped the moment the
    # server reported ready: that is the proof of the order. The log only orders each process's own lines: a
    # model's log lines reach the server's log through the stub's message queue, at times just after the
    # server's own "successfully loaded" line (seen 78 us after it for codec_decoder).
    log = server.log_path.read_text(errors="replace")
    ours = [log.index(s) for s in ("memory plan: cpu (torch runtime), dtype float32", "dual_ar: warm-up done in")]
    server_lines = [log.index(s) for s in ("successfully loaded 'dual_ar'", "successfully loaded 'codec_decoder'",
                                           "Started GRPCInferenceService")]
    assert ours == sorted(ours) and max(server_lines) == server_lines[-1], (ours, server_lines)
    assert "codec_decoder: warm-up done in" in log


def test_first_request_costs_what_later_ones_cost(fresh):
    server, _ = fresh
    with TTSClient(server.grpc_url, timeout_s=120) as client:
        assert client.ready()              # the channel is up: the first request pays no connection setup
        ttfa = [client.synthesize("The same short sentence.", seed=i, max_frames=8).time_to_first_audio
                for i in range(10)]
    later = statistics.median(ttfa[1:])    # the tenth's, robust to one slow request on a busy machine
    assert ttfa[0] <= 2 * later + 0.05, [round(t, 3) for t in ttfa]
