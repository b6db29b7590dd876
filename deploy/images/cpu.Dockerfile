# syntax=docker/dockerfile:1
# CPU demo image for deploy/overlays/cpu-demo: this package on python:3.11-slim, Triton 2.51 from the
# nvidia-pytriton wheel (as `make demo` runs it), and the tiny random checkpoint with its CPU export and
# model repository written at build time under /models. NOT BUILT YET: the machines this was written on
# have no Docker engine (deploy/README.md says what was checked instead).
#
#   docker build -f deploy/images/cpu.Dockerfile -t fish-s2/serve-cpu:0.1.0 .
#   kind load docker-image fish-s2/serve-cpu:0.1.0        # or: minikube image load fish-s2/serve-cpu:0.1.0
#   docker run --rm -p 8001:8001 fish-s2/serve-cpu:0.1.0  # standalone: serves /models/model_repository
# The request sweep (fish_s2/serving/request_sweep.c, preloaded into tritonserver so that requests Triton's
# gRPC stream handler keeps after a client's cancel cannot keep a model from unloading at SIGTERM), built
# where a C compiler is
FROM python:3.11-bookworm AS sweep
COPY fish_s2/serving/sweep.py fish_s2/serving/request_sweep.c /src/
RUN python3 /src/sweep.py /out

FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1

WORKDIR /opt/fish-s2
COPY pyproject.toml requirements.txt README.md ./
# torch's CPU build at requirements.txt's pin first (PyPI's default Linux wheel brings the CUDA libraries),
# then the rest of requirements.txt, which that torch already satisfies
RUN pin="$(sed -n 's/^torch==\([^ ]*\).*/\1/p' requirements.txt)" \
    && test -n "$pin" \
    && python3 -m pip install --index-url https://download.pytorch.org/whl/cpu "torch==${pin}" \
    && python3 -m pip install -r requirements.txt

COPY fish_s2 fish_s2
COPY model_repository model_repository
COPY export export
COPY client client
COPY --from=sweep /out/ /opt/fish-s2/lib/
# editable, as build/Dockerfile does: the repository generator reads model_repository/templates from here
RUN python3 -m pip install --no-deps -e .

# Run tritonserver itself (not python -m fish_s2.serving.server, whose --exit-timeout-secs is fixed): the
# wheel's python backend with this interpreter's stub under Triton's default backend directory
# (/opt/tritonserver/backends), and a /usr/local/bin/tritonserver wrapper that puts the wheel's libraries
# on LD_LIBRARY_PATH and the request sweep on LD_PRELOAD (FISH_S2_REQUEST_SWEEP=0 leaves it out; the same
# setup as fish_s2.serving.server.TritonServer) and execs the binary, so tritonserver stays the container's
# main process.
RUN python3 - <<'EOF'
from pathlib import Path
from fish_s2.serving import sweep
from fish_s2.serving.server import TritonServer, python_backend_dir

backends = python_backend_dir(Path("/opt/tritonserver"))
cmd, env = TritonServer(Path("/models/model_repository"), Path("/tmp"), backend_dir=backends,
                        request_sweep=False).command()
library = sweep.build(Path("/opt/fish-s2/lib"))   # the builder stage's, same source: nothing to compile
assert library is not None, "the request sweep was not built"
wrapper = Path("/usr/local/bin/tritonserver")
wrapper.write_text("#!/bin/sh\n"
                   'export LD_LIBRARY_PATH="' + env["LD_LIBRARY_PATH"] + '${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"\n'
                   '[ "${' + sweep.ENV + ':-1}" = 0 ] || export LD_PRELOAD="' + str(library)
                   + '${LD_PRELOAD:+:$LD_PRELOAD}"\n'
                   'exec ' + cmd[0] + ' "$@"\n')
wrapper.chmod(0o755)
print(wrapper.read_text())
EOF

# The tiny random checkpoint, its CPU export (ONNX codec) and the cpu profile repository (voices in /voices);
# in the cluster the init container regenerates the repository from /models/checkpoint and /models/export.
RUN python3 export/make_tiny_checkpoint.py /models/checkpoint \
    && python3 -m fish_s2.export --checkpoint /models/checkpoint --out /models/export --target cpu \
    && python3 -m fish_s2.serving.repository --profile cpu --checkpoint /models/checkpoint \
        --artifacts /models/export --out /models/model_repository --voices-dir /voices \
    && python3 -c "import fish_s2.serving.openai_api"

EXPOSE 8000 8001 8002 8080
CMD ["tritonserver", "--model-repository=/models/model_repository", "--disable-auto-complete-config", \
     "--allow-gpu-metrics=false", "--exit-timeout-secs=30"]
