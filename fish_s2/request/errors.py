"""Typed request errors, and the status each one is on every surface.

A request that does not complete normally ends with one of these. Every layer maps them by type,
never by message text: Triton's model error codes (``pb_utils.TritonError``), gRPC status codes and
HTTP statuses come from the class. Over a Triton stream the error's class also travels in its
message as a tag (``[fish-s2:BUSY]``), because a streamed error response has a message and no code;
:func:`from_wire` reads it back on the client. (Triton's ``triton_grpc_error`` header would close the
stream with a gRPC status instead, but on 2.51 a client that cancels such a stream after its error
crashes the server's gRPC frontend (measured), so this package never asks for it.)
"""

from __future__ import annotations

import re


class RequestError(Exception):
    """A request that did not complete normally. Subclasses say why; this base is an internal error."""

    status = "INTERNAL"       # the name on the wire (tag) and in logs
    triton = "INTERNAL"       # pb_utils.TritonError code name
    grpc = "INTERNAL"         # grpc.StatusCode name
    http = 500

    def __init__(self, message: str, field: str | None = None):
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class FieldError(RequestError):
    """An error about one input of the request, which ``field`` names."""

    def __init__(self, field: str, message: str):
        super().__init__(message, field)


class InvalidArgument(FieldError, ValueError):
    """The request can never be served as given."""

    status, triton, grpc, http = "INVALID_ARGUMENT", "INVALID_ARG", "INVALID_ARGUMENT", 400


class NotFound(FieldError):
    status, triton, grpc, http = "NOT_FOUND", "NOT_FOUND", "NOT_FOUND", 404


class AlreadyExists(FieldError):
    status, triton, grpc, http = "ALREADY_EXISTS", "ALREADY_EXISTS", "ALREADY_EXISTS", 409


class PermissionDenied(FieldError):
    """A protected action (voice register/delete) without the right key."""

    status, triton, grpc, http = "PERMISSION_DENIED", "INVALID_ARG", "PERMISSION_DENIED", 403


class Unavailable(RequestError):
    """The server cannot take the request now (starting, draining, shutting down): retry elsewhere or later."""

    status, triton, grpc, http = "UNAVAILABLE", "UNAVAILABLE", "UNAVAILABLE", 503


class Busy(Unavailable):
    """Every slot and queue place is taken: retry after a short wait."""

    status, http = "BUSY", 429


class Cancelled(RequestError):
    """The request was stopped by its client before it ended."""

    status, triton, grpc, http = "CANCELLED", "CANCELLED", "CANCELLED", 499


class Internal(RequestError):
    """The server failed the request (a bug or a device fault); the message says where."""


ERRORS: dict[str, type[RequestError]] = {
    c.status: c for c in (InvalidArgument, NotFound, AlreadyExists, PermissionDenied, Unavailable, Busy, Cancelled,
                          Internal)}
_TAG = re.compile(r"\s*\[fish-s2:([A-Z_]+)\]\s*$")
_PREFIX = re.compile(r"^(in ensemble '[^']*', )+")      # what a Triton ensemble puts before a step's error
# Triton's own untagged refusals while it shuts down (core: InferenceServer::Stop, the schedulers' Enqueue;
# then, while the models unload, "Request for unknown model: 'tts' has no available versions"): the request
# never started, so another replica may take it
_TRITON_STOPPING = re.compile(r"Server is stopping|stopped accepting new inference requests|has no available versions")
# Triton's own checks of a request (datatype, shape) run before any model and come over a stream as a
# message of this form, with no code (2.51, measured)
_TRITON_REQUEST_CHECK = re.compile(r"^\[request id: [^\]]*\] ")
_GRPC = {"INVALID_ARGUMENT": InvalidArgument, "NOT_FOUND": NotFound, "ALREADY_EXISTS": AlreadyExists,
         "PERMISSION_DENIED": PermissionDenied,
         "UNAVAILABLE": Unavailable, "RESOURCE_EXHAUSTED": Busy, "CANCELLED": Cancelled}


def to_wire(error: RequestError) -> str:
    """The message a server sends for ``error``: its text, then its class as a tag."""
    return f"{error} [fish-s2:{error.status}]"


def client_gone(is_cancelled) -> bool:
    """Ask a client's cancellation check; a check that raises counts as gone (a dead connection)."""
    try:
        return bool(is_cancelled())
    except Exception:
        return True


def from_wire(message: str, grpc_code: str | None = None) -> RequestError:
    """The typed error of a server's message: by its tag, else by the call's gRPC status code (Triton's
    untagged shutdown refusals are Unavailable).

    Fields of InvalidArgument / NotFound / AlreadyExists are read back from the ``field: ...`` form
    these classes give their messages."""
    message = _PREFIX.sub("", message.strip())
    tagged = _TAG.search(message)
    if tagged and tagged.group(1) in ERRORS:
        cls, message = ERRORS[tagged.group(1)], message[:tagged.start()]
    elif _TRITON_STOPPING.search(message):
        cls = Unavailable
    elif grpc_code is None and _TRITON_REQUEST_CHECK.match(message):
        cls = InvalidArgument
    else:
        cls = _GRPC.get((grpc_code or "").upper().removeprefix("STATUSCODE."), Internal)
    return rebuild(cls, message)


def rebuild(cls: type[RequestError], message: str) -> RequestError:
    """An instance of ``cls`` carrying ``message`` as it was sent."""
    error = cls.__new__(cls)
    field, sep, rest = message.partition(": ")
    error.field = field if sep and " " not in field and issubclass(cls, FieldError) else None
    Exception.__init__(error, message)
    return error
