"""The GPU image's build files: versions.env, the Dockerfile that takes its base from it, the build
context, and build/check_image.py -- rendered, and run against fake directory layouts."""

import ctypes.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "build"
sys.path.insert(0, str(BUILD))
import check_image  # noqa: E402

ENV = check_image.read_env(BUILD / "versions.env")
DOCKERFILE = (BUILD / "Dockerfile").read_text()
TEMPLATES = REPO / "model_repository" / "templates"


def test_versions_env_names_the_stock_image_of_one_release():
    rel = ENV["TRITON_CONTAINER"]
    assert ENV["BASE_IMAGE"] == f"nvcr.io/nvidia/tritonserver:{rel}-trtllm-python-py3"
    assert ENV["BACKENDS_IMAGE"] == f"nvcr.io/nvidia/tritonserver:{rel}-py3"
    assert (ENV["TENSORRT_LLM_VERSION"], ENV["TENSORRT_VERSION"], ENV["TORCH_VERSION"]) == \
        ("1.2.1", "10.14.1.48", "2.10.0a0+b4e4ee81d3.nv25.12")


def test_dockerfile_takes_every_version_from_versions_env():
    args = re.findall(r"^ARG\s+(\S+)", DOCKERFILE, re.M)
    assert all("=" not in a for a in args), "no ARG has a default: versions.env is the only source"
    assert set(args) == set(ENV)
    assert re.findall(r"^FROM\s+(\S+)", DOCKERFILE, re.M) == ["${BACKENDS_IMAGE}", "${BASE_IMAGE}"]
    for backend in ("onnxruntime", "tensorrt"):
        assert f"COPY --from=backends /opt/tritonserver/backends/{backend} /opt/tritonserver/backends/{backend}" \
            in DOCKERFILE
    # the checks the build runs: all of them, before and after the package goes in
    runs = " ".join(re.findall(r"check_image\.py ([^\\&\n]*)", DOCKERFILE))
    assert {"args", "versions", "backends", "libs", "all", "constraints"} <= set(runs.split())
    assert '"tritonclient[grpc]==${TRITON_CLIENT_VERSION}"' in DOCKERFILE and "-c /tmp/base-constraints.txt" in DOCKERFILE
    reqs = [ln.split("#")[0].strip() for ln in (BUILD / "requirements-image.txt").read_text().splitlines()]
    reqs = [r for r in reqs if r]
    assert reqs and all(re.fullmatch(r"[\w.\-\[\]]+\s*[<>=~]=?\s*[\w.]+", r) for r in reqs), reqs  # each constrained
    assert not {"torch", "nvidia-pytriton", "tritonclient[grpc]"} & {re.split(r"[<>=~]", r)[0] for r in reqs}


def test_build_context_is_an_allowlist_of_what_the_image_copies():
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    copied = [src for line in re.findall(r"^COPY (?!--from)(.+)$", DOCKERFILE, re.M) for src in line.split()[:-1]]
    assert copied and all(src.split("/")[0] in allowed for src in copied), (copied, allowed)
    assert not {"artifacts", ".venv", "tests", ".git"} & allowed


def test_render_lists_every_check_the_build_runs(capsys):
    assert check_image.main(["--render", "all"]) == 0
    out = capsys.readouterr().out
    for line in ("versions: tensorrt_llm == 1.2.1", "versions: tensorrt == 10.14.1.48",
                 "versions: torch == 2.10.0a0+b4e4ee81d3.nv25.12", "versions: Triton server == 2.68.0",
                 "args: BASE_IMAGE is tritonserver:26.04-trtllm-python-py3",
                 "args: BACKENDS_IMAGE is tritonserver:26.04-py3",
                 "libs: ldd /opt/tritonserver/backends/tensorrt/libtriton_tensorrt.so",
                 "libs: ldd /opt/tritonserver/backends/onnxruntime/libonnxruntime_providers_tensorrt.so",
                 "libs: ldd /opt/tritonserver/backends/python/triton_python_backend_stub"):
        assert line in out, line
    backends = re.findall(r"^backends: (\w+) \(for ([^)]*)\)", out, re.M)
    assert {b for b, _ in backends} == {"python", "onnxruntime", "tensorrt"}
    assert dict(backends)["tensorrt"] == "codec_decoder/config.tensorrt.pbtxt"
    assert "args: build arg BASE_IMAGE = nvcr.io/nvidia/tritonserver:26.04-trtllm-python-py3" in out


# ------------------------------------------------------------------------ against a fake image layout

def _real_shared_lib() -> Path:
    name = ctypes.util.find_library("z")
    for d in ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib"):
        if name and (Path(d) / name).is_file():
            return Path(d) / name
    pytest.skip("no libz to stand in for a backend library")


def _dist(site: Path, name: str, version: str, requires=()) -> None:
    d = site / f"{name}-{version}.dist-info"
    d.mkdir(parents=True, exist_ok=True)
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    (d / "METADATA").write_text(meta)


