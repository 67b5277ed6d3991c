"""The one exception type for problems a user can cause with a disk image or a guest path."""

from __future__ import annotations


class DiskError(Exception):
    """A refused or failed disk operation; the message is one line for humans."""


class ImageInUse(DiskError):
    """The image is held by a running VM or another process."""
