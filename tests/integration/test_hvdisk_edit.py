"""hvdisk's offline editing on real images: ext4 root and FAT ESP inside MBR and GPT,
in qcow2, raw, VHD and VHDX; every change is read back exactly and leaves the image
passing qemu-img check / hvdisk check and e2fsck -n."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import disk_images as di  # noqa: E402

pytestmark = pytest.mark.integration
HVDISK = [sys.executable, "-m", "hvagent.cli.hvdisk"]


# Unless a test asks for the raw-copy path, FUSE must really be used: without it hvdisk
# would quietly fall back to a copy and the FUSE variants would prove nothing.
FUSE_ENV = {**os.environ, "HVDISK_REQUIRE_FUSE": "1", "HVDISK_NO_FUSE": "0"}
COPY_ENV = {**os.environ, "HVDISK_NO_FUSE": "1"}


def hvdisk(*args: str | Path, rc: int = 0, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run([*HVDISK, *map(str, args)], capture_output=True,
                          env=FUSE_ENV if env is None else env, check=False, timeout=300)
    assert proc.returncode == rc, (args, proc.returncode, proc.stderr.decode())
    return proc


@pytest.fixture(scope="module")
def raws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("hvdisk-raw")
    return {scheme: di.make_raw(work / scheme, scheme) for scheme in ("gpt", "mbr")}


@pytest.fixture(params=[(f, s) for f in di.FORMATS for s in ("gpt", "mbr")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def disk(request: pytest.FixtureRequest, raws: dict[str, Path], tmp_path: Path
         ) -> di.TestDisk:
    fmt, scheme = request.param
    path = di.convert(raws[scheme], fmt, tmp_path / f"disk.{fmt}")
    return di.TestDisk(path, fmt, scheme)


def assert_healthy(d: di.TestDisk, tmp: Path) -> None:
    assert di.qemu_img_check_ok(d.path, d.fmt)
    hvdisk("check", d.path)
    fsck = di.ext_clean(d.path, d.fmt, tmp)
    assert fsck.returncode == 0, fsck.stdout.decode()


def test_reads_round_trip_every_format(disk: di.TestDisk, tmp_path: Path) -> None:
    before = disk.sha256()
    for rel, data in di.FILES.items():
        assert hvdisk("cat", disk.path, "/" + rel).stdout == data
    for rel, data in di.ESP_FILES.items():
        assert hvdisk("cat", f"{disk.path}@1", "/" + rel).stdout == data
    names = hvdisk("ls", disk.path, "/etc").stdout.decode().split()
    assert {"hostname", "motd", "abs-hostname", "escape"} <= set(names)
    hvdisk("get", f"{disk.path}@2", "/usr/share/blob.bin", tmp_path / "blob")
    assert (tmp_path / "blob").read_bytes() == di.FILES["usr/share/blob.bin"]
    # FAT names match case-insensitively, as in the guest.
    assert hvdisk("cat", f"{disk.path}@1", "/efi/boot/bootx64.efi").stdout == \
        di.ESP_FILES["EFI/BOOT/BOOTX64.EFI"]
    assert disk.sha256() == before  # reading never writes


def test_writes_round_trip_every_format(disk: di.TestDisk, tmp_path: Path) -> None:
    payload = os.urandom(1 << 20)
    src = tmp_path / "payload.bin"
    src.write_bytes(payload)
    hvdisk("put", disk.path, src, "/etc/payload.bin", "--mode", "0600", "--owner", "12:34")
    assert hvdisk("cat", disk.path, "/etc/payload.bin").stdout == payload
    st = hvdisk("stat", disk.path, "/etc/payload.bin", "--json").stdout
    assert b'"mode": "0600"' in st and b'"uid": 12' in st and b'"gid": 34' in st
    # Replacing keeps the old mode and owner.
    src.write_bytes(b"second version\n")
    hvdisk("put", disk.path, src, "/etc/payload.bin")
    assert hvdisk("cat", disk.path, "/etc/payload.bin").stdout == b"second version\n"
    assert b'"mode": "0600"' in hvdisk("stat", disk.path, "/etc/payload.bin", "--json").stdout
    # New names and replacements in a directory whose blocks are full.
    for i in range(3):
        hvdisk("put", disk.path, src, f"/var/full/new-file-with-a-long-name-{i}")
    hvdisk("put", disk.path, src, "/var/full/entry-with-a-long-name-007.conf")
    assert hvdisk("cat", disk.path, "/var/full/new-file-with-a-long-name-2").stdout == \
        b"second version\n"
    assert hvdisk("cat", disk.path, "/var/full/entry-with-a-long-name-007.conf").stdout == \
        b"second version\n"
    hvdisk("mkdir", "-p", disk.path, "/opt/app/conf")
    hvdisk("chmod", disk.path, "0750", "/opt/app")
    hvdisk("chown", disk.path, "1000:1001", "/opt/app/conf")
    rows = hvdisk("ls", "-l", disk.path, "/opt/app").stdout.decode()
    assert "drwxr-xr-x  1000  1001" in rows and "conf" in rows
    assert b'"mode": "0750"' in hvdisk("stat", disk.path, "/opt/app", "--json").stdout
    hvdisk("rm", disk.path, "/home/user/notes with space.txt")
    hvdisk("cat", disk.path, "/home/user/notes with space.txt", rc=2)
    hvdisk("rm", disk.path, "/opt", rc=2)  # not empty without -r
    hvdisk("rm", "-r", disk.path, "/opt")
    hvdisk("stat", disk.path, "/opt", rc=2)
    # The ESP.
    hvdisk("put", f"{disk.path}@1", src, "/EFI/debian/new.cfg")
    hvdisk("mkdir", f"{disk.path}@1", "/EFI/test")
    assert hvdisk("cat", f"{disk.path}@1", "/EFI/debian/new.cfg").stdout == src.read_bytes()
    hvdisk("rm", "-r", f"{disk.path}@1", "/EFI/test")
    hvdisk("chmod", f"{disk.path}@1", "0600", "/EFI/debian/new.cfg", rc=2)
    assert_healthy(disk, tmp_path)


def test_apply_tree_follows_guest_symlinks(disk: di.TestDisk, tmp_path: Path) -> None:
    tree = tmp_path / "update"
    (tree / "lib/firmware").mkdir(parents=True)
    (tree / "lib/firmware/fw.bin").write_bytes(b"\x00\x01firmware")
    (tree / "etc/app").mkdir(parents=True)
    (tree / "etc/app/app.conf").write_bytes(b"key=value\n")
    (tree / "etc/app/run.sh").write_bytes(b"#!/bin/sh\n")
    (tree / "etc/app/run.sh").chmod(0o755)
    os.symlink("app.conf", tree / "etc/app/current")
    (tree / "etc/hostname").write_bytes(b"updated\n")
    out = hvdisk("apply", disk.path, "--tree", tree).stdout.decode()
    assert "write /usr/lib/firmware/fw.bin" in out  # /lib -> usr/lib in the guest
    assert hvdisk("cat", disk.path, "/usr/lib/firmware/fw.bin").stdout == b"\x00\x01firmware"
    assert hvdisk("cat", disk.path, "/etc/app/current").stdout == b"key=value\n"
    assert hvdisk("cat", disk.path, "/etc/hostname").stdout == b"updated\n"
    st = hvdisk("stat", disk.path, "/etc/app/run.sh", "--json").stdout
    assert b'"mode": "0755"' in st and b'"uid": 0' in st
    assert_healthy(disk, tmp_path)


@pytest.mark.parametrize("fmt", ["qcow2", "vhdx"])
def test_symlinks_resolve_inside_the_guest(fmt: str, raws: dict[str, Path],
                                           tmp_path: Path) -> None:
    d = di.TestDisk(di.convert(raws["gpt"], fmt, tmp_path / f"d.{fmt}"), fmt, "gpt")
    host = tmp_path / "x"
    host.write_bytes(b"via symlink\n")
    # Absolute and relative-climbing symlinks land on the guest's /etc/hostname.
    assert hvdisk("cat", d.path, "/etc/abs-hostname").stdout == di.FILES["etc/hostname"]
    assert hvdisk("cat", d.path, "/etc/escape").stdout == di.FILES["etc/hostname"]
    assert hvdisk("cat", d.path, "/etc/escape-dir/etc/motd").stdout == di.FILES["etc/motd"]
    assert hvdisk("cat", d.path, "/etc/long").stdout == di.FILES["etc/motd"]
    hvdisk("put", d.path, host, "/etc/escape")
    assert hvdisk("cat", d.path, "/etc/hostname").stdout == b"via symlink\n"
    # A dangling absolute symlink creates its target inside the guest.
    hvdisk("put", d.path, host, "/etc/dangling")
    assert hvdisk("cat", d.path, "/etc/created-by-dangling").stdout == b"via symlink\n"
    lstat = hvdisk("stat", d.path, "/etc/dangling", "--json").stdout
    assert b'"type": "symlink"' in lstat
    assert_healthy(d, tmp_path)


@pytest.mark.parametrize("way", ["fuse", "copy"])
@pytest.mark.parametrize("fmt", ["qcow2", "vhdx", "vhd", "raw"])
def test_refused_paths_leave_the_image_byte_identical(fmt: str, way: str,
                                                      raws: dict[str, Path],
                                                      tmp_path: Path) -> None:
    env = FUSE_ENV if way == "fuse" else COPY_ENV
    d = di.TestDisk(di.convert(raws["gpt"], fmt, tmp_path / f"d.{fmt}"), fmt, "gpt")
    host = tmp_path / "x"
    host.write_bytes(b"x")
    before = d.sha256()
    cases = [
        ("put", d.path, host, "/../etc/x"),  # `..` above the root
        ("put", d.path, host, "../../x"),
        ("put", d.path, host, "/loop-a"),  # symlink loop
        ("put", d.path, host, "/etc/hostname/x"),  # through a file
        ("put", d.path, host, "/nonexistent/dir/x"),
        ("mkdir", d.path, "/etc"),  # exists
        ("rm", d.path, "/"),
        ("rm", d.path, "/.."),
        ("chmod", d.path, "9999", "/etc/motd"),
        ("put", f"{d.path}@7", host, "/x"),  # no such partition
        ("put", d.path, tmp_path / "missing", "/x"),
        ("apply", d.path, "--tree", tmp_path / "missing"),
    ]
    for case in cases:
        err = hvdisk(*case, rc=2, env=env).stderr.decode()
        assert err.startswith("hvdisk: error: ") and err.count("\n") == 1, err
    assert d.sha256() == before


@pytest.mark.parametrize(("kill", "way", "fmt"), [
    ("hvdisk", "fuse", "qcow2"), ("process-group", "fuse", "qcow2"),
    ("process-group", "fuse", "vhdx"), ("hvdisk", "fuse", "raw"),
    ("hvdisk", "copy", "qcow2"), ("process-group", "copy", "vhdx"),
    ("process-group", "copy", "raw")])
def test_interrupted_edit_leaves_the_image_unchanged(kill: str, way: str, fmt: str,
                                                     raws: dict[str, Path],
                                                     tmp_path: Path) -> None:
    """SIGKILL to hvdisk alone (its storage daemon still flushes), or to everything
    including the daemon (nothing flushes; a dead FUSE mount stays until the next run),
    while debugfs writes: the edit went to an overlay or a copy, so the image is
    byte-identical, and the next edit works."""
    env = FUSE_ENV if way == "fuse" else COPY_ENV
    d = di.TestDisk(di.convert(raws["gpt"], fmt, tmp_path / f"d.{fmt}"), fmt, "gpt")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(30 << 20))
    before = d.sha256()
    proc = subprocess.Popen([*HVDISK, "put", str(d.path), str(big), "/big.bin"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    # Kill the edit once debugfs is writing (a child of hvdisk running debugfs -w).
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        kids = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "debugfs -w"],
                              capture_output=True, check=False, timeout=60).stdout.split()
        if kids:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the edit finished before it could be interrupted"
    if kill == "hvdisk":
        proc.kill()
    else:
        os.killpg(proc.pid, 9)
    proc.wait(timeout=30)
    # The storage daemon stops with us; wait until the image is free again.
    deadline = time.monotonic() + 30
    while subprocess.run(["qemu-img", "info", str(d.path)], capture_output=True,
                         check=False, timeout=60).returncode != 0 \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert di.qemu_img_check_ok(d.path, fmt)
    assert d.sha256() == before
    assert hvdisk("cat", d.path, "/etc/hostname", env=env).stdout == di.FILES["etc/hostname"]
    assert hvdisk("fsck", d.path, env=env).stdout.strip() == b"clean"
    out = hvdisk("put", "-v", d.path, big, "/big2.bin", env=env)
    assert ("via a FUSE export" if way == "fuse" else "via a raw copy") in out.stderr.decode()
    assert hvdisk("cat", d.path, "/big2.bin", env=env).stdout == big.read_bytes()
    assert di.ext_clean(d.path, fmt, tmp_path).returncode == 0
    # No dead export is left mounted, no leftover beside the image.
    assert f"{d.path}" not in Path("/proc/self/mounts").read_text()
    assert not [ln for ln in Path("/proc/self/mounts").read_text().splitlines()
                if "/hvdisk-" in ln and "fuse" in ln and not _alive(ln.split()[1])]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _alive(mountpoint: str) -> bool:
    try:
        os.stat(mountpoint)
        return True
    except OSError:
        return False


def _locked_by_someone(path: Path) -> bool:
    """Whether any process holds a lock on `path` (/proc/locks names MAJ:MIN:INODE)."""
    ino = str(path.stat().st_ino)
    return any(tok.count(":") == 2 and tok.rsplit(":", 1)[1] == ino
               for line in Path("/proc/locks").read_text().splitlines()
               for tok in line.split())


def test_image_in_use_is_refused(raws: dict[str, Path], tmp_path: Path) -> None:
    d = di.TestDisk(di.convert(raws["gpt"], "qcow2", tmp_path / "d.qcow2"), "qcow2", "gpt")
    host = tmp_path / "x"
    host.write_bytes(b"x")
    before = d.sha256()
    # A real QEMU holding the disk (paused, no guest code runs).
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-S", "-nodefaults", "-display", "none", "-machine", "q35",
         "-drive", f"file={d.path},format=qcow2,if=none,id=d0",
         "-device", "virtio-blk-pci,drive=d0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # Wait until QEMU holds its locks on the image, seen in /proc/locks: a probe that
        # takes a lock itself (qemu-img info) could hold one just as QEMU starts, and QEMU
        # would give up on the image.
        deadline = time.monotonic() + 30
        while not _locked_by_someone(d.path):
            assert qemu.poll() is None, qemu.stderr.read() if qemu.stderr else ""
            assert time.monotonic() < deadline, "QEMU never locked the image"
            time.sleep(0.05)
        for args in (("put", d.path, host, "/x"), ("cat", d.path, "/etc/hostname")):
            err = hvdisk(*args, rc=2).stderr.decode()
            assert "in use" in err, err
        env = {**os.environ, "HVDISK_NO_FUSE": "1"}
        assert "in use" in hvdisk("put", d.path, host, "/x", rc=2, env=env).stderr.decode()
    finally:
        qemu.kill()
        qemu.wait(timeout=30)
    # Any other process holding it open is refused too.
    with d.path.open("rb"):
        assert "in use" in hvdisk("put", d.path, host, "/x", rc=2).stderr.decode()
    assert d.sha256() == before


@pytest.mark.parametrize("fmt", ["qcow2", "vhdx", "vhd", "raw"])
def test_without_fuse_edits_through_a_raw_copy(fmt: str, raws: dict[str, Path],
                                               tmp_path: Path) -> None:
    d = di.TestDisk(di.convert(raws["mbr"], fmt, tmp_path / f"d.{fmt}"), fmt, "mbr")
    env = COPY_ENV
    host = tmp_path / "x"
    host.write_bytes(os.urandom(300_000))
    out = hvdisk("put", "-v", "--json", d.path, host, "/etc/x", env=env)
    assert b'"via": "copy"' in out.stdout and b"via a raw copy" in out.stderr
    hvdisk("put", f"{d.path}@1", host, "/EFI/x", env=env)
    assert hvdisk("cat", d.path, "/etc/x", env=env).stdout == host.read_bytes()
    out = hvdisk("cat", "-v", d.path, "/etc/x")  # and through FUSE
    assert out.stdout == host.read_bytes() and b"via a FUSE export" in out.stderr
    assert hvdisk("cat", f"{d.path}@1", "/EFI/x").stdout == host.read_bytes()
    assert f'"format": "{fmt}"'.encode() in hvdisk("info", "--json", d.path).stdout
    assert_healthy(d, tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers


def test_without_fuse_refuses_to_drop_snapshots_or_backing(raws: dict[str, Path],
                                                          tmp_path: Path) -> None:
    env = {**os.environ, "HVDISK_NO_FUSE": "1"}
    host = tmp_path / "x"
    host.write_bytes(b"x")
    snap = di.convert(raws["gpt"], "qcow2", tmp_path / "snap.qcow2")
    di.run("qemu-img", "snapshot", "-c", "before", snap)
    base = di.convert(raws["gpt"], "qcow2", tmp_path / "base.qcow2")
    top = tmp_path / "top.qcow2"
    di.run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    for img in (snap, top):
        before = di.sha256(img)
        err = hvdisk("put", img, host, "/x", rc=2, env=env).stderr.decode()
        assert "--force" in err
        assert di.sha256(img) == before
        # With FUSE the image is edited in place: snapshots and backing file stay.
        hvdisk("put", img, host, "/x")
        assert hvdisk("cat", img, "/x").stdout == b"x"
    assert b"before" in di.run("qemu-img", "snapshot", "-l", snap).stdout
    hvdisk("put", "--force", snap, host, "/y", env=env)
    assert hvdisk("cat", snap, "/y").stdout == b"x"
