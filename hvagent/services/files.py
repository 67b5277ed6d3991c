"""The host files a request may name (disk images, kernel, initrd) and who may use which:
the one check that create, attach-disk and import go through (the disks service,
hvagent.services.disks, is its caller).

A name is made absolute (a relative one is in the storage directory) with its symlinks
resolved, and then must be, for the principal of the request:

- in the storage directory: a file of a VM the caller may reconfigure (VM.Config.Disk on
  it: one of its disks, a disk one of its checkpoints holds, or a file under
  `<storage_dir>/<vm>.checkpoints/`). A file no VM refers to (a loose image, e.g. `hvdisk
  p2v` output, or a disk detached or kept at delete) is the host administrator's (root,
  Administrator on /vms) only;
- in one of the policy's `library` directories: shared read-only content, usable by
  anyone as a kernel or initrd, never as a disk (a guest would write to it);
- under the host's /boot: a kernel or initrd, for the host administrator only.

Anything else, and any of these that does not exist, gets one answer (403, the same text)
so that the answer never tells which files exist. Who may use a file that is a disk of
another VM, or is held by a checkpoint, gets 409 (root too): two VMs writing one image,
or a write under a checkpoint's overlay, corrupt it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Protocol

from hvagent.errors import Conflict, PolicyDenied
from hvagent.spec import VMSpec
from hvagent.store import Store


class Host(Protocol):
    """What the check reads (the VM service has it): where disks live, the request's
    admission (who asks, host policy), and the VMs and checkpoints on record."""

    storage_dir: Path
    admission: Any  # hvagent.access.policy.Admission (services do not import access)
    store: Store


Use = Literal["disk", "boot", "media"]  # a disk image; a kernel or initrd; a CD/stick
# image inserted read-only (one inserted writable is checked as a disk)
BOOT_DIR = Path("/boot")
CHECKPOINTS_SUFFIX = ".checkpoints"  # hvagent.services.checkpoints keeps a VM's files there
MEDIA_SUFFIX = ".media"  # hvagent.services.media keeps the images it downloaded there
_ALLOWED = {
    "disk": "an image in the storage directory that the caller may use",
    "boot": "storage directory or library only",
    "media": "storage directory or library only",
}


def normalize(storage_dir: Path, value: str) -> Path | None:
    """`value` as an absolute path with symlinks resolved (relative: in `storage_dir`);
    None when it cannot name a file at all (NUL byte, too long, a symlink loop)."""
    try:
        p = Path(value)
        return (p if p.is_absolute() else storage_dir / p).resolve()
    except (OSError, ValueError, RuntimeError):
        return None


def resolve(vms: Host, value: str, field: str, use: Use, target: str) -> Path:
    """The file `value` names, if the requesting principal may use it as `use` for the
    VM `target` (being created or changed); else PolicyDenied, the same for a file that
    does not exist. Conflict when it is in use by a VM (or a checkpoint)."""
    denied = PolicyDenied(f"{field}: {value}: not an allowed file ({_ALLOWED[use]})")
    path = normalize(vms.storage_dir, value)
    if path is None:
        raise denied
    admission = vms.admission
    if path.is_relative_to(vms.storage_dir):
        claims = _claims(vms, path)
        if claims:
            if not all(admission.may("VM.Config.Disk", f"/vms/{vm}") for vm in claims):
                raise denied
        elif not admission.is_host_admin():
            raise denied
        if not path.is_file():
            raise denied
        if use == "disk" and claims:  # a kernel or initrd is only read
            disks = [vm for vm, how in claims.items() if how == "disk"]
            if target in disks:
                raise Conflict(f"{field}: {path} is already attached to {target}")
            if disks:
                raise Conflict(f"{field}: {path} is in use: a disk of VM {disks[0]}")
            vm, how = next(iter(claims.items()))
            if how == "media":
                raise Conflict(f"{field}: {path} is in use: a medium of VM {vm}")
            raise Conflict(f"{field}: {path} is in use: held by a checkpoint of VM {vm}")
        return path
    for lib in admission.policy.library:
        if path.is_relative_to(Path(lib).resolve()):
            if use == "disk":
                raise PolicyDenied(f"{field}: {value}: a library image is read-only: it "
                                   "can be a kernel or initrd, not a disk")
            if not path.is_file():
                raise denied
            return path
    if use == "boot" and path.is_relative_to(BOOT_DIR) and admission.is_host_admin():
        if path.is_file():
            return path
    raise denied


def _claims(vms: Host, path: Path) -> dict[str, Literal["disk", "checkpoint", "media"]]:
    """The VMs that `path` (in the storage directory) belongs to, and how: as one of its
    disks, or held by its checkpoints."""
    want = str(path)
    rows = vms.store.list_vms()
    names = {r.name for r in rows}
    out: dict[str, Literal["disk", "checkpoint", "media"]] = {}
    top = path.relative_to(vms.storage_dir).parts[:1]
    if top and top[0].endswith(CHECKPOINTS_SUFFIX):
        vm = top[0].removesuffix(CHECKPOINTS_SUFFIX)
        if vm in names:
            out[vm] = "checkpoint"
    if top and top[0].endswith(MEDIA_SUFFIX):
        vm = top[0].removesuffix(MEDIA_SUFFIX)
        if vm in names:
            out[vm] = "media"
    for r in rows:
        if want in _disk_paths(VMSpec.model_validate_json(r.spec)):
            out[r.name] = "disk"
    for r in rows:
        if r.name not in out and any(want in _disk_paths(c.spec)
                                     for c in vms.store.checkpoints.for_vm(r.name)):
            out[r.name] = "checkpoint"
    return out


def _disk_paths(spec: VMSpec) -> set[str]:
    return {d.path for d in spec.disks if d.path}
