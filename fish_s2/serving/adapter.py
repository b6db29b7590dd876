"""What the python-backend models share: their settings, tensor access, errors and config checks.

``pb_utils`` (Triton's ``triton_python_backend_utils``) is passed in, so this module imports and
tests without Triton.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..request import Internal, RequestError, to_wire
from .config import ServingConfig
from .protocol import Getter, TensorSpec

log = logging.getLogger(__name__)


def load_model_settings(args: dict) -> tuple[dict, ServingConfig]:
    """The model's config (a dict) and the repository's serving config (parameter ``serving_config``,
    relative to the repository root)."""
    model_config = json.loads(args["model_config"])
    try:
        rel = model_config["parameters"]["serving_config"]["string_value"]
    except KeyError:
        raise ValueError(f"{model_config.get('name')}: config.pbtxt has no 'serving_config' parameter") from None
    path = Path(rel) if Path(rel).is_absolute() else Path(args["model_repository"]).parent / rel
    return model_config, ServingConfig.load(path)


def check_io(model_config: dict, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> None:
    """Fail at load time if config.pbtxt and the protocol disagree on tensor names or types."""
    for kind, specs in (("input", inputs), ("output", outputs)):
        have = {t["name"]: t["data_type"] for t in model_config.get(kind, [])}
        want = {s.name: s.config_type for s in specs}
        if have != want:
            raise ValueError(f"{model_config.get('name')}: config.pbtxt {kind}s {have} differ from "
                             f"the protocol's {want}")


def getter(pb_utils, request) -> Getter:
    def get(name: str):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    return get


def triton_error(pb_utils, exc: BaseException):
    """The TritonError of an exception, by its type: a :class:`RequestError` keeps its own code (and
    travels tagged, see :func:`fish_s2.request.to_wire`); anything else is an internal error."""
    if not isinstance(exc, RequestError):
        log.error("internal error", exc_info=exc)
        exc = Internal(f"internal error: {type(exc).__name__}: {exc}")
    return pb_utils.TritonError(to_wire(exc), getattr(pb_utils.TritonError, exc.triton))


def error_response(pb_utils, exc: BaseException):
    return pb_utils.InferenceResponse(error=triton_error(pb_utils, exc))


def output_tensors(pb_utils, arrays: dict) -> list:
    return [pb_utils.Tensor(name, value) for name, value in arrays.items()]
