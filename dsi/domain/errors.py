"""Domain errors.

Model code, backends and the coordinator raise these; the gRPC layer maps them
to status codes in exactly one place (:mod:`dsi.wire.grpc_status`). Nothing here
imports grpc.
"""

from __future__ import annotations


class DsiError(Exception):
    """Base class of every error dsi reports to a client."""


class InvalidArgument(DsiError):
    """The request is malformed; retrying it unchanged cannot succeed."""


class NotFound(DsiError):
    """A named thing (model, path, session) does not exist."""


class ResourceExhausted(DsiError):
    """A bounded resource (sessions, queue) is full; retry later."""


class FailedPrecondition(DsiError):
    """The request assumes state the service does not hold (a context prefix
    its session lost); resend it without the assumption."""


class Unauthenticated(DsiError):
    """The caller did not prove who it is (a missing or wrong bearer token)."""


class Unavailable(DsiError):
    """A service this request depends on cannot be reached."""


class DeadlineExceeded(DsiError):
    """The client's deadline passed before the work was done."""


class Cancelled(DsiError):
    """The work was cancelled (by its client or by shutdown)."""


class Internal(DsiError):
    """A bug or an unexpected failure inside dsi."""
