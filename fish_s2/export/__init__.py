"""Export stages: ONNX graphs of the fast AR and the codec, the TensorRT-LLM checkpoint, TensorRT plans.

``python -m fish_s2.export --checkpoint DIR --out DIR [--target cpu|gpu] [--force]`` (or
``make export CHECKPOINT=DIR``) runs the stages of :mod:`fish_s2.export.stages`; the graphs come
from :mod:`fish_s2.export.onnx_export` and run in :mod:`fish_s2.ort_runtime`.
"""
