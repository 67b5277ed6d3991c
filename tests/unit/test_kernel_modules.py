"""The kernel module allow-list of elements/server-core, run through the real tools.

`kernel-modules-rules` turns kernel-modules.allow (plus DIB_COREHOST_KERNEL_MODULES)
into dpkg path rules; here real dpkg installs a small kernel-shaped package into a
throw-away root with those rules, so what stays is what dpkg itself decides.
`kernel-modules-check` reads the real modinfo of module files (minimal ELF objects
with a .modinfo section, which is all modinfo reads) and must name every dependency
the list pruned and every entry that keeps nothing.
"""

from __future__ import annotations

import lzma
import os
import struct
import subprocess
from pathlib import Path

import pytest

ELEMENT = Path(__file__).resolve().parents[2] / "elements" / "server-core"
RULES = ELEMENT / "kernel-modules-rules"
CHECK = ELEMENT / "kernel-modules-check"
ALLOW = ELEMENT / "kernel-modules.allow"
VERSION = "6.1.0-99-amd64"


def ko(name: str, depends: str = "") -> bytes:
    """A relocatable x86-64 ELF object whose only content is a .modinfo section."""
    info = f"license=GPL\0depends={depends}\0name={name}\0".encode()
    shstr = b"\0.modinfo\0.shstrtab\0"
    off_info = 64
    off_shstr = off_info + len(info)
    off_sh = (off_shstr + len(shstr) + 7) & ~7
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # 64-bit, little-endian
    header = ident + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, off_sh, 0, 64, 0, 0, 64, 3, 2)
    body = header + info + shstr
    body += bytes(off_sh - len(body))

    def section(name_at: int, kind: int, flags: int, offset: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name_at, kind, flags, 0, offset, size, 0, 0, 1, 0)

    return body + section(0, 0, 0, 0, 0) + section(1, 1, 2, off_info, len(info)) + section(
        10, 3, 0, off_shstr, len(shstr))


def run(argv: list[str | Path],
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "DIB_COREHOST_KERNEL_MODULES"}
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=60,
                          env={**base, **(env or {})})


def rules(tmp_path: Path, extra: str | None = None, allow: Path = ALLOW) -> Path:
    env = {} if extra is None else {"DIB_COREHOST_KERNEL_MODULES": extra}
    out = run([RULES, allow], env)
    assert out.returncode == 0, out.stderr
    path = tmp_path / "50-corehost-kernel-modules"
    path.write_text(out.stdout)
    return path


# Module files of the package: what the allow-list keeps and what it must prune.
KEPT = [
    "arch/x86/kvm/kvm.ko", "arch/x86/kvm/kvm-amd.ko", "arch/x86/kvm/kvm-intel.ko",
    "virt/lib/irqbypass.ko", "drivers/vhost/vhost_net.ko", "drivers/vhost/vhost.ko",
    "net/bridge/bridge.ko", "net/bridge/br_netfilter.ko", "net/8021q/8021q.ko",
    "net/netfilter/nf_tables.ko", "fs/squashfs/squashfs.ko", "fs/fat/vfat.ko",
    "fs/nls/nls_cp437.ko", "fs/overlayfs/overlay.ko", "drivers/usb/storage/usb-storage.ko",
    "drivers/usb/storage/uas.ko", "drivers/usb/host/xhci-pci.ko",
    "drivers/block/virtio_blk.ko", "drivers/block/loop.ko", "drivers/net/virtio_net.ko",
    "drivers/net/tun.ko", "drivers/nvme/host/nvme.ko", "drivers/ata/ahci.ko",
    "drivers/net/ethernet/intel/e1000e/e1000e.ko", "drivers/net/ethernet/intel/igb/igb.ko",
    "drivers/net/ethernet/intel/ixgbe/ixgbe.ko", "drivers/gpu/drm/ast/ast.ko",
    "drivers/gpu/drm/drm.ko",
]
PRUNED = [
    "sound/core/snd.ko", "drivers/bluetooth/btusb.ko", "net/bluetooth/bluetooth.ko",
    "drivers/gpu/drm/amd/amdgpu/amdgpu.ko", "drivers/gpu/drm/i915/i915.ko",
    "drivers/net/wireless/intel/iwlwifi/iwlwifi.ko", "drivers/media/rc/ir-nec.ko",
    "drivers/block/floppy.ko", "drivers/staging/rtl8192e/r8192e.ko", "fs/ocfs2/ocfs2.ko",
    "drivers/net/ethernet/3com/3c59x.ko", "drivers/usb/gadget/libcomposite.ko",
]
BESIDE = ["modules.builtin", "modules.order", "modules.builtin.modinfo"]


