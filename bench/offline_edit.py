"""Offline edit and conversion speed: hvdisk against libguestfs and qemu-img, one run.

1. Put a 1 MiB file into /etc of the ext4 root partition of a 2 GiB VHDX and read it
   back: `hvdisk put` + `hvdisk cat` against one `guestfish` session doing upload +
   download (Debian's libguestfs-tools, installed here if missing; bench only). Target:
   hvdisk >= 10x faster.
2. Convert a 2 GiB qcow2 (fully written) to VHDX: `hvdisk convert` against
   `qemu-img convert` alone. Target: ratio <= 1.05.

Prints the median of several runs of each and the ratios. Run as root (apt, /dev/fuse).
hvdisk runs with compiled bytecode, as an installed package has it: with
PYTHONDONTWRITEBYTECODE set, every run would compile hvagent's modules again (the cache
goes to the benchmark's temporary directory, never into the source tree).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from hvagent.host import run

MiB = 1 << 20
GiB = 1 << 30
HVDISK = [sys.executable, "-m", "hvagent.cli.hvdisk"]
HVDISK_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
MTOOLS_ENV = {**os.environ, "MTOOLSRC": "/dev/null", "MTOOLS_SKIP_CHECK": "1"}
KERNEL_CACHE = Path("/var/cache/corehost/kernel")
# Bounds on one command (a 2 GiB conversion, a guestfish session under TCG) and on the
# peer's apt-get install: far above what a healthy run takes.
COMMAND_TIMEOUT = 1800.0
INSTALL_TIMEOUT = 1800.0


def sh(*cmd: str | Path, env: dict[str, str] | None = None, input: bytes | None = None
       ) -> bytes:
    try:
        proc = run.run(cmd, env=env, input=input, timeout=COMMAND_TIMEOUT, check=False)
    except run.ProcessFailed as e:  # could not start, or timed out
        raise SystemExit(str(e)) from None
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed: {proc.err.strip()}")
    return proc.stdout


def timed(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_vhdx(work: Path) -> Path:
    """2 GiB GPT disk: 100 MiB ESP + ext4 root with a small /etc, as VHDX."""
    raw = work / "disk.raw"
    with raw.open("wb") as fh:
        fh.truncate(2 * GiB)
    sh("sfdisk", "-q", raw, input=(
        b"label: gpt\nstart=2048, size=204800, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n"
        b"start=206848, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n"))
    tree = work / "rootfs"
    for d in ("etc/default", "usr/bin", "var/log", "home"):
        (tree / d).mkdir(parents=True)
    for i in range(200):
        (tree / f"etc/file{i}.conf").write_text(f"setting{i}=value\n" * 20)
    (tree / "etc/hostname").write_text("bench\n")
    root_start = 206848 * 512
    root_size = 2 * GiB - root_start - MiB
    sh("mke2fs", "-q", "-F", "-t", "ext4", "-d", tree, "-E", f"offset={root_start}", raw,
       f"{root_size // 1024}k")
    sh("mformat", "-i", f"{raw}@@{2048 * 512}", "-T", "204800", "-h", "64", "-s", "32", "::",
       env=MTOOLS_ENV)
    out = work / "disk.vhdx"
    sh("qemu-img", "convert", "-f", "raw", "-O", "vhdx", raw, out)
    raw.unlink()
    return out


def make_qcow2(work: Path) -> Path:
    """2 GiB qcow2 holding 2 GiB of data (a full disk: conversion time is all I/O)."""
    raw = work / "data.raw"
    chunk = os.urandom(8 * MiB)
    with raw.open("wb") as fh:
        for i in range(2 * GiB // (8 * MiB)):
            fh.write(chunk[i:] + chunk[:i])
    out = work / "data.qcow2"
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, out)
    raw.unlink()
    return out


def guestfish_env() -> dict[str, str] | None:
    """libguestfs only works here with the direct backend forced to TCG."""
    if shutil.which("guestfish") is None:
        print("installing libguestfs-tools (benchmark peer only) ...", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            proc = run.run(["apt-get", "install", "-y", "-q", "--no-install-recommends",
                            "libguestfs-tools"], env=env, timeout=INSTALL_TIMEOUT, check=False)
            ok, why = proc.returncode == 0, proc.err[-300:]
        except run.ProcessFailed as e:  # apt-get missing, or timed out
            ok, why = False, str(e)
        if not ok or shutil.which("guestfish") is None:
            print("guestfish unavailable: " + why)
            return None
    env = {**os.environ, "LIBGUESTFS_BACKEND": "direct",
           "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"}
    if not glob.glob("/boot/vmlinuz-*"):
        # supermin needs a kernel; use the stock one ci/host-deps.sh unpacks.
        kernels = sorted(glob.glob(str(KERNEL_CACHE / "boot/vmlinuz-*")))
        if kernels:
            version = Path(kernels[-1]).name.removeprefix("vmlinuz-")
            # supermin copies modules by their host path and follows no symlink: they
            # must really be under /lib/modules (as an installed kernel's would be).
            target = Path("/lib/modules") / version
            if not target.exists():
                print(f"copying kernel modules to {target} for supermin (peer only) ...",
                      flush=True)
                shutil.copytree(KERNEL_CACHE / "lib/modules" / version, target,
                                symlinks=True)
            if not (target / "modules.dep").exists():
                sh("depmod", version)
            env["SUPERMIN_KERNEL"] = kernels[-1]
            env["SUPERMIN_MODULES"] = str(target)
    return env


def edit(work: Path, args: argparse.Namespace) -> None:
    """Part 1: put + read back a 1 MiB file, hvdisk against one guestfish session."""
    vhdx = make_vhdx(work)
    payload = work / "payload.bin"
    payload.write_bytes(os.urandom(MiB))

    def hv_edit() -> None:
        sh(*HVDISK, "put", f"{vhdx}@2", payload, "/etc/payload.bin", env=HVDISK_ENV)
        if sh(*HVDISK, "cat", f"{vhdx}@2", "/etc/payload.bin",
              env=HVDISK_ENV) != payload.read_bytes():
            raise SystemExit("hvdisk read back different content")

    hv = timed(hv_edit, args.runs)
    print(f"edit  hvdisk put+cat (1 MiB, 2 GiB VHDX): {hv:6.2f} s")
    env = None if args.skip_guestfish else guestfish_env()
    if env is not None:
        back = work / "back.bin"

        def gf_edit() -> None:
            sh("guestfish", "--rw", "--format=vhdx", "-a", vhdx, "-m", "/dev/sda2",
               "upload", payload, "/etc/payload-gf.bin", ":",
               "download", "/etc/payload-gf.bin", back, env=env)
            if back.read_bytes() != payload.read_bytes():
                raise SystemExit("guestfish read back different content")

        gf = timed(gf_edit, args.runs)
        print(f"edit  guestfish upload+download (same):   {gf:6.2f} s")
        print(f"edit  speedup hvdisk vs guestfish: {gf / hv:5.1f}x (target >= 10x)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--convert-runs", type=int, default=6)
    ap.add_argument("--skip-guestfish", action="store_true")
    ap.add_argument("--skip-edit", action="store_true", help="only the conversion part")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-offline-") as tmp:
        work = Path(tmp)
        HVDISK_ENV["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
        print("preparing images ...", flush=True)
        if not args.skip_edit:
            edit(work, args)
        qcow2 = make_qcow2(work)
        out_hv, out_q = work / "hv.vhdx", work / "q.vhdx"

        def hv_convert() -> None:
            out_hv.unlink(missing_ok=True)
            sh(*HVDISK, "convert", "-q", "--to", "vhdx", qcow2, out_hv, env=HVDISK_ENV)

        def q_convert() -> None:
            out_q.unlink(missing_ok=True)
            sh("qemu-img", "convert", "-f", "qcow2", "-O", "vhdx", qcow2, out_q)

        # Untimed: one conversion fills hvdisk's bytecode cache.
        warm = work / "warm.qcow2"
        sh("qemu-img", "create", "-q", "-f", "qcow2", warm, "1M")
        sh(*HVDISK, "convert", "-q", "--to", "vhdx", warm, work / "warm.vhdx", env=HVDISK_ENV)
        # Alternate which goes first, and flush the previous output before each timed
        # run (untimed), so neither pays for the other's writeback.
        hv_t: list[float] = []
        q_t: list[float] = []
        for i in range(args.convert_runs):
            pair = [(q_convert, q_t), (hv_convert, hv_t)]
            for fn, acc in pair if i % 2 == 0 else reversed(pair):
                os.sync()
                acc.append(timed(fn, 1))
        # The fixed cost (start-up, imports, probing) on its own: an empty 64 MiB image.
        small = work / "small.qcow2"
        sh("qemu-img", "create", "-q", "-f", "qcow2", small, "64M")
        small_hv, small_q = work / "small-hv.vhdx", work / "small-q.vhdx"

        def hv_small() -> None:
            small_hv.unlink(missing_ok=True)
            sh(*HVDISK, "convert", "-q", "--to", "vhdx", small, small_hv, env=HVDISK_ENV)

        def q_small() -> None:
            small_q.unlink(missing_ok=True)
            sh("qemu-img", "convert", "-f", "qcow2", "-O", "vhdx", small, small_q)

        fq, fhv = timed(q_small, 15), timed(hv_small, 15)
        print(f"convert empty 64 MiB qcow2->vhdx: qemu-img {fq * 1000:5.1f} ms, hvdisk "
              f"{fhv * 1000:5.1f} ms (fixed cost {1000 * (fhv - fq):5.1f} ms)")
        hvc, qc = statistics.median(hv_t), statistics.median(q_t)
        print(f"convert qemu-img qcow2->vhdx (2 GiB, all data):   {qc:6.2f} s "
              f"(min {min(q_t):.2f})")
        print(f"convert hvdisk   qcow2->vhdx (same):              {hvc:6.2f} s "
              f"(min {min(hv_t):.2f})")
        # Each pair ran back to back: the median of the pairs' ratios is the figure least
        # moved by other load on the machine (medians of the two series drift apart).
        paired = statistics.median(h / q for h, q in zip(hv_t, q_t, strict=True))
        print(f"convert ratio hvdisk / qemu-img: {paired:5.3f} median of pairs, "
              f"{hvc / qc:5.3f} of medians, {min(hv_t) / min(q_t):5.3f} "
              f"best-of-{args.convert_runs} (target <= 1.05)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
