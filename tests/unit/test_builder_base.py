"""The base cache's key (what reuses a base and what rebuilds it), its store and lookup,
and the agent layer's package swap on a real installed tree (pypa installer)."""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from builder import base, build, dib, inputs, layer
from builder.profile import load


@pytest.fixture()
def ci_like(fake_root: Path, add_element: Callable[..., Path]) -> Path:
    add_element("hvagent", {"install.d/50-hvagent-venv": "#!/bin/bash\n",
                            "templates/etc/hvagent/hvagent.yaml.j2": "listen: x\n"})
    add_element("server-core", {"package-installs.yaml": "qemu-system-x86:\n"})
    (fake_root / "builder" / "dib.py").write_text("# the builder\n")
    (fake_root / "hvagent" / "config.py").write_text("# the agent's config schema\n")
    (fake_root / "hvagent" / "api.py").write_text("# the agent's API\n")
    profile = fake_root / "profiles" / "h.yaml"
    profile.write_text("name: h\nelements: [debian-minimal, vm, server-core, hvagent]\n"
                       "packages: [htop]\n")
    return profile


def key(profile: Path, build_dir: Path = Path("/tmp/b1")) -> inputs.Inputs:
    p = load(profile)
    closure, with_agent, _ = build.plan(p)
    return build.base_key(p, closure, with_agent, dib.dib_command(p, build_dir), build_dir)[0]


def test_the_agents_own_source_does_not_change_the_base(ci_like: Path, fake_root: Path) -> None:
    before = key(ci_like)
    (fake_root / "hvagent" / "api.py").write_text("# the agent's API, one line changed\n")
    (fake_root / "hvagent" / "__init__.py").write_text('"""agent, edited"""\n')
    assert key(ci_like).digest == before.digest
    # ...nor the build's own temp dir
    assert key(ci_like, Path("/tmp/another-build")).digest == before.digest


@pytest.mark.parametrize("change", [
    "packages", "release", "element package list", "element template", "builder source",
    "agent config schema", "project file"])
def test_what_shapes_the_image_changes_the_base(ci_like: Path, fake_root: Path,
                                                change: str) -> None:
    before = key(ci_like).digest
    edits: dict[str, tuple[Path, str]] = {
        "packages": (ci_like, ci_like.read_text().replace("[htop]", "[htop, tmux]")),
        "release": (ci_like, ci_like.read_text() + "release: trixie\n"),
        "element package list": (fake_root / "elements/server-core/package-installs.yaml",
                                 "qemu-system-x86:\nopen-iscsi:\n"),
        "element template": (fake_root / "elements/hvagent/templates/etc/hvagent/"
                                          "hvagent.yaml.j2", "listen: y\n"),
        "builder source": (fake_root / "builder" / "dib.py", "# the builder, changed\n"),
        "agent config schema": (fake_root / "hvagent" / "config.py", "# a new default\n"),
        "project file": (fake_root / "pyproject.toml",
                         '[project]\nname = "corehost"\ndependencies = ["httpx"]\n'),
    }
    path, text = edits[change]
    path.write_text(text)
    assert key(ci_like).digest != before


def dib_output(tmp: Path, name: str = "h") -> Path:
    dib_base = tmp / "dib" / name
    dib_base.parent.mkdir(parents=True)
    with open(f"{dib_base}.raw", "wb") as f:
        f.truncate(64 << 20)
        f.seek(1 << 20)
        f.write(b"root file system")
    Path(f"{dib_base}.vmlinuz").write_bytes(b"kernel")
    manifests = Path(f"{dib_base}.d") / "dib-manifests"
    manifests.mkdir(parents=True)
    (manifests / "dib-manifest-dpkg-h").write_text('{"packages": []}\n')
    return dib_base


def test_a_stored_base_is_found_by_its_key_and_copied_out_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    dib_base = dib_output(tmp_path / "build1")
    (tmp_path / "dib.log").write_text("the log\n")
    k = "ab" * 32
    with base.locked(k):
        assert base.lookup(k) is None
        stored = base.store(k, dib_base, tmp_path / "dib.log", {"agent_source": "s1"})
    assert stored.meta["files"] == [".raw", ".vmlinuz"]
    found = base.lookup(k)
    assert found is not None and found.meta["agent_source"] == "s1"
    assert base.lookup("cd" * 32) is None  # another key
    target = tmp_path / "build2" / "dib" / "h"
    base.materialise(found, target)
    assert Path(f"{target}.raw").read_bytes() == Path(f"{dib_base}.raw").read_bytes()
    assert (Path(f"{target}.d") / "dib-manifests" / "dib-manifest-dpkg-h").is_file()
    # A copy, not a link: laying an agent on it must not change the cache.
    Path(f"{target}.raw").write_bytes(b"changed")
    assert (found.path / "image.raw").stat().st_size == 64 << 20
    # An entry that lost a file is not a base.
    (found.path / "image.vmlinuz").unlink()
    assert base.lookup(k) is None