@pytest.fixture(scope="module")
def kernel_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A package shaped like linux-image: modules under kernel/, module lists beside it."""
    tree = tmp_path_factory.mktemp("pkg")
    moddir = tree / "lib" / "modules" / VERSION
    for rel in KEPT + PRUNED:
        path = moddir / "kernel" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(ko(path.stem))
    for rel in BESIDE:
        (moddir / rel).write_text("kernel/fs/nls/nls_base.ko\n")
    (tree / "boot").mkdir()
    (tree / "boot" / f"vmlinuz-{VERSION}").write_bytes(b"kernel")
    (tree / "DEBIAN").mkdir()
    (tree / "DEBIAN" / "control").write_text(
        "Package: linux-image-test\nVersion: 1\nArchitecture: all\n"
        "Maintainer: test <test@example.org>\nDescription: kernel-shaped test package\n")
    deb = tmp_path_factory.mktemp("deb") / "linux-image-test.deb"
    out = run(["dpkg-deb", "--root-owner-group", "-Znone", "--build", tree, deb])
    assert out.returncode == 0, out.stderr
    return deb


def install(deb: Path, rules_file: Path, root: Path) -> Path:
    """Install `deb` into `root` with real dpkg, the rules given as its options (dpkg reads
    the same lines from /etc/dpkg/dpkg.cfg.d in the image); returns the module tree."""
    admin = root / "var" / "lib" / "dpkg"
    for d in ("info", "updates"):
        (admin / d).mkdir(parents=True)
    (admin / "status").touch()
    options = [f"--{line}" for line in rules_file.read_text().splitlines()
               if line.startswith("path-")]
    out = run(["dpkg", f"--root={root}", f"--admindir={admin}", "--force-not-root",
               "--force-script-chrootless", "--log=/dev/null", *options, "-i", deb])
    assert out.returncode == 0, out.stderr
    return root / "lib" / "modules" / VERSION


def modules(moddir: Path) -> set[str]:
    return {str(p.relative_to(moddir / "kernel")) for p in (moddir / "kernel").rglob("*.ko*")}


def test_dpkg_keeps_the_allowed_modules_and_prunes_the_rest(kernel_deb: Path,
                                                             tmp_path: Path) -> None:
    moddir = install(kernel_deb, rules(tmp_path), tmp_path / "root")
    assert modules(moddir) == set(KEPT)
    # depmod and modprobe need the lists beside kernel/; the rest of the package stays.
    assert all((moddir / rel).is_file() for rel in BESIDE)
    assert (tmp_path / "root" / "boot" / f"vmlinuz-{VERSION}").is_file()


def test_a_profile_entry_keeps_more_and_nothing_else(kernel_deb: Path, tmp_path: Path) -> None:
    extra = "sound  drivers/bluetooth/bt*.ko* drivers/net/ethernet/3com/"
    moddir = install(kernel_deb, rules(tmp_path, extra), tmp_path / "root")
    added = {"sound/core/snd.ko", "drivers/bluetooth/btusb.ko",
             "drivers/net/ethernet/3com/3c59x.ko"}
    assert modules(moddir) == set(KEPT) | added


@pytest.mark.parametrize("extra", ["", "   "])
def test_an_empty_profile_variable_is_the_list_alone(kernel_deb: Path, tmp_path: Path,
                                                     extra: str) -> None:
    assert rules(tmp_path, extra).read_text().splitlines()[1:] == \
        rules(tmp_path).read_text().splitlines()[1:]


BAD_ENTRIES = ["/lib/modules", "../../etc", "drivers/../../../etc/passwd", "drivers/./net",
               "drivers//net", "drivers/[ab]*", "drivers\\net", "net/sched;rm", "fs/$HOME",
               "..", "."]


@pytest.mark.parametrize("entry", BAD_ENTRIES)
def test_a_bad_profile_entry_stops_with_one_line_naming_it(entry: str) -> None:
    out = run([RULES, ALLOW], {"DIB_COREHOST_KERNEL_MODULES": f"net/sched {entry}"})
    assert out.returncode == 2
    assert out.stdout == ""
    [line] = out.stderr.splitlines()
    assert "DIB_COREHOST_KERNEL_MODULES" in line and f"'{entry}'" in line


@pytest.mark.parametrize(("text", "lineno"), [
    ("fs/ext4\n/abs/path\n", 2),
    ("# comment\n\nfs/ext4 fs/xfs\n", 3),
    ("fs/ext4\nfs/../../x # why\n", 2),
])
def test_a_bad_line_in_the_list_names_file_and_line(tmp_path: Path, text: str, lineno: int) -> None:
    allow = tmp_path / "kernel-modules.allow"
    allow.write_text(text)
    out = run([RULES, allow])
    assert out.returncode == 2
    [line] = out.stderr.splitlines()
    assert line.startswith(f"kernel-modules-rules: {allow}:{lineno}: ")


@pytest.mark.parametrize("argv", [[], ["/nonexistent/kernel-modules.allow"], ["a", "b"]])
def test_bad_arguments_are_one_line(argv: list[str]) -> None:
    out = run([RULES, *argv])
    assert out.returncode == 2
    assert len(out.stderr.splitlines()) == 1 and "Traceback" not in out.stderr


def test_a_list_without_entries_is_refused(tmp_path: Path) -> None:
    allow = tmp_path / "kernel-modules.allow"
    allow.write_text("# nothing kept\n\n")
    out = run([RULES, allow])
    assert out.returncode == 2
    assert "no entries" in out.stderr


def module_tree(tmp_path: Path, mods: dict[str, str], builtin: list[str]) -> Path:
    """/lib/modules/VERSION with one module per `path: depends`; `.xz` files are
    compressed the way the image stores them (CRC32 check, as the kernel requires)."""
    moddir = tmp_path / "lib" / "modules" / VERSION
    for rel, depends in mods.items():
        path = moddir / "kernel" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = ko(path.name.split(".ko")[0], depends)
        if rel.endswith(".xz"):
            data = lzma.compress(data, check=lzma.CHECK_CRC32)
        path.write_bytes(data)
    (moddir / "modules.builtin").write_text("".join(f"kernel/{b}\n" for b in builtin))
    return moddir


def test_check_accepts_dependencies_kept_or_built_in(tmp_path: Path) -> None:
    moddir = module_tree(tmp_path, {
        "arch/x86/kvm/kvm-amd.ko.xz": "kvm,ccp",
        "arch/x86/kvm/kvm.ko.xz": "irqbypass",
        "virt/lib/irqbypass.ko.xz": "",
        "drivers/crypto/ccp/ccp.ko": "",
        # Spelled with - in one place and _ in the other, as kmod allows.
        "fs/nls/nls_cp437.ko": "nls-base",
        "lib/crc-t10dif.ko": "crct10dif_common",
    }, builtin=["fs/nls/nls_base.ko", "crypto/crct10dif_common.ko"])
    out = run([CHECK, moddir])
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")


def test_check_names_every_pruned_dependency(tmp_path: Path) -> None:
    moddir = module_tree(tmp_path, {
        "arch/x86/kvm/kvm-amd.ko.xz": "kvm,ccp",
        "arch/x86/kvm/kvm.ko.xz": "irqbypass",
        "drivers/net/ethernet/sfc/sfc.ko": "mtd,mdio",
        "drivers/net/mdio.ko": "",
    }, builtin=[])
    out = run([CHECK, moddir])
    assert out.returncode == 1
    assert sorted(out.stdout.splitlines()) == [
        "kvm (kernel/arch/x86/kvm/kvm.ko.xz) needs irqbypass, which is not kept",
        "kvm_amd (kernel/arch/x86/kvm/kvm-amd.ko.xz) needs ccp, which is not kept",
        "sfc (kernel/drivers/net/ethernet/sfc/sfc.ko) needs mtd, which is not kept",
    ]


def test_check_names_an_entry_that_keeps_nothing(tmp_path: Path) -> None:
    moddir = module_tree(tmp_path, {"drivers/nvme/host/nvme.ko": "",
                                    "drivers/block/virtio_blk.ko": ""}, builtin=[])
    allow = tmp_path / "kernel-modules.allow"
    allow.write_text("drivers/nvme\ndrivers/block/virtio_blk.ko*\ndrivers/nvm\n")
    out = run([CHECK, moddir, rules(tmp_path, allow=allow)])
    assert out.returncode == 1
    assert out.stdout.splitlines() == [
        f"kernel {VERSION} has nothing at kernel/drivers/nvm (an allowed entry that keeps nothing)"]


@pytest.mark.parametrize("argv", [[], ["/nonexistent"], ["{moddir}", "/nonexistent/rules"],
                                  ["{moddir}", "x", "y"]])
def test_check_bad_arguments_are_one_line(tmp_path: Path, argv: list[str]) -> None:
    moddir = module_tree(tmp_path, {"drivers/nvme/host/nvme.ko": ""}, builtin=[])
    out = run([CHECK, *(a.format(moddir=moddir) for a in argv)])
    assert out.returncode == 2
    assert len(out.stderr.splitlines()) == 1 and out.stdout == ""


def system_asking(root: Path) -> None:
    """A root file system whose units, fstab and modules-load.d name modules."""
    units = root / "usr" / "lib" / "systemd" / "system"
    units.mkdir(parents=True)
    (root / "lib").mkdir(exist_ok=True)
    (root / "lib" / "systemd").symlink_to(root / "usr" / "lib" / "systemd")
    (units / "proc-sys-fs-binfmt_misc.mount").write_text(
        "[Mount]\nWhat=binfmt_misc\nWhere=/proc/sys/fs/binfmt_misc\nType=binfmt_misc\n")
    (units / "tmp.mount").write_text("[Mount]\nWhat=tmpfs\nType=tmpfs\n")
    (units / "systemd-logind.service").write_text(
        "[Unit]\nWants=modprobe@drm.service\nAfter=modprobe@loop.service\n")
    (units / "modprobe@.service").write_text("[Service]\nExecStart=-/sbin/modprobe -abq %i\n")
    wants = root / "etc" / "systemd" / "system" / "sysinit.target.wants"
    wants.mkdir(parents=True)
    (wants / "modprobe@dm_mod.service").symlink_to(units / "modprobe@.service")
    (root / "etc" / "fstab").write_text(
        "# <file system> <mount point> <type>\nLABEL=root / ext4 defaults 0 1\n"
        "LABEL=data /srv xfs defaults 0 2\n/swap none swap sw 0 0\n")
    load = root / "etc" / "modules-load.d"
    load.mkdir()
    (load / "host.conf").write_text("# kept\nkvm\n; comment\nvhost-net\n")
    (root / "etc" / "modules").write_text("# /etc/modules\n")


ORDER = ["fs/binfmt_misc.ko", "fs/ext4/ext4.ko", "fs/xfs/xfs.ko", "drivers/gpu/drm/drm.ko",
         "drivers/block/loop.ko", "drivers/md/dm-mod.ko", "arch/x86/kvm/kvm.ko",
         "drivers/vhost/vhost_net.ko"]


def test_check_names_each_module_the_system_asks_for_that_is_pruned(tmp_path: Path) -> None:
    moddir = module_tree(tmp_path, {"fs/ext4/ext4.ko": "", "drivers/gpu/drm/drm.ko": "",
                                    "arch/x86/kvm/kvm.ko": ""}, builtin=[])
    (moddir / "modules.order").write_text("".join(f"kernel/{m}\n" for m in ORDER))
    system_asking(tmp_path)
    out = run([CHECK, moddir])
    assert out.returncode == 1, out.stderr
    assert sorted(out.stdout.splitlines()) == [
        "binfmt_misc (kernel/fs/binfmt_misc.ko) is pruned, but "
        "proc-sys-fs-binfmt_misc.mount (Type=binfmt_misc) needs it",
        "dm_mod (kernel/drivers/md/dm-mod.ko) is pruned, but modprobe@dm_mod.service needs it",
        "loop (kernel/drivers/block/loop.ko) is pruned, but modprobe@loop.service needs it",
        "vhost_net (kernel/drivers/vhost/vhost_net.ko) is pruned, but "
        "/etc/modules-load.d/host.conf needs it",
        "xfs (kernel/fs/xfs/xfs.ko) is pruned, but /etc/fstab (type xfs) needs it",
    ]


def test_check_accepts_a_system_whose_named_modules_are_kept_or_built_in(
        tmp_path: Path) -> None:
    kept = {m: "" for m in ORDER if m != "drivers/md/dm-mod.ko"}
    moddir = module_tree(tmp_path, kept, builtin=["drivers/md/dm-mod.ko"])
    (moddir / "modules.order").write_text("".join(f"kernel/{m}\n" for m in ORDER))
    system_asking(tmp_path)
    out = run([CHECK, moddir])
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")
