"""deploy/: render every Kustomize overlay and check it offline (no cluster, no network, a few seconds).

* Rendering: ``deploy/render.py`` (the Kustomize subset the overlays use); where ``kubectl`` is
  installed, ``kubectl kustomize`` must give the same objects.
* Core kinds: validated with ``kubernetes-validate`` (bundled Kubernetes JSON schemas, ``strict``: unknown
  fields fail) against every version in K8S_VERSIONS. ServiceMonitor (a Prometheus Operator CRD, not in
  those schemas): validated with SERVICEMONITOR_SCHEMA below, the fields deploy/ uses with the CRD's types
  and pattern (prometheus-operator v0.87 ``monitoring.coreos.com_servicemonitors.yaml``), unknown fields
  rejected.
* Deliberately broken manifests must fail; the drain timing, metric names, image, probes and volumes are
  checked against the code they refer to; drain.sh runs against a fake metrics endpoint.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

from fish_s2.serving import drain, metrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("gpu", "cpu-demo")
K8S_VERSIONS = ("1.30", "1.33")          # oldest version these manifests target; the version the spec used
PLANNED_METRICS: set[str] = set()   # dashboard panels waiting for a metric (none now)
TRITON_METRICS = {"nv_gpu_utilization"}

_spec = importlib.util.spec_from_file_location("deploy_render", DEPLOY / "render.py")
render = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render)

DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
SERVICEMONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"], "additionalProperties": False,
                     "properties": {"name": {"type": "string", "minLength": 1}, "namespace": {"type": "string"},
                                    "labels": LABELS, "annotations": LABELS}},
        "spec": {
            "type": "object", "required": ["endpoints", "selector"], "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "additionalProperties": False, "minProperties": 1,
                             "properties": {"matchLabels": LABELS}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["port"], "additionalProperties": False,
                    "properties": {"port": {"type": "string", "minLength": 1},
                                   "path": {"type": "string", "pattern": "^/"},
                                   "interval": {"type": "string", "pattern": DURATION},
                                   "scrapeTimeout": {"type": "string", "pattern": DURATION}}}},
            },
        },
    },
}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render.render(DEPLOY / "overlays" / name) for name in OVERLAYS}


def one(objects: list[dict], kind: str, name: str = "fish-s2") -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


def container(pod: dict, name: str, field: str = "containers") -> dict:
    return next(c for c in pod[field] if c["name"] == name)


def flag(args: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    assert len(values) == 1, f"--{name}: {values}"
    return values[0]


def validate(obj: dict) -> None:
    """Every version in K8S_VERSIONS, strict; the ServiceMonitor against SERVICEMONITOR_SCHEMA."""
    if obj["kind"] == "ServiceMonitor":
        jsonschema.validate(obj, SERVICEMONITOR_SCHEMA)
        return
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


# --- rendering and schemas ---------------------------------------------------------------------------

EXPECTED = {("ConfigMap", "fish-s2-drain"), ("ConfigMap", "fish-s2-dashboard"), ("Deployment", "fish-s2"),
            ("Service", "fish-s2"), ("PodDisruptionBudget", "fish-s2"), ("ServiceMonitor", "fish-s2"),
            ("HorizontalPodAutoscaler", "fish-s2"), ("PersistentVolumeClaim", "fish-s2-voices")}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_expected_objects(rendered, overlay):
    got = {(o["kind"], o["metadata"]["name"]) for o in rendered[overlay]}
    extra = {("PersistentVolumeClaim", "fish-s2-models")} if overlay == "gpu" else set()
    assert got == EXPECTED | extra


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_manifest_validates(rendered, overlay):
    for obj in rendered[overlay]:
        validate(obj)
    assert render.main([str(DEPLOY / "overlays" / overlay)]) == 0


def test_only_the_servicemonitor_lacks_a_core_schema(rendered):
    """A core kind must never be skipped as 'no schema' (a wrong apiVersion would pass unchecked)."""
    for obj in rendered["gpu"]:
        if obj["kind"] == "ServiceMonitor":
            with pytest.raises(SchemaNotFoundError):
                kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)
        else:
            assert kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True) == K8S_VERSIONS[-1]
    typo = {**one(rendered["gpu"], "Deployment"), "apiVersion": "apps/v2"}
    with pytest.raises(SchemaNotFoundError):
        kubernetes_validate.validate(typo, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renderer_matches_kubectl_kustomize(rendered, overlay):
    kubectl, kustomize = shutil.which("kubectl"), shutil.which("kustomize")
    if not (kubectl or kustomize):
        pytest.skip("no kubectl or kustomize installed: deploy/render.py alone renders the overlays")
    cmd = [kustomize, "build"] if kustomize else [kubectl, "kustomize"]
    out = subprocess.run(cmd + [str(DEPLOY / "overlays" / overlay)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    theirs = {render.object_id(o): o for o in yaml.safe_load_all(out) if o}
    ours = {render.object_id(o): o for o in rendered[overlay]}
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert ours[key] == theirs[key], key


# --- deliberately broken manifests must fail ----------------------------------------------------------

def _deployment(rendered) -> dict:
    return json.loads(json.dumps(one(rendered["gpu"], "Deployment")))     # a deep copy


def _break_replicas(d):
    d["spec"]["replicas"] = "two"                                      # wrong type


def _break_pod_field(d):
    d["spec"]["template"]["spec"]["terminationGracePeriod"] = 30       # unknown field (typo)


def _break_container_field(d):
    container(d["spec"]["template"]["spec"], "triton")["livenesProbe"] = {}    # unknown field (typo)


def _break_port_type(d):
    container(d["spec"]["template"]["spec"], "triton")["ports"][0]["containerPort"] = "8000"   # wrong type


def _break_probe(d):
    container(d["spec"]["template"]["spec"], "triton")["startupProbe"]["periodSeconds"] = "10s"


@pytest.mark.parametrize("breaker", [_break_replicas, _break_pod_field, _break_container_field,
                                     _break_port_type, _break_probe])
def test_broken_deployment_fails(rendered, breaker):
    validate(_deployment(rendered))            # the unbroken copy passes
    broken = _deployment(rendered)
    breaker(broken)
    with pytest.raises(ValidationError):
        validate(broken)


@pytest.mark.parametrize("change", [
    lambda s: s["spec"]["endpoints"][0].update(interval="15 seconds"),
    lambda s: s["spec"]["endpoints"][0].update(targetPort=8002),    # not a field deploy/ uses: rejected
    lambda s: s["spec"]["endpoints"][0].update(port=8002),
    lambda s: s["spec"].pop("selector"),
    lambda s: s.update(apiVersion="monitoring.coreos.com/v1beta1"),
])
def test_broken_servicemonitor_fails(rendered, change):
    sm = json.loads(json.dumps(one(rendered["gpu"], "ServiceMonitor")))
    change(sm)
    with pytest.raises(jsonschema.ValidationError):
        validate(sm)


def test_broken_overlay_fails_end_to_end(tmp_path):
    """A copy of deploy/ whose cpu-demo patch has a typo renders, and then fails validation."""
    shutil.copytree(DEPLOY, tmp_path / "deploy", symlinks=True)
    patch = tmp_path / "deploy/overlays/cpu-demo/deployment.yaml"
    patch.write_text(patch.read_text().replace("    spec:\n      initContainers:",
                                               "    spec:\n      terminationGracePeriod: 30\n      initContainers:"))
    objects = render.render(tmp_path / "deploy/overlays/cpu-demo")
    with pytest.raises(ValidationError, match="terminationGracePeriod"):
        for obj in objects:
            validate(obj)


def test_renderer_rejects_what_it_does_not_implement(tmp_path):
    shutil.copytree(DEPLOY, tmp_path / "deploy", symlinks=True)
    overlay = tmp_path / "deploy/overlays/cpu-demo"
    kfile = overlay / "kustomization.yaml"
    original = kfile.read_text()
    kfile.write_text(original + "namePrefix: demo-\n")
    with pytest.raises(render.RenderError, match="namePrefix"):
        render.render(overlay)
    kfile.write_text(original)
    (overlay / "hpa.yaml").write_text((overlay / "hpa.yaml").read_text().replace("name: fish-s2", "name: other"))
    with pytest.raises(render.RenderError, match="matches 0 objects"):
        render.render(overlay)


def test_strategic_merge_rules():
    base = {"spec": {"containers": [{"name": "a", "image": "x", "args": ["1"]}, {"name": "b", "image": "y"}],
                     "volumes": [{"name": "v", "emptyDir": {}}], "tolerations": [{"key": "k"}], "keep": 1}}
    patch = {"spec": {"containers": [{"name": "c", "image": "z"}, {"name": "a", "args": ["2"]}],
                      "volumes": [{"name": "v", "$patch": "delete"}], "tolerations": [{"key": "t"}],
                      "keep": None}}
    assert render.merge(base, patch) == {"spec": {
        "containers": [{"name": "c", "image": "z"}, {"name": "a", "image": "x", "args": ["2"]},
                       {"name": "b", "image": "y"}],
        "volumes": [], "tolerations": [{"key": "t"}]}}
    obj = {"spec": {"initContainers": [{"name": "i", "image": "fish-s2"}],
                    "containers": [{"name": "c", "image": "fish-s2:old"}, {"name": "d", "image": "other:1"}]}}
    render.set_images(obj, [{"name": "fish-s2", "newName": "reg:5000/fish-s2/serve", "newTag": "0.1.0"}])
    assert [c["image"] for c in obj["spec"]["initContainers"] + obj["spec"]["containers"]] == \
        ["reg:5000/fish-s2/serve:0.1.0", "reg:5000/fish-s2/serve:0.1.0", "other:1"]


# --- the pod: Triton, probes, volumes, drain timing ---------------------------------------------------

DRAIN_TEXT = (DEPLOY / "base" / "drain.sh").read_text()


def drain_defaults() -> tuple[int, int]:
    """drain.sh runs fish_s2.serving.drain, whose defaults these are."""
    assert "exec python3 -m fish_s2.serving.drain \"$@\"" in DRAIN_TEXT
    return drain.SETTLE_S, drain.MAX_S


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_drain_timing_is_consistent(rendered, overlay):
    """terminationGracePeriodSeconds >= SETTLE + D + Triton's --exit-timeout-secs, for every preStop."""
    pod = one(rendered[overlay], "Deployment")["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    exit_timeout = int(flag(container(pod, "triton")["args"], "exit-timeout-secs"))
    drain_cm = one(rendered[overlay], "ConfigMap", "fish-s2-drain")
    assert drain_cm["data"]["drain.sh"] == DRAIN_TEXT
    assert (DEPLOY / "drain.sh").resolve() == (DEPLOY / "base" / "drain.sh").resolve()
    volume = next(v for v in pod["volumes"] if v.get("configMap", {}).get("name") == "fish-s2-drain")
    flags = set()
    for name in ("triton", "openai"):
        c = container(pod, name)
        command = c["lifecycle"]["preStop"]["exec"]["command"]
        mount = next(m for m in c["volumeMounts"] if m["name"] == volume["name"])
        assert command[:2] == ["/bin/sh", f"{mount['mountPath']}/drain.sh"]
        settle, most = (list(map(int, command[2:])) + list(drain_defaults())[len(command) - 2:])[:2]
        assert grace >= settle + most + exit_timeout, (name, grace, settle, most, exit_timeout)
        assert most >= 60        # a 1024-frame request (47.6 s of audio) at RTF up to ~1
        # the drain switch: one flag file, on a writable volume both containers mount
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        flag_file = Path(env[drain.FILE_ENV])
        flag_mount = next(m for m in c["volumeMounts"] if m["mountPath"] == str(flag_file.parent))
        assert not flag_mount.get("readOnly") and "emptyDir" in next(v for v in pod["volumes"]
                                                                     if v["name"] == flag_mount["name"])
        flags.add((str(flag_file), flag_mount["name"]))
    assert len(flags) == 1
    assert sum(drain_defaults()) + exit_timeout <= grace


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_wiring(rendered, overlay):
    objects = rendered[overlay]
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert "replicas" not in deployment["spec"]                       # the HPA owns it
    volumes = {v["name"]: v for v in pod["volumes"]}
    triton = container(pod, "triton")
    mounts = {m["mountPath"]: m for m in triton["volumeMounts"]}
    assert triton["command"] == ["tritonserver"]
    args = triton["args"]
    repo = flag(args, "model-repository")
    assert volumes[mounts[repo]["name"]]["emptyDir"] is not None and mounts[repo]["readOnly"]
    init = container(pod, "model-repository", "initContainers")
    assert init["command"] == ["python3", "-m", "fish_s2.serving.repository"]
    assert flag(init["args"], "out") == repo
    assert any(m["mountPath"] == repo and m["name"] == mounts[repo]["name"] for m in init["volumeMounts"])
    assert flag(init["args"], "voices-dir") == "/voices"
    assert volumes[mounts["/voices"]["name"]]["persistentVolumeClaim"]["claimName"] == "fish-s2-voices"
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    assert "--disable-auto-complete-config" in args
    for proto in ("http", "grpc", "metrics"):
        assert flag(args, f"{proto}-address") == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for c in pod["containers"] for p in c.get("ports", [])}
    assert {flag(args, f"{p}-port") for p in ("http", "grpc", "metrics")} == \
        {str(ports["http"]), str(ports["grpc"]), str(ports["metrics"])}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002, "openai": 8080}
    assert flag(container(pod, "openai")["args"], "port") == "8080"
    service = one(objects, "Service")
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == \
        {name: (port, name) for name, port in ports.items()}
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (service["spec"]["selector"], one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
                     deployment["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    assert one(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    probes = {kind: triton[kind]["httpGet"]["path"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes == {"startupProbe": "/v2/health/ready", "readinessProbe": "/v2/health/ready",
                      "livenessProbe": "/v2/health/live"}
    startup = triton["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600   # a long model load
    assert deployment["spec"]["progressDeadlineSeconds"] > startup["periodSeconds"] * startup["failureThreshold"]
    for c in pod["containers"] + pod["initContainers"]:
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    monitor = one(objects, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


def test_gpu_overlay(rendered):
    objects = rendered["gpu"]
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    versions = dict(line.split("=", 1) for line in (ROOT / "build/versions.env").read_text().splitlines()
                    if re.match(r"^[A-Z_]+=", line))
    assert {c["image"] for c in pod["containers"] + pod["initContainers"]} == {versions["IMAGE"]}
    triton = container(pod, "triton")
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert triton["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert flag(triton["args"], "allow-gpu-metrics") == "true"
    init = container(pod, "model-repository", "initContainers")
    assert flag(init["args"], "profile") == "gpu"
    models = next(v for v in pod["volumes"] if v["name"] == "models")
    assert models["persistentVolumeClaim"] == {"claimName": "fish-s2-models", "readOnly": True}
    assert all(m.get("readOnly") for c in pod["containers"] + pod["initContainers"]
               for m in c["volumeMounts"] if m["name"] == "models")
    assert {flag(init["args"], "checkpoint"), flag(init["args"], "artifacts")} == \
        {"/models/checkpoint", "/models/export"}
    assert one(objects, "PersistentVolumeClaim", "fish-s2-voices")["spec"]["accessModes"] == ["ReadWriteMany"]
    assert one(objects, "PersistentVolumeClaim", "fish-s2-models")["spec"]["accessModes"] == ["ReadOnlyMany"]


def test_cpu_demo_overlay(rendered):
    objects = rendered["cpu-demo"]
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in json.dumps(objects)
    assert {c["image"] for c in pod["containers"] + pod["initContainers"]} == {"fish-s2/serve-cpu:0.1.0"}
    assert flag(container(pod, "model-repository", "initContainers")["args"], "profile") == "cpu"
    assert flag(container(pod, "triton")["args"], "allow-gpu-metrics") == "false"
    assert "models" not in json.dumps(pod["volumes"]) and "/models" not in json.dumps(pod["containers"])
    hpa = one(objects, "HorizontalPodAutoscaler")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 2)
    dockerfile = (DEPLOY / "images/cpu.Dockerfile").read_text()
    assert dockerfile.startswith("# syntax=docker/dockerfile:1") and "FROM python:3.11-slim" in dockerfile
    for path in ("/models/checkpoint", "/models/export"):          # where the init container reads them
        assert path in dockerfile
    # the request sweep: built in a stage with a compiler, found (not rebuilt) by the wrapper's generator,
    # preloaded into tritonserver by the wrapper
    assert "RUN python3 /src/sweep.py /out" in dockerfile and "COPY --from=sweep /out/ /opt/fish-s2/lib/" in dockerfile
    assert 'sweep.build(Path("/opt/fish-s2/lib"))' in dockerfile and "export LD_PRELOAD=" in dockerfile


# --- metrics: HPA, prometheus-adapter, dashboard ------------------------------------------------------

DEFINED = {d.name: d for d in metrics.ALL}


def max_active(profile: str) -> int:
    """The most slots (engine.max_active) a pod of the profile gets: its max_slots, the cap on the slot
    count dual_ar derives from the memory (for either runtime the one source of the engine's limits)."""
    from fish_s2.serving.repository import PROFILE_SETTINGS
    settings = PROFILE_SETTINGS[profile][0]
    return settings["engine"]["max_active"] or settings["max_slots"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_scales_on_defined_engine_gauges(rendered, overlay):
    hpa = one(rendered[overlay], "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "fish-s2"}
    targets = {m["pods"]["metric"]["name"]: float(m["pods"]["target"]["averageValue"]) for m in hpa["metrics"]
               if m["type"] == "Pods"}
    assert set(targets) == {metrics.QUEUED.name, metrics.ACTIVE.name}
    assert all(DEFINED[name].kind == "gauge" for name in targets)
    profile = flag(container(one(rendered[overlay], "Deployment")["spec"]["template"]["spec"], "model-repository",
                             "initContainers")["args"], "profile")
    assert 0 < targets[metrics.ACTIVE.name] < max_active(profile)      # reachable before every slot is busy


def test_prometheus_adapter_rule_serves_the_hpa_metrics(rendered):
    values = yaml.safe_load((DEPLOY / "monitoring/prometheus-adapter-values.yaml").read_text())
    names = {m["pods"]["metric"]["name"] for m in one(rendered["gpu"], "HorizontalPodAutoscaler")["spec"]["metrics"]}
    served = set()
    for rule in values["rules"]["custom"]:
        series = re.search(r'__name__=~"([^"]+)"', rule["seriesQuery"]).group(1)
        assert 'namespace!=""' in rule["seriesQuery"] and 'pod!=""' in rule["seriesQuery"]
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        for name in DEFINED:
            if re.fullmatch(series, name):
                served.add(re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), name))
        for part in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            assert part in rule["metricsQuery"]
    assert names <= served


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:fish_s2|nv)_[a-z0-9_]+)", expr))


def _base_name(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in DEFINED | dict.fromkeys(PLANNED_METRICS):
            return name[: -len(suffix)]
    return name


def test_dashboard(rendered):
    text = (DEPLOY / "base/grafana-dashboard.json").read_text()
    dashboard = json.loads(text)
    cm = one(rendered["gpu"], "ConfigMap", "fish-s2-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["grafana-dashboard.json"]) == dashboard
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= {_base_name(n) for n in _metric_names(target["expr"])}
    assert used <= set(DEFINED) | PLANNED_METRICS | TRITON_METRICS, used - set(DEFINED)
    assert {metrics.TTFA.name, metrics.ACTIVE.name, metrics.QUEUED.name, metrics.PREFIX_HITS.name,
            metrics.PREFIX_MISSES.name} | PLANNED_METRICS | TRITON_METRICS <= used
    assert not PLANNED_METRICS & set(DEFINED), "a planned metric exists now: update deploy/README.md and the panel"
    ttfa = next(p for p in dashboard["panels"] if metrics.TTFA.name in json.dumps(p["targets"]))
    assert [t["expr"].split(",")[0] for t in ttfa["targets"]] == \
        [f"histogram_quantile({q}" for q in ("0.5", "0.9", "0.99")]
    readme = (DEPLOY / "README.md").read_text()
    assert all(name in readme for name in PLANNED_METRICS | set(DEFINED))


# --- drain.sh against a fake metrics endpoint ---------------------------------------------------------

class _Metrics(http.server.BaseHTTPRequestHandler):
    active, queued, pending, finished = 0, 0, 0, 0

    def do_GET(self):
        cls = type(self)
        body = ("# TYPE fish_s2_requests_active gauge\n"
                f'fish_s2_requests_active{{model="dual_ar"}} {cls.active}\n'
                f"fish_s2_requests_queued {cls.queued}\n"
                "fish_s2_requests_active_total 7\n"                 # another name: not counted
                f'nv_inference_pending_request_count{{model="codec_decoder",version="1"}} {cls.pending}\n'
                'nv_inference_pending_request_count{model="tts",version="1"} 4\n'    # not a step after the engine
                f'nv_inference_count{{model="postprocess",version="1"}} {cls.finished}\n'
                f'nv_inference_count{{model="dual_ar",version="1"}} {time.monotonic()}\n'   # not counted
                "nv_inference_count 3\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def fake_metrics():
    handler = type("Handler", (_Metrics,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}/metrics"
    server.shutdown()
    server.server_close()


def _drain(url: str, log: Path, settle: int, most: int, flag: Path | None = None) -> float:
    if not shutil.which("sh"):
        pytest.skip("drain.sh needs sh")
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",    # python3 with fish_s2, as in the image
           "FISH_S2_DRAIN_METRICS_URL": url, "FISH_S2_DRAIN_LOG": str(log), "FISH_S2_DRAIN_POLL_S": "1",
           **({drain.FILE_ENV: str(flag)} if flag else {})}
    start = time.monotonic()
    done = subprocess.run(["sh", str(DEPLOY / "drain.sh"), str(settle), str(most)], env=env, timeout=30)
    assert done.returncode == 0
    return time.monotonic() - start


def test_drain_waits_for_in_flight_requests(fake_metrics, tmp_path):
    handler, url = fake_metrics
    handler.active, handler.queued = 2, 1
    threading.Timer(1.5, lambda: setattr(handler, "active", 0)).start()
    threading.Timer(2.5, lambda: setattr(handler, "queued", 0)).start()
    flag = tmp_path / "run" / "draining"
    took = _drain(url, tmp_path / "log", 0, 20, flag)
    assert 3.0 <= took < 8, took                 # zero from 2.5 s, confirmed one poll later
    assert (tmp_path / "log").read_text().splitlines()[-1] == "drain: drained"
    assert flag.exists()                         # new requests were refused from the start


def test_drain_waits_for_the_chunks_after_the_engine(fake_metrics, tmp_path):
    """The engine is idle, but a stream's last chunks are still queued for the codec, then finishing."""
    handler, url = fake_metrics
    handler.pending = 2
    threading.Timer(1.5, lambda: setattr(handler, "pending", 0)).start()
    threading.Timer(2.5, lambda: setattr(handler, "finished", 5)).start()
    took = _drain(url, tmp_path / "log", 0, 20)
    assert 3.5 <= took < 9, took                 # idle from 1.5 s, a chunk finished at 2.5 s, then steady
    assert (tmp_path / "log").read_text().splitlines()[-1] == "drain: drained"


def test_drain_gives_up_after_its_bound(fake_metrics, tmp_path):
    handler, url = fake_metrics
    handler.active = 3
    took = _drain(url, tmp_path / "log", 1, 2)
    assert 2.0 <= took < 7, took                 # settle 1 + D 2 (whole seconds: D counts from a second's start)
    assert "3 request(s) in flight after 2 s" in (tmp_path / "log").read_text()


def test_drain_returns_when_idle_or_unreachable(fake_metrics, tmp_path):
    handler, url = fake_metrics
    assert _drain(url, tmp_path / "log", 0, 20) < 4
    assert _drain("http://127.0.0.1:9/metrics", tmp_path / "log", 0, 20) < 4
    assert "unreachable" in (tmp_path / "log").read_text().splitlines()[-1]
