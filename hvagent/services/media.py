"""Removable media and the boot override of a VM: what Redfish's VirtualMedia and
`Boot` (and hvctl) change, in one place.

Media: a VM has at most one CD drive and one USB stick (spec `media`). A medium is a
file the caller may use (hvagent.services.files: the storage directory or, read-only, a
library) or an http(s) URL the agent downloads into `<storage_dir>/<vm>.media/` (removed
again on eject and with the VM). A running VM's CD changes live (QMP
blockdev-change-medium, eject); the CD drive itself and the USB stick are fixed at boot,
so adding a drive or changing the stick needs the VM off.

Boot override: a target booted before `boot_order`, `once` (the next boot only) or
`continuous`. QEMU rewrites the firmware's boot order (fw_cfg `bootorder`) from the
devices' bootindex at every reset, so the agent sets bootindex: at start from the
command line, and on a running VM over QMP (it applies at the guest's next reboot). A
`once` override is spent by the boot that used it: right after a start, or at the RESET
event of a reboot, the devices get the lasting order back (which only the next reset
reads) and the spec says `disabled`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from hvagent.drivers.machine import Machine
from hvagent.errors import Conflict, InvalidRequest, NotFound, OperationFailed
from hvagent.services.files import MEDIA_SUFFIX
from hvagent.services.vms import VMService
from hvagent.spec import (
    ACTIVE_STATES,
    ANSWERING_STATES,
    BootDevice,
    BootEnabled,
    BootOverride,
    Firmware,
    MediaSlot,
    MediaSpec,
    VMSpec,
)

log = logging.getLogger(__name__)

URL_SCHEMES = ("http", "https")
DOWNLOAD_TIMEOUT = 600.0  # a whole image; a stalled server fails the insert
CONNECT_TIMEOUT = 30.0


def media_dir(storage_dir: Path, vm: str) -> Path:
    return storage_dir / f"{vm}{MEDIA_SUFFIX}"


class MediaService:
    def __init__(self, vms: VMService) -> None:
        self.vms = vms
        vms.launch_hooks.append(self._launched)
        vms.event_listeners.append(self._on_event)
        vms.delete_hooks.append(self._vm_deleted)

    # media

    async def insert(self, name: str, slot: MediaSlot, image: str,
                     write_protected: bool = True) -> VMSpec:
        """Put `image` (a URL or a file the caller may use) into the VM's `slot`; the
        drive is added when the VM is off and has none."""
        vms = self.vms
        with vms.locks.hold(name, f"insert-media-{slot}"):
            spec, state = self._spec_state(name)
            live = state in ACTIVE_STATES
            if live and state not in ANSWERING_STATES:
                raise Conflict(f"{name}: its QMP monitor does not answer (state {state})")
            current = spec.media_in(slot)
            if live and (slot is MediaSlot.USB or current is None):
                raise Conflict(f"{name}: is {state}: the {_drive(slot)} is fixed at boot; "
                               "insert it while the VM is off")
            if current is not None and current.image is not None:
                raise Conflict(f"{name}: the {_drive(slot)} holds {current.source}; eject "
                               "it first")
            if urlsplit(image).scheme in URL_SCHEMES:
                path = await self._download(name, slot, image)
                downloaded = True
            elif "://" in image:
                raise InvalidRequest(f"Image: {image}: only http and https URLs or files "
                                     "in the storage directory")
            else:
                use = "media" if write_protected else "disk"
                path = vms.disks.allowed_file(image, "Image", use, name)
                downloaded = False
            media = MediaSpec(slot=slot, image=str(path), source=image,
                              write_protected=write_protected)
            try:
                if live:
                    await (await vms.machine(name)).change_medium(slot, media)
            except BaseException:
                if downloaded:
                    path.unlink(missing_ok=True)
                raise
            new = _with_media(spec, media)
            vms.store.update_vm(name, spec=new.model_dump_json())
            return new

    async def eject(self, name: str, slot: MediaSlot) -> VMSpec:
        vms = self.vms
        with vms.locks.hold(name, f"eject-media-{slot}"):
            spec, state = self._spec_state(name)
            current = spec.media_in(slot)
            if current is None or current.image is None:
                raise Conflict(f"{name}: the {_drive(slot)} is empty")
            live = state in ACTIVE_STATES
            if live and slot is MediaSlot.USB:
                raise Conflict(f"{name}: is {state}: the USB stick is fixed at boot; eject "
                               "it while the VM is off")
            if live:
                if state not in ANSWERING_STATES:
                    raise Conflict(f"{name}: its QMP monitor does not answer")
                await (await vms.machine(name)).eject_medium(slot)
            new = _with_media(spec, MediaSpec(slot=slot, image=None,
                                              write_protected=current.write_protected))
            vms.store.update_vm(name, spec=new.model_dump_json())
            if current.image and Path(current.image).parent == media_dir(
                    vms.storage_dir, name):
                Path(current.image).unlink(missing_ok=True)
            return new

    async def _download(self, name: str, slot: MediaSlot, url: str) -> Path:
        """The image at `url` in the VM's media directory, all or nothing."""
        target_dir = media_dir(self.vms.storage_dir, name)
        target_dir.mkdir(mode=0o700, exist_ok=True)
        final = target_dir / f"{slot}.img"
        part = target_dir / f".{slot}.img.part"
        timeout = httpx.Timeout(DOWNLOAD_TIMEOUT, connect=CONNECT_TIMEOUT)
        log.info("%s: downloading %s for the %s", name, url, _drive(slot))
        try:
            async with httpx.AsyncClient(timeout=timeout, follow_redirects=True) as client, \
                    client.stream("GET", url) as r:
                if r.status_code != 200:
                    raise InvalidRequest(f"Image: {url}: the server answered "
                                         f"{r.status_code}")
                expected = int(r.headers.get("content-length") or 0)
                free = shutil.disk_usage(target_dir).free
                if expected and expected > free:
                    raise InvalidRequest(f"Image: {url}: {expected} bytes do not fit in "
                                         f"the storage directory ({free} bytes free)")
                with part.open("wb") as f:
                    async for chunk in r.aiter_bytes(1 << 20):
                        f.write(chunk)
                    f.flush()
                    os.fsync(f.fileno())
            if part.stat().st_size == 0:
                raise InvalidRequest(f"Image: {url}: the server sent no data")
            os.replace(part, final)
        except httpx.HTTPError as e:
            raise InvalidRequest(f"Image: {url}: cannot download: {e}") from None
        except OSError as e:
            raise OperationFailed(f"Image: {url}: cannot store it: {e.strerror}") from None
        finally:
            part.unlink(missing_ok=True)
        return final

    async def _vm_deleted(self, name: str, keep_disks: bool) -> list[str]:
        d = media_dir(self.vms.storage_dir, name)
        removed = [str(p) for p in d.glob("*")] if d.is_dir() else []
        shutil.rmtree(d, ignore_errors=True)
        return removed

    # boot override

    async def set_boot(self, name: str, *, target: BootDevice | None = None,
                       enabled: BootEnabled | None = None, firmware: Firmware | None = None,
                       http_boot_uri: str | None = None, set_uri: bool = False,
                       uefi_http: bool | None = None,
                       secure_boot: bool | None = None) -> VMSpec:
        """Change the VM's boot override (and firmware or Secure Boot, VM off only). On
        a running VM the new order applies from the guest's next reboot. Turning Secure
        Boot on or off starts the VM's UEFI variables afresh (with or without the
        keys)."""
        vms = self.vms
        with vms.locks.hold(name, "set-boot"):
            spec, state = self._spec_state(name)
            o = spec.boot_override
            upd: dict[str, Any] = {}
            if target is not None:
                upd["target"] = target
            if enabled is not None:
                upd["enabled"] = enabled
            if set_uri:
                upd["http_boot_uri"] = http_boot_uri
            if uefi_http is not None:
                upd["uefi_http"] = uefi_http
            new_o = BootOverride.model_validate({**o.model_dump(), **upd})
            live = state in ACTIVE_STATES
            fw = spec.firmware if firmware is None else firmware
            if fw != spec.firmware and live:
                raise Conflict(f"{name}: is {state}: the boot mode (firmware) changes only "
                               "while the VM is off")
            sb = spec.secure_boot if secure_boot is None else secure_boot
            if fw is Firmware.BIOS and secure_boot is None:
                sb = False  # Legacy boot has no Secure Boot
            if sb != spec.secure_boot and live:
                raise Conflict(f"{name}: is {state}: Secure Boot changes only while the "
                               "VM is off")
            if sb and fw is not Firmware.UEFI:
                raise InvalidRequest("SecureBootEnable: Secure Boot needs UEFI firmware "
                                     "(BootSourceOverrideMode UEFI)")
            new = spec.model_copy(update={"boot_override": new_o, "firmware": fw,
                                          "secure_boot": sb})
            _check_target(new)
            if live:
                if state not in ANSWERING_STATES:
                    raise Conflict(f"{name}: its QMP monitor does not answer")
                await (await vms.machine(name)).set_boot_order(
                    new, new.effective_boot_order())
            if fw != spec.firmware or sb != spec.secure_boot:
                vms.refresh_firmware_files(name, new, fresh=sb != spec.secure_boot)
            vms.store.update_vm(name, spec=new.model_dump_json())
            return new

    async def _launched(self, name: str, spec: VMSpec, m: Machine) -> VMSpec:
        """After a start (QEMU paused, its first reset done): a `once` override is spent."""
        if spec.boot_override.enabled is not BootEnabled.ONCE:
            return spec
        return await self._spend_once(name, spec, m)

    async def _spend_once(self, name: str, spec: VMSpec, m: Machine) -> VMSpec:
        new = spec.model_copy(update={"boot_override": spec.boot_override.model_copy(
            update={"enabled": BootEnabled.DISABLED})})
        await m.set_boot_order(new, new.effective_boot_order())
        self.vms.store.update_vm(name, spec=new.model_dump_json())
        log.info("%s: the one-time boot from %s is spent", name, spec.boot_override.target)
        return new

    def _on_event(self, name: str, event: str, data: dict[str, Any]) -> None:
        if event == "RESET":
            self.vms.spawn(self._after_reset(name))

    async def _after_reset(self, name: str) -> None:
        row = self.vms.store.get_vm(name)
        if row is None:
            return
        spec = VMSpec.model_validate_json(row.spec)
        if spec.boot_override.enabled is not BootEnabled.ONCE:
            return
        m = self.vms.attached(name)
        if m is None:
            return
        with contextlib.suppress(Exception):
            # Under the VM's lock when free; a busy VM (a stop, a reconfiguration)
            # is retried shortly, the reboot's firmware read the old order already.
            for _ in range(50):
                if self.vms.locks.current(name) is None:
                    with self.vms.locks.hold(name, "set-boot"):
                        await self._spend_once(name, spec, m)
                    return
                await asyncio.sleep(0.1)
            log.warning("%s: could not spend the one-time boot override: VM busy", name)

    def _spec_state(self, name: str) -> tuple[VMSpec, Any]:
        row = self.vms.store.get_vm(name)
        if row is None:
            raise NotFound(f"{name}: no such VM")
        return VMSpec.model_validate_json(row.spec), row.state