def test_the_cache_keeps_the_most_recently_used(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "dib.log").write_text("log\n")
    keys = [f"{i:02d}" * 32 for i in range(base.BASE_KEEP + 2)]
    for i, k in enumerate(keys):
        dib_base = dib_output(tmp_path / f"b{i}")
        with base.locked(k):
            base.store(k, dib_base, tmp_path / "dib.log", {})
    left = sorted(d.name for d in base.cache_dir().iterdir() if not d.name.startswith("."))
    assert left == sorted(k[:16] for k in keys[-base.BASE_KEEP:])


def wheel(tmp: Path, version: str, files: dict[str, str]) -> Path:
    """A wheel of distribution corehost with a console script `hvagent`, written as the
    wheel format says (dist-info METADATA, WHEEL, entry_points.txt, RECORD)."""
    path = tmp / f"corehost-{version}-py3-none-any.whl"
    info = f"corehost-{version}.dist-info"
    meta = {f"{info}/METADATA": f"Metadata-Version: 2.1\nName: corehost\nVersion: {version}\n",
            f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                             "Tag: py3-none-any\n",
            f"{info}/entry_points.txt": "[console_scripts]\nhvagent = hvagent:main\n"}
    with zipfile.ZipFile(path, "w") as z:
        for name, text in {**files, **meta}.items():
            z.writestr(name, text)
        z.writestr(f"{info}/RECORD", "".join(f"{n},,\n" for n in [*files, *meta])
                   + f"{info}/RECORD,,\n")
    return path


def test_the_layer_replaces_the_installed_agent_by_its_record(tmp_path: Path) -> None:
    """remove_distribution + the installer half of install_wheel on a real venv layout
    (the chroot bytecode step needs a whole image: the real build test covers it)."""
    root = tmp_path / "img"
    site = root / "opt/hvagent/lib/python3.11/site-packages"
    site.mkdir(parents=True)
    (root / "opt/hvagent/bin").mkdir()
    (site / "otherdep").mkdir()
    (site / "otherdep" / "__init__.py").write_text("# a dependency, kept\n")
    old = wheel(tmp_path, "1", {"hvagent/__init__.py": "def main():\n    print('old')\n",
                                "hvagent/old_only.py": "x = 1\n"})
    new = wheel(tmp_path, "2", {"hvagent/__init__.py": "MARK = 'new'\ndef main(): pass\n",
                                "hvagent/new.py": "x = 2\n"})
    # "the base": version 1 unpacked as pip would leave it
    with zipfile.ZipFile(old) as z:
        z.extractall(site)
    record = next(site.glob("corehost-1*.dist-info")) / "RECORD"
    record.write_text(record.read_text() + "../../../bin/hvagent,,\n")
    (root / "opt/hvagent/bin/hvagent").write_text("#!/opt/hvagent/bin/python\n# old\n")

    listed = layer.remove_distribution(site, "corehost")
    assert "hvagent/old_only.py" in listed
    assert not (site / "hvagent").exists() and not (root / "opt/hvagent/bin/hvagent").exists()
    assert (site / "otherdep" / "__init__.py").is_file()

    scheme = {"purelib": str(site), "platlib": str(site),
              "scripts": str(root / "opt/hvagent/bin"),
              "headers": str(root / "opt/hvagent/include"), "data": str(root / "opt/hvagent")}
    from installer import install
    from installer.destinations import SchemeDictionaryDestination
    from installer.sources import WheelFile
    with WheelFile.open(new) as source:
        install(source, SchemeDictionaryDestination(
            scheme, interpreter="/opt/hvagent/bin/python", script_kind="posix"), {})
    assert "MARK = 'new'" in (site / "hvagent" / "__init__.py").read_text()
    assert not (site / "hvagent" / "old_only.py").exists()
    script = (root / "opt/hvagent/bin/hvagent").read_text()
    assert script.startswith("#!/opt/hvagent/bin/python\n")  # the image's, not ours


def test_a_record_reaching_outside_the_venv_is_refused(tmp_path: Path) -> None:
    site = tmp_path / "opt/hvagent/lib/python3.11/site-packages"
    info = site / "corehost-1.dist-info"
    info.mkdir(parents=True)
    victim = tmp_path / "etc" / "passwd"
    victim.parent.mkdir()
    victim.write_text("root:x:0:0\n")
    (info / "RECORD").write_text("../../../../../etc/passwd,,\n")
    with pytest.raises(layer.LayerError, match="outside /opt/hvagent"):
        layer.remove_distribution(site, "corehost")
    assert victim.read_text() == "root:x:0:0\n"


# ---------------------------------------------------------------- late files


