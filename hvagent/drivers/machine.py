"""The QEMU driver: the command line built from a VMSpec, the QEMU process (start,
liveness, kill) and per-VM files (QMP socket, pidfile, serial log, UEFI vars). Disk
image files themselves (format, creation) belong to hvagent.disk.image.

QEMU runs with -daemonize: the launching process returns once QEMU is set up (so start
errors come back synchronously) and the VM belongs to no agent process, so it survives
an agent restart. -no-shutdown keeps QEMU alive after the guest powers off, so the agent
tells a clean guest power-off (status "shutdown") from a crash (process gone, or status
"guest-panicked" through the pvpanic device) even when it happened while the agent was
down.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from hvagent.drivers.net import tap_name
from hvagent.errors import OperationFailed
from hvagent.spec import BootDevice, DiskFormat, Firmware, VMSpec

QEMU = "qemu-system-x86_64"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


@dataclass(frozen=True)
class VMFiles:
    """Where one VM's runtime and state files live."""

    qmp: Path
    pidfile: Path
    serial_log: Path
    state_dir: Path  # per-VM persistent files (UEFI variables)

    @property
    def efivars(self) -> Path:
        return self.state_dir / "OVMF_VARS.fd"

    @classmethod
    def for_vm(cls, name: str, run_dir: Path, log_dir: Path, state_dir: Path) -> VMFiles:
        return cls(
            qmp=run_dir / f"{name}.qmp",
            pidfile=run_dir / f"{name}.pid",
            serial_log=log_dir / f"{name}.serial.log",
            state_dir=state_dir / "vms" / name,
        )


def _blockdev(node: str, path: str, fmt: DiskFormat) -> str:
    # JSON syntax: no comma escaping of paths needed.
    return json.dumps({
        "driver": str(fmt), "node-name": node, "cache": {"direct": False},
        "file": {"driver": "file", "filename": path},
    })


def build_command(spec: VMSpec, files: VMFiles, accel_args: list[str]) -> list[str]:
    """The full QEMU command line for `spec`; rebuilt on every start."""
    assert spec.max_vcpus is not None and spec.max_memory_mib is not None
    cmd = [
        QEMU, "-name", f"{spec.name},debug-threads=on",
        "-machine", "q35", "-nodefaults", "-no-user-config", "-display", "none",
        *accel_args,
        # Hot-added vCPUs and DIMMs are not on the command line: hvagent.services.devices
        # plugs them again (like slotted disks and NICs) while QEMU waits (-S).
        "-smp", f"{spec.vcpus - spec.hot_vcpus},maxcpus={spec.max_vcpus}",
    ]
    if spec.memory_slots:
        cmd += ["-m", f"{spec.boot_memory_mib}M,slots={spec.memory_slots},"
                      f"maxmem={spec.max_memory_mib}M"]
    else:
        cmd += ["-m", f"{spec.memory_mib}M"]
    cmd += [
        "-qmp", f"unix:{files.qmp},server=on,wait=off",
        "-pidfile", str(files.pidfile),
        "-serial", f"file:{files.serial_log}",
        "-daemonize", "-no-shutdown",
        # A guest kernel panic reaches QEMU (status guest-panicked, the guest kept
        # paused by -no-shutdown), so the agent reports a crash instead of a VM that
        # looks running.
        "-device", "pvpanic",
    ]
    for i in range(spec.hotplug_ports):
        cmd += ["-device", f"pcie-root-port,id=hp{i},chassis={i + 1},bus=pcie.0"]
    if spec.firmware is Firmware.UEFI:
        cmd += [
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,unit=1,file={files.efivars}",
        ]
    # bootindex follows boot_order: all disks (in order), then all NICs, or the reverse.
    index: dict[tuple[BootDevice, int], int] = {}
    counts = {BootDevice.DISK: len(spec.disks), BootDevice.NETWORK: len(spec.nics)}
    for kind in dict.fromkeys(spec.boot_order):
        for i in range(counts[kind]):
            index[(kind, i)] = len(index) + 1
    ahci_port = 0
    for i, d in enumerate(spec.disks):
        assert d.path is not None and d.format is not None
        if d.slot is not None:
            continue  # hot-attached: plugged over QMP
        if d.bus == "sata":
            # q35's built-in AHCI controller: one disk per port, ports in spec order.
            dev = f"ide-hd,drive=disk{i},id=disk{i},bus=ide.{ahci_port}"
            ahci_port += 1
        else:
            dev = f"virtio-blk-pci,drive=disk{i},id=disk{i}"
        if (BootDevice.DISK, i) in index:
            dev += f",bootindex={index[(BootDevice.DISK, i)]}"
        cmd += ["-blockdev", _blockdev(f"disk{i}", d.path, d.format), "-device", dev]
    for i, n in enumerate(spec.nics):
        if n.slot is not None:
            continue  # hot-added: plugged over QMP
        dev = f"{n.model},netdev=net{i},id=nic{i},mac={n.mac}"
        if (BootDevice.NETWORK, i) in index:
            dev += f",bootindex={index[(BootDevice.NETWORK, i)]}"
        else:
            dev += ",romfile="  # no PXE option ROM when the NIC never boots
        if n.network == "bridge":
            # The agent made the tap and put it on the VLAN's bridge (hvagent.drivers.net).
            netdev = f"tap,id=net{i},ifname={tap_name(n.mac)},script=no,downscript=no"
        else:
            netdev = f"{n.network},id=net{i}"
        cmd += ["-netdev", netdev, "-device", dev]
    if spec.kernel:
        cmd += ["-kernel", spec.kernel]
    if spec.initrd:
        cmd += ["-initrd", spec.initrd]
    if spec.append:
        cmd += ["-append", spec.append]
    return cmd


def prepare_files(spec: VMSpec, files: VMFiles) -> None:
    """Per-VM persistent files made at create time (UEFI variable store)."""
    files.state_dir.mkdir(parents=True, exist_ok=True)
    if spec.firmware is Firmware.UEFI and not files.efivars.exists():
        tmp = files.efivars.with_suffix(".tmp")
        shutil.copyfile(OVMF_VARS, tmp)
        os.replace(tmp, files.efivars)


def remove_files(files: VMFiles) -> None:
    for p in (files.qmp, files.pidfile, files.serial_log):
        p.unlink(missing_ok=True)
    shutil.rmtree(files.state_dir, ignore_errors=True)


async def launch(cmd: list[str], files: VMFiles) -> int:
    """Start QEMU daemonized; returns its pid. QEMU's own error when it refuses."""
    files.qmp.unlink(missing_ok=True)
    files.pidfile.unlink(missing_ok=True)
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        lines = [ln for ln in err.decode(errors="replace").splitlines() if ln.strip()]
        raise OperationFailed(f"QEMU refused to start: {lines[-1] if lines else proc.returncode}")
    pid = read_pid(files)
    if pid is None:
        raise OperationFailed("QEMU started but wrote no pidfile")
    return pid


def read_pid(files: VMFiles) -> int | None:
    try:
        return int(files.pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def is_alive(pid: int | None, files: VMFiles) -> bool:
    """True when `pid` is this VM's QEMU (not a recycled pid of another process)."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return f"unix:{files.qmp},server=on,wait=off".encode() in cmdline


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def tail(path: Path, lines: int) -> str:
    try:
        with path.open("r", errors="replace") as f:
            return "".join(deque(f, maxlen=lines))
    except FileNotFoundError:
        return ""


# The async process runner (checkpoints' qemu-img snapshot calls use it).


async def _run(*cmd: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
