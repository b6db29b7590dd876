"""The batched streaming engine (torch): a scheduler (:mod:`.scheduler`) over a runner (:mod:`.runner`)."""

from .config import EngineConfig, check_request
from .runner import TorchRunner
from .scheduler import Engine

__all__ = ["Engine", "EngineConfig", "TorchRunner", "check_request"]