def _drive(slot: MediaSlot) -> str:
    return "CD drive" if slot is MediaSlot.CD else "USB stick"


def _with_media(spec: VMSpec, media: MediaSpec) -> VMSpec:
    others = [m for m in spec.media if m.slot != media.slot]
    return spec.model_copy(update={"media": [*others, media]})


def _check_target(spec: VMSpec) -> None:
    """An enabled override's target must be something the VM can boot from."""
    o = spec.boot_override
    if o.enabled is BootEnabled.DISABLED:
        return
    if o.target is BootDevice.CD and spec.media_in(MediaSlot.CD) is None:
        raise InvalidRequest("BootSourceOverrideTarget: Cd: the VM has no CD drive "
                             "(insert a medium first)")
    if o.target is BootDevice.USB and (
            (m := spec.media_in(MediaSlot.USB)) is None or m.image is None):
        raise InvalidRequest("BootSourceOverrideTarget: Usb: no USB stick is inserted")
    if o.target is BootDevice.NETWORK and not spec.nics:
        raise InvalidRequest("BootSourceOverrideTarget: Pxe: the VM has no NIC")
    if o.uefi_http and spec.firmware is not Firmware.UEFI:
        raise InvalidRequest("BootSourceOverrideTarget: UefiHttp: needs UEFI firmware "
                             "(BootSourceOverrideMode UEFI)")
    if o.target is BootDevice.DISK and not spec.disks:
        raise InvalidRequest("BootSourceOverrideTarget: Hdd: the VM has no disk")
