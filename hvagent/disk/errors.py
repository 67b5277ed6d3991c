"""The disk exceptions, where hvdisk's modules look for them. They are stated in
hvagent.errors (the storage driver raises them too): a refusal is InvalidRequest (400),
an image another process holds is Conflict (409); hvdisk prints the message."""

from __future__ import annotations

from hvagent.errors import DiskError, ImageInUse

__all__ = ["DiskError", "ImageInUse"]
