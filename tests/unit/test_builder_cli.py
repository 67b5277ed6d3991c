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
                          capture_output=True, text=True, cwd=tmp_path)
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
