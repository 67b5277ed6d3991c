"""The `corehost` command's user-facing behaviour: listing, one-line errors, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from builder import cli

REPO = Path(__file__).resolve().parents[2]


def test_profiles_lists_names_parents_and_broken_ones(
        fake_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = fake_root / "profiles"
    (d / "base.yaml").write_text('name: base\ndescription: "the base"\nelements: [vm]\n')
    (d / "kid.yaml").write_text("name: kid\nextends: base\noutputs: [qcow2, vhdx]\n")
    assert cli.main(["profiles"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["base", "qcow2", "the", "base"]
    assert lines[1].split() == ["kid", "qcow2,vhdx", "(extends", "base)", "the", "base"]

    (d / "oops.yaml").write_text("name: oops\nelements: [vm]\nsize: 3G\n")
    assert cli.main(["profiles"]) == 2
    out = capsys.readouterr().out
    assert "oops             ERROR profiles/oops.yaml:3: size: unknown key" in out


def test_build_of_a_broken_profile_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nelements: [vm]\npackages:\n  add: nope\n")
    proc = subprocess.run([sys.executable, "-m", "builder.cli", "build", str(bad), "--dry-run"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == "corehost: bad.yaml:4: packages.add: expected a list of strings\n"
    assert proc.stdout == ""


def test_real_profiles_resolve(capsys: pytest.CaptureFixture[str]) -> None:
    """The repository's own profiles load and their dry run names every element."""
    profiles = sorted((REPO / "profiles").glob("*.yaml"))
    assert profiles
    for path in profiles:
        assert cli.main(["build", str(path), "--dry-run"]) == 0, path
        assert "corehost-overlay" in capsys.readouterr().out


def test_test_command_needs_an_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["test", str(tmp_path / "missing.qcow2")]) == 2
    assert "missing.qcow2: no such image" in capsys.readouterr().err


def test_pytest_passthrough_only_for_test(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["build", "server-core", "--dry-run", "--", "-k", "x"]) == 2
    assert "only for `corehost test`" in capsys.readouterr().err
    # options after the image still belong to corehost, not to pytest
    assert cli.main(["test", str(tmp_path / "none.qcow2"), "--accel", "tcg", "--", "-x"]) == 2
    assert "none.qcow2: no such image" in capsys.readouterr().err


def test_fields_table_documents_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    from builder.profile import FIELDS

    assert cli.main(["profiles", "--fields"]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == [f.key for f in FIELDS]


def _hostile_profiles(d: Path) -> dict[str, str]:
    """Profile paths that must each be refused with this one line (after `corehost: `)."""
    import os

    bomb = "name: bomb\nelements: [vm]\nl0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    bomb += "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9))
    (d / "bomb.yaml").write_text(bomb)
    (d / "loop.yaml").write_text("name: loop\nelements: &e [vm, *e]\n")
    (d / "merge.yaml").write_text("d: &d {release: bookworm}\nname: merge\n<<: *d\n")
    (d / "latin1.yaml").write_bytes(b"name: latin1\ndescription: \xe9\n")
    (d / "huge.yaml").write_text("name: huge\nelements: [vm]\nimage_size: 100000000000000T\n")
    (d / "dir.yaml").mkdir()
    os.mkfifo(d / "fifo.yaml")
    (d / "zero.yaml").symlink_to("/dev/zero")
    (d / "kid.yaml").write_text("name: kid\nextends: fifo\n")
    return {
        "bomb": "bomb.yaml:7: yaml: more than 20000 values once aliases are expanded",
        "loop": "loop.yaml:2: elements[1]: an alias refers to itself (recursive anchor)",
        "merge": "merge.yaml:3: yaml: merge keys (<<) are not supported; use extends: to build "
                 "on another profile",
        "latin1": "latin1.yaml:2: yaml: not UTF-8 text (byte 0xe9)",
        "huge": "huge.yaml:3: image_size: 100000000000000T is larger than the limit of 2T",
        "dir": "dir.yaml: profile: is a directory, expected a YAML file",
        "fifo": "fifo.yaml: profile: is a FIFO, expected a YAML file",
        "zero": "zero.yaml: profile: is a character device, expected a YAML file",
        "kid": "fifo.yaml: profile: is a FIFO, expected a YAML file",
    }


def test_hostile_profiles_exit_2_with_one_line_and_build_nothing(tmp_path: Path) -> None:
    """The real command, as a subprocess with a memory limit and a timeout: each bad
    profile is one stderr line and exit 2, and the build never starts (no output root)."""
    expected = _hostile_profiles(tmp_path)
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)); "
    for name, line in expected.items():
        out = tmp_path / "out"
        proc = subprocess.run(
            [sys.executable, "-c", limit + "import runpy; runpy.run_module('builder.cli', "
             "run_name='__main__')", "build", f"{name}.yaml", "--out", str(out)],
            capture_output=True, text=True, cwd=tmp_path, timeout=60)
        assert (proc.returncode, proc.stderr, proc.stdout) == (2, f"corehost: {line}\n", ""), name
        assert not out.exists(), name


def test_profiles_listing_survives_a_fifo_and_a_bomb(tmp_path: Path) -> None:
    d = tmp_path / "profiles"
    d.mkdir()
    _hostile_profiles(d)
    (d / "good.yaml").write_text("name: good\nelements: [vm]\n")
    proc = subprocess.run([sys.executable, "-m", "builder.cli", "profiles", "--dir", str(d)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stderr
    rows = dict(line.split(None, 1) for line in proc.stdout.splitlines())
    assert rows["good"].startswith("qcow2")
    assert rows["fifo"] == "ERROR profiles/fifo.yaml: profile: is a FIFO, expected a YAML file"
    assert rows["bomb"].startswith("ERROR profiles/bomb.yaml:7: yaml: more than 20000 values")
    assert "Traceback" not in proc.stderr
