"""Serving S2-Pro from Triton Inference Server.

``config`` is the deployment settings file every Triton model reads (``serving.yaml`` in the model
repository); ``protocol`` the tensor contract and request validation shared by the models and the
client; ``repository`` fills the model-repository templates for a profile (cpu or gpu);
``runtime`` builds the engine and codec a setting names (dual_ar: as its memory plan says, then
warmed up); ``adapter`` holds what the python-backend models share; ``dispatch`` routes engine events
to Triton response senders; ``voices`` is the voice registry on disk; ``metrics`` the custom Triton
metrics; ``server`` starts and stops a ``tritonserver``; ``demo`` is what ``make serve`` and ``make
demo`` run. Nothing here imports Triton or TensorRT at module level.
"""