@pytest.fixture()
def with_late(ci_like: Path, fake_root: Path) -> Path:
    """ci_like whose hvagent element declares its config template and a static script
    late, next to a unit file that is not."""
    element = fake_root / "elements" / "hvagent"
    (element / "static/usr/lib/corehost").mkdir(parents=True)
    (element / "static/usr/lib/corehost/helper").write_text("#!/bin/sh\necho 1\n")
    (element / "static/usr/lib/systemd/system").mkdir(parents=True)
    (element / "static/usr/lib/systemd/system/a.service").write_text(
        "[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n")
    (element / "late-files").write_text(
        "# nothing reads these while the image is built\n"
        "etc/hvagent/hvagent.yaml\n/usr/lib/corehost/helper  # a leading slash is fine\n")
    return ci_like


def test_a_late_files_change_keeps_the_base_and_the_rest_changes_it(
        with_late: Path, fake_root: Path) -> None:
    element = fake_root / "elements" / "hvagent"
    p = load(with_late)
    before, whole = key(with_late).digest, build.plan(p)[2].digest
    # The contents of late files (a template, a static file) leave the base as it is,
    # but not the whole build's input hash: the build is redone, on the same base.
    (element / "templates/etc/hvagent/hvagent.yaml.j2").write_text("listen: y\n")
    (element / "static/usr/lib/corehost/helper").write_text("#!/bin/sh\necho 2\n")
    assert key(with_late).digest == before
    assert build.plan(load(with_late))[2].digest != whole
    # Their permission bits, a file that is not late, and the list itself change it.
    for change in ("mode", "unit", "list"):
        if change == "mode":
            (element / "static/usr/lib/corehost/helper").chmod(0o755)
        elif change == "unit":
            (element / "static/usr/lib/systemd/system/a.service").write_text(
                "[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=other.target\n")
        else:
            (element / "late-files").write_text("etc/hvagent/hvagent.yaml\n")
        now = key(with_late).digest
        assert now != before, change
        before = now


def test_late_file_contents_are_what_the_image_gets(with_late: Path) -> None:
    from builder import late, render

    p = load(with_late)
    closure = render.element_closure([*p.build_elements, render.OVERLAY_DEPS])
    files = late.late_files(closure)
    assert [(f.image_path, f.template) for f in files] == [
        ("etc/hvagent/hvagent.yaml", True), ("usr/lib/corehost/helper", False)]
    got = late.contents(p, files)
    assert got["etc/hvagent/hvagent.yaml"][0] == b"listen: x\n"
    assert got["usr/lib/corehost/helper"] == (b"#!/bin/sh\necho 1\n", 0o644)


@pytest.mark.parametrize("entry, message", [
    ("etc/no/such/file", "neither static/etc/no/such/file nor templates/etc/no/such/file.j2 "
                         "of element hvagent is a regular file"),
    ("../../etc/passwd", "not a path in the image"),
    ("/", "not a path in the image"),
    ("etc/a\0b", "not a path in the image"),
    ("usr/lib/corehost", "neither static/usr/lib/corehost nor"),  # a directory
    ("etc/hvagent/hvagent.yaml\netc/hvagent/hvagent.yaml", "listed twice"),
])
def test_a_late_files_entry_that_names_nothing_usable_stops_the_build(
        with_late: Path, fake_root: Path, entry: str, message: str) -> None:
    listing = fake_root / "elements" / "hvagent" / "late-files"
    listing.write_text(f"# late\n{entry}\n")
    with pytest.raises(build.BuildError) as info:
        key(with_late)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith("elements/hvagent/late-files:")
    assert message in text


def test_the_layer_writes_late_files_whole_with_their_modes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc/hvagent").mkdir(parents=True)
    (root / "etc/hvagent/hvagent.yaml").write_text("old\n")
    layer.write_late_files(root, {"etc/hvagent/hvagent.yaml": (b"new\n", 0o640),
                                  "usr/lib/corehost/helper": (b"#!/bin/sh\n", 0o755)})
    assert (root / "etc/hvagent/hvagent.yaml").read_bytes() == b"new\n"
    assert (root / "etc/hvagent/hvagent.yaml").stat().st_mode & 0o7777 == 0o640
    assert (root / "usr/lib/corehost/helper").stat().st_mode & 0o7777 == 0o755
    assert sorted(p.name for p in (root / "etc/hvagent").iterdir()) == ["hvagent.yaml"]
    # Something else where a late file goes (a symlink out of the tree) is refused.
    (root / "etc/link").symlink_to("/etc/passwd")
    with pytest.raises(layer.LayerError, match="late file /etc/link: the base has something"):
        layer.write_late_files(root, {"etc/link": (b"x", 0o644)})


def test_a_late_files_list_that_is_not_utf8_stops_the_build(with_late: Path,
                                                           fake_root: Path) -> None:
    (fake_root / "elements/hvagent/late-files").write_bytes(b"etc/\xff\n")
    with pytest.raises(build.BuildError, match=r"^elements/hvagent/late-files: not UTF-8"):
        key(with_late)
