"""GET/PUT /api/v1/policy: the host policy file as text, read and replaced whole (the
Ansible collection's `policy` module pushes it)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/policy", tags=["policy"])
