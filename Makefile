# One-command entry points. `make demo` and `make test` set up .venv first when it is missing or stale.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-stamp
ARTIFACTS ?= artifacts
TINY   := $(ARTIFACTS)/tiny-checkpoint
CHECKPOINT ?= $(TINY)
EXPORT ?= $(ARTIFACTS)/export
TARGET ?= cpu
TEXT   ?= Hello! [laugh] This is Fish S2 streaming from Triton.
SERVE_ARGS ?=

.PHONY: setup test demo serve tiny parity export bench perf-compare selfcheck clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

test: setup
	$(PY) -m pytest -q

parity: setup
	$(PY) -m fish_s2.parity ../shared/golden/public

$(TINY)/config.json: | setup
	$(PY) export/make_tiny_checkpoint.py $(TINY)

tiny: $(TINY)/config.json

# ONNX (fast AR, codec decoder/encoder), the TensorRT-LLM checkpoint, TensorRT plans (TARGET=gpu);
# up-to-date stages are skipped
export: setup $(if $(filter $(TINY),$(CHECKPOINT)),tiny)
	$(PY) -m fish_s2.export --checkpoint $(CHECKPOINT) --out $(EXPORT) --target $(TARGET)

# export, generate the CPU model repository, start Triton, stream TEXT through the client into
# demo.wav (prints time to first audio and RTF), stop Triton
demo: setup tiny
	$(PY) -m fish_s2.serving.demo demo --checkpoint $(CHECKPOINT) --artifacts $(ARTIFACTS) --text "$(TEXT)" -o demo.wav

# Triton on 127.0.0.1:8001 (gRPC) until Ctrl-C; SERVE_ARGS="--host 0.0.0.0 --openai-port 8080" etc.
serve: setup tiny
	$(PY) -m fish_s2.serving.demo serve --checkpoint $(CHECKPOINT) --artifacts $(ARTIFACTS) $(SERVE_ARGS)

# CPU engine benchmark (in-process, side by side with the reference generator) -> perf/results
bench: setup
	$(PY) perf/bench_engine.py

# time to first audio: perf_analyzer vs our load generator on the CPU deployment (fails beyond 25%)
perf-compare: setup tiny
	$(PY) perf/compare_perf_analyzer.py --artifacts $(ARTIFACTS)

# inside the GPU image (build/README.md): checks (a)-(e) on one GPU in under 5 minutes, one JSON on stdout,
# exit status 1 on any failure; anywhere: make selfcheck SELFCHECK_PY=.venv/bin/python SELFCHECK_ARGS=--dry-run
SELFCHECK_PY ?= python3
SELFCHECK_ARGS ?=
selfcheck:
	@$(SELFCHECK_PY) build/selfcheck.py --out $(ARTIFACTS)/selfcheck $(SELFCHECK_ARGS)

clean:
	rm -rf $(ARTIFACTS) demo.wav