@pytest.fixture
def image(tmp_path, monkeypatch):
    """A file tree laid out like the built image, and a site-packages with the pinned stack."""
    lib = _real_shared_lib()
    root, site = tmp_path / "root", tmp_path / "site"
    triton = root / "opt" / "tritonserver"
    for backend, files in check_image.BACKEND_FILES.items():
        (triton / "backends" / backend).mkdir(parents=True)
        for f in files:
            shutil.copy(lib, triton / "backends" / backend / f)
    (triton / "TRITON_VERSION").write_text("2.68.0\n")
    (tmp_path / "backends-TRITON_VERSION").write_text("2.68.0\n")
    for name, key in check_image.PINNED_DISTS.items():
        _dist(site, name, ENV[key])
    _dist(site, "numpy", "1.26.4")
    _dist(site, "fish_s2", "0.1.0", ["numpy<2", "pytest>=8; extra == \"test\""])
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    return root, site, tmp_path / "backends-TRITON_VERSION"


def _run(image, *checks):
    root, site, release = image
    return check_image.main(["--root", str(root), "--site", str(site), "--backends-release", str(release), *checks])


def test_a_complete_image_passes(image, capsys):
    assert _run(image, "all") == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and out.count("ok  ") >= 20


@pytest.mark.parametrize("break_it, check, message", [
    (lambda root, site, rel: shutil.rmtree(root / "opt/tritonserver/backends/onnxruntime"), "backends",
     "backend onnxruntime missing"),
    (lambda root, site, rel: (root / "opt/tritonserver/backends/tensorrt/libtriton_tensorrt.so").unlink(), "backends",
     "libtriton_tensorrt.so"),
    (lambda root, site, rel: shutil.rmtree(site / "torch-2.10.0a0+b4e4ee81d3.nv25.12.dist-info"), "versions",
     "torch is not installed"),
    (lambda root, site, rel: _dist(site, "tensorrt_llm", "1.2.0") or
     shutil.rmtree(site / "tensorrt_llm-1.2.1.dist-info"), "versions", "tensorrt_llm is 1.2.0, pinned 1.2.1"),
    (lambda root, site, rel: (root / "opt/tritonserver/TRITON_VERSION").write_text("2.67.0"), "versions",
     "the base image has Triton server 2.67.0"),
    (lambda root, site, rel: rel.write_text("2.69.0"), "versions", "the backends image has Triton server 2.69.0"),
    (lambda root, site, rel: shutil.rmtree(site / "numpy-1.26.4.dist-info") or _dist(site, "numpy", "2.1.0"),
     "package", "numpy 2.1.0 does not satisfy"),
], ids=["backend-dir", "backend-lib", "dist-missing", "dist-version", "server", "backends-release", "requirement"])
def test_each_missing_piece_fails_the_build(image, capsys, break_it, check, message):
    break_it(*image)
    assert _run(image, check) == 1
    assert message in capsys.readouterr().out


def test_build_args_must_be_versions_env(image, capsys, monkeypatch):
    assert _run(image, "args") == 0
    monkeypatch.setenv("BASE_IMAGE", "nvcr.io/nvidia/tritonserver:25.12-trtllm-python-py3")
    assert _run(image, "args") == 1
    assert "build arg BASE_IMAGE is 'nvcr.io/nvidia/tritonserver:25.12-trtllm-python-py3'" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to make a library with a missing dependency")
def test_a_backend_library_that_links_a_missing_library_fails(image, tmp_path, capsys):
    root = image[0]
    (tmp_path / "dep.c").write_text("int dep(void) { return 1; }\n")
    (tmp_path / "lib.c").write_text("int dep(void); int f(void) { return dep(); }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(tmp_path / "libnvinfer.so.99"), str(tmp_path / "dep.c"),
                    "-Wl,-soname,libnvinfer.so.99"], check=True)
    lib = root / "opt/tritonserver/backends/tensorrt/libtriton_tensorrt.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(tmp_path / "lib.c"), str(tmp_path / "libnvinfer.so.99")],
                   check=True)
    (tmp_path / "libnvinfer.so.99").unlink()
    assert _run(image, "libs") == 1
    assert "links libraries that are not in the image: ['libnvinfer.so.99']" in capsys.readouterr().out


def test_driver_libraries_are_not_required():
    assert check_image.DRIVER_LIBS.match("libcuda.so.1") and check_image.DRIVER_LIBS.match("libnvidia-ml.so.1")
    assert not check_image.DRIVER_LIBS.match("libcudart.so.13") and not check_image.DRIVER_LIBS.match("libnvinfer.so.10")


def test_constraints_pin_every_installed_distribution(image, capsys):
    assert check_image.main(["--site", str(image[1]), "constraints"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "torch==2.10.0a0+b4e4ee81d3.nv25.12" in lines and "tensorrt_llm==1.2.1" in lines and "numpy==1.26.4" in lines


def test_the_cli_runs_as_the_dockerfile_runs_it():
    out = subprocess.run([sys.executable, str(BUILD / "check_image.py"), "--render", "backends"], capture_output=True,
                         text=True, cwd="/", env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0 and "backends: python" in out.stdout
