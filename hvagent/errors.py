"""Errors a user can cause, raised by the service layer and below.

They carry a message for humans and a kind; the API maps the kind to an HTTP status
(hvagent.api.errors), the CLIs print the message. Nothing here knows HTTP.
"""

from __future__ import annotations


class HVError(Exception):
    """Base of all user-facing agent errors."""

    kind = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(HVError):
    """The request itself is wrong (bad spec, bad path, missing file)."""

    kind = "invalid"


class NotFound(HVError):
    kind = "not-found"


class Conflict(HVError):
    """The request clashes with the current state (duplicate name, VM running, ...)."""

    kind = "conflict"


class Busy(Conflict):
    """Another operation on the same resource is in progress; never queued."""

    kind = "busy"

    def __init__(self, target: str, operation: str) -> None:
        super().__init__(f"{target}: operation '{operation}' is in progress")
        self.target = target
        self.operation = operation


class DiskError(InvalidRequest):
    """A refused or failed disk image or guest file operation (hvagent.disk, the storage
    driver); the message is one line for humans."""


class ImageInUse(DiskError, Conflict):
    """The image is held by a running VM or another process."""

    kind = Conflict.kind


class PolicyDenied(HVError):
    """A request the host policy or access control refuses; the message names the rule."""

    kind = "forbidden"


class OperationFailed(HVError):
    """The request was valid but the hypervisor or the host failed to carry it out."""

    kind = "failed"
