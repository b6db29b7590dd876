"""The request layer shared by both engines, the Triton models, the OpenAI bridge and the client:
typed errors, validated parameters, chunking, stream events and the request lifecycle. Torch-free."""

from .chunks import Chunker, CodeChunk, Player, chunks_to_codes, playback_gap
from .errors import (AlreadyExists, Busy, Cancelled, Internal, InvalidArgument, NotFound, PermissionDenied,
                     RequestError, Unavailable, from_wire, to_wire)
from .events import REASONS, ChunkEvent, Event, Finished, RequestHandle, collect
from .lifecycle import Lifecycle, Live
from .params import ChunkPlan, EngineRequest, Limits, SamplingParams, new_request_id

__all__ = ["AlreadyExists", "Busy", "Cancelled", "ChunkEvent", "ChunkPlan", "Chunker", "CodeChunk", "EngineRequest",
           "Event", "Finished", "Internal", "InvalidArgument", "Lifecycle", "Limits", "Live", "NotFound",
           "PermissionDenied", "Player", "REASONS", "RequestError", "RequestHandle", "SamplingParams", "Unavailable",
           "chunks_to_codes", "collect", "from_wire", "new_request_id", "playback_gap", "to_wire"]
