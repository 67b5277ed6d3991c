"""The exceptions for problems a user can cause with a disk image or a guest path.

They are agent errors (hvagent.errors), so a disk problem reaching the API is answered
like any other: a refused request 400, an image in use 409; hvdisk prints the message."""

from __future__ import annotations

from hvagent.errors import Conflict, InvalidRequest


class DiskError(InvalidRequest):
    """A refused or failed disk operation; the message is one line for humans."""


class ImageInUse(DiskError, Conflict):
    """The image is held by a running VM or another process."""

    kind = Conflict.kind
