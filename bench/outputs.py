"""Deployment outputs benchmark: what each output costs in size, build time and boot time.

In one run, on this machine:

* build time added: `corehost build --force` of the profile with all its outputs against
  the same profile with `outputs: [qcow2]` (DIB's debootstrap tarball warm for both);
* size of each output (the PXE bundle: kernel + initramfs + root cpio), against the qcow2;
* boot under TCG (same QEMU options, -snapshot): seconds from QEMU's start until systemd
  reports hvagent.service started, for the qcow2 under BIOS, the USB stick under SeaBIOS
  and OVMF, PXE under BIOS (iPXE) and UEFI (GRUB), the VHD and the VHDX.

Targets: PXE bundle <= 1.1x the qcow2's size; PXE boot <= 1.2x the qcow2 boot; USB under
UEFI <= 1.1x USB under BIOS. Run as root: `.venv/bin/python bench/outputs.py` (takes many
minutes; `--no-build` measures an existing out/<profile>/ only).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml
from support import say
from support.boot import agent_started, timed

from builder import qemu
from builder.paths import repo_root
from builder.profile import load

TARGET_PXE_SIZE = 1.10
TARGET_PXE_BOOT = 1.20
TARGET_UEFI_BOOT = 1.10


def boot_to_agent(opts: qemu.BootOptions, what: str, timeout: float = 900.0) -> float:
    with qemu.Machine(opts) as machine:
        start = time.monotonic()
        while not agent_started(machine):
            now = time.monotonic() - start
            if now > timeout or not machine.running:
                raise qemu.BootError(f"{what}: hvagent not active after {now:.0f}s:\n"
                                     f"{machine.serial_tail()}")
            time.sleep(0.5)
        took = time.monotonic() - start
    say(f"  boot {what}: hvagent active after {took:.1f}s")
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--profile", default="profiles/ci.yaml")
    ap.add_argument("--no-build", action="store_true", help="measure out/<profile>/ as it is")
    args = ap.parse_args()
    profile = load(args.profile)
    corehost = str(Path(sys.executable).parent / "corehost")
    outdir = repo_root() / "out" / profile.name

    added = None
    if not args.no_build:
        # `extends:` names a profile of the same directory: the peer lives there briefly.
        only = profile.path.parent / f"bench-{profile.name}-qcow2.yaml"
        with tempfile.TemporaryDirectory(prefix="corehost-bench-") as tmp:
            try:
                only.write_text(yaml.safe_dump({
                    "name": only.stem, "description": "qcow2 only (benchmark peer)",
                    "extends": profile.name, "outputs": ["qcow2"]}))
                base = timed([corehost, "build", str(only), "--force", "--out", tmp],
                             log=Path(tmp) / "qcow2.log")
            finally:
                only.unlink(missing_ok=True)
            full = timed([corehost, "build", args.profile, "--force"],
                         log=Path(tmp) / "all.log")
            added = full - base
    manifest = json.loads((outdir / "manifest.json").read_text())
    art = manifest["artifacts"]
    size = {k: v["size"] for k, v in art.items()}
    pxe_size = sum(v for k, v in size.items() if k in ("pxe.kernel", "pxe.initrd", "pxe.rootfs"))
    path = {k: outdir / v["file"] for k, v in art.items()}
    pxe_dir = outdir / manifest["pxe"]["dir"]

    def opts(**kw: object) -> qemu.BootOptions:
        return qemu.BootOptions(accel="tcg", snapshot=True, no_reboot=True, **kw)  # type: ignore[arg-type]

    boots = {
        "qcow2 (BIOS)": opts(image=path["qcow2"]),
        "usb (SeaBIOS)": opts(image=path["usb"], usb=True),
        "usb (OVMF)": opts(image=path["usb"], usb=True, firmware=qemu.Firmware.UEFI),
        "pxe (BIOS, iPXE)": opts(pxe=pxe_dir),
        "pxe (UEFI, GRUB)": opts(pxe=pxe_dir, firmware=qemu.Firmware.UEFI),
        "vhd (BIOS)": opts(image=path["vhd"]),
        "vhdx (OVMF)": opts(image=path["vhdx"], firmware=qemu.Firmware.UEFI),
    }
    took = {what: boot_to_agent(o, what) for what, o in boots.items()}

    mib = 2**20
    print(f"\n{'output':20}{'size MiB':>10}{'boot s':>9}")
    for what, o in boots.items():
        key = "pxe" if o.pxe else next(k for k, p in path.items() if p == o.image)
        s = pxe_size if key == "pxe" else size[key]
        print(f"{what:20}{s / mib:10.1f}{took[what]:9.1f}")
    if added is not None:
        print(f"\nbuild time added by usb, vhd, vhdx and pxe over qcow2 only: {added:.1f}s")
    rows = [
        ("PXE bundle size / qcow2", pxe_size / size["qcow2"], TARGET_PXE_SIZE),
        ("PXE boot (BIOS) / qcow2 boot", took["pxe (BIOS, iPXE)"] / took["qcow2 (BIOS)"],
         TARGET_PXE_BOOT),
        ("PXE boot (UEFI) / qcow2 boot", took["pxe (UEFI, GRUB)"] / took["qcow2 (BIOS)"],
         TARGET_PXE_BOOT),
        ("USB boot UEFI / BIOS", took["usb (OVMF)"] / took["usb (SeaBIOS)"], TARGET_UEFI_BOOT),
    ]
    print()
    for what, ratio, target in rows:
        print(f"{what:32}{ratio:7.2f}x  <= {target:.2f}x {'ok' if ratio <= target else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
