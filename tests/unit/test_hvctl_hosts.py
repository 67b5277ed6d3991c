"""The fleet hosts file as hvctl reads it: every kind of wrong entry is one line on
stderr naming the file and the field, exit status 2, no traceback; a right one picks the
agent `--host` (or the file's `default`) names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from hvagent.cli.hvctl import hosts
from hvagent.cli.hvctl.main import main

REPO = Path(__file__).resolve().parents[2]
FP = ":".join(["AB"] * 32)


def hvctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """hvctl's real entry point in this process: (exit status, stdout, stderr)."""
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def write(tmp_path: Path, data: Any) -> Path:
    f = tmp_path / "hosts.yaml"
    f.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return f


def remote(name: str = "alpha", **extra: Any) -> dict[str, Any]:
    return {"name": name, "url": "https://127.0.0.1:1", "ca_fingerprint": FP, **extra}


def one_error(code: int, err: str, *parts: str) -> str:
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("hvctl: ") and "Traceback" not in err
    for p in parts:
        assert p in lines[0], lines[0]
    return lines[0]


# (file content, the field the error must name, a word of the reason)
BAD_FILES: list[tuple[str, Any, str, str]] = [
    ("not-yaml", "hosts: [name: a\n", "line ", "not valid YAML"),
    ("not-a-mapping", "- a\n- b\n", ": must be a mapping", "hosts"),
    ("unknown-top-key", {"hosts": [], "contexts": []}, "contexts:", "unknown key"),
    ("no-hosts", {"default": "a"}, "hosts:", "missing"),
    ("hosts-not-a-list", {"hosts": {"name": "a"}}, "hosts:", "list"),
    ("entry-not-a-mapping", {"hosts": ["alpha"]}, "hosts[0]:", "mapping"),
    ("unknown-host-key", {"hosts": [remote(insecure="yes")]}, "hosts[0].insecure:",
     "unknown key"),
    ("missing-name", {"hosts": [{"socket": "/x.sock"}]}, "hosts[0].name:", "missing"),
    ("bad-name", {"hosts": [{"name": "-a b", "socket": "/x.sock"}]}, "hosts[0].name:",
     "not a host name"),
    ("long-name", {"hosts": [{"name": "a" * 64, "socket": "/x.sock"}]}, "hosts[0].name:",
     "not a host name"),
    ("name-not-a-string", {"hosts": [{"name": 7, "socket": "/x.sock"}]}, "hosts[0].name:",
     "string"),
    ("empty-value", {"hosts": [{"name": "a", "socket": " "}]}, "hosts[0].socket:", "empty"),
    ("duplicate-names", {"hosts": [remote(), {"name": "alpha", "socket": "/x.sock"}]},
     "hosts[1].name:", "already"),
    ("url-and-socket", {"hosts": [remote(socket="/x.sock")]}, "hosts[0].url:", "not both"),
    ("neither-url-nor-socket", {"hosts": [{"name": "a"}]}, "hosts[0].url:", "missing"),
    ("http-url", {"hosts": [remote(url="http://127.0.0.1:8443")]}, "hosts[0].url:",
     "https"),
    ("url-without-host", {"hosts": [remote(url="https://:8443")]}, "hosts[0].url:",
     "no host"),
    ("url-with-path", {"hosts": [remote(url="https://h:8443/api")]}, "hosts[0].url:",
     "only https://HOST"),
    ("url-bad-port", {"hosts": [remote(url="https://h:99999")]}, "hosts[0].url:",
     "Port out of range"),
    ("no-fingerprint", {"hosts": [{"name": "a", "url": "https://h:1"}]},
     "hosts[0].ca_fingerprint:", "missing"),
    ("bad-fingerprint", {"hosts": [remote(ca_fingerprint="AB:CD")]},
     "hosts[0].ca_fingerprint:", "sha256"),
    ("fingerprint-not-hex", {"hosts": [remote(ca_fingerprint="ZZ" * 32)]},
     "hosts[0].ca_fingerprint:", "sha256"),
    ("fingerprint-as-number", "hosts:\n- name: a\n  url: https://h:1\n  ca_fingerprint: 12:34\n",
     "hosts[0].ca_fingerprint:", "string"),
    ("fingerprint-with-socket", {"hosts": [{"name": "a", "socket": "/x", "ca_fingerprint": FP}]},
     "hosts[0].ca_fingerprint:", "only with url"),
    ("token-and-token-file", {"hosts": [remote(token="hvt_x", token_file="t")]},
     "hosts[0].token_file:", "not both"),
    ("token-with-space", {"hosts": [remote(token="hvt_x y")]}, "hosts[0].token:",
     "one token"),
    ("token-not-ascii", {"hosts": [remote(token="hvt_\u00e9")]}, "hosts[0].token:",
     "one token"),
    ("token-file-missing", {"hosts": [remote(token_file="absent.token")]},
     "hosts[0].token_file:", "unreadable"),
    ("token-file-a-directory", {"hosts": [remote(token_file=".")]},
     "hosts[0].token_file:", "unreadable"),
    ("token-file-two-lines", {"hosts": [remote(token_file="two.token")]},
     "hosts[0].token_file:", "one token"),
    ("token-file-empty", {"hosts": [remote(token_file="empty.token")]},
     "hosts[0].token_file:", "one token"),
    ("default-not-a-host", {"default": "beta", "hosts": [remote()]}, "default:",
     "not a host"),
    ("default-not-a-string", {"default": ["alpha"], "hosts": [remote()]}, "default:",
     "host name"),
]


@pytest.mark.parametrize("content,field,reason", [b[1:] for b in BAD_FILES],
                         ids=[b[0] for b in BAD_FILES])
@pytest.mark.parametrize("how", ["--host", "--all-hosts", "default"])
def test_a_bad_hosts_file_is_one_line_naming_file_and_field(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        content: Any, field: str, reason: str, how: str) -> None:
    (tmp_path / "two.token").write_text("hvt_a\nhvt_b\n")
    (tmp_path / "empty.token").write_text("\n")
    f = write(tmp_path, content)
    monkeypatch.setenv("HVCTL_CONFIG_DIR", str(tmp_path))
    # by --hosts-file, or found in $HVCTL_CONFIG_DIR without any option
    argv = {"--host": ["--hosts-file", str(f), "--host", "alpha"],
            "--all-hosts": ["--all-hosts"], "default": []}[how]
    code, out, err = hvctl(capsys, *argv, "vm", "list")
    one_error(code, err, f"{f}: ", field, reason)
    assert out == ""


def test_the_file_the_host_and_the_command_line_are_checked(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = write(tmp_path, {"hosts": [remote(), {"name": "beta", "socket": "b.sock"}]})
    missing = tmp_path / "nothing.yaml"
    cases = [
        (["--hosts-file", str(missing), "--host", "alpha", "vm", "list"],
         (str(missing), "no hosts file")),
        (["--hosts-file", str(missing), "--all-hosts", "vm", "list"],
         (str(missing), "no hosts file")),
        (["--hosts-file", str(f), "--host", "gamma", "vm", "list"],
         ("--host gamma", "no such host", "alpha, beta")),
        (["--hosts-file", str(f), "--all-hosts", "vm", "show", "x"],
         ("--all-hosts", "vm list, host info and checkpoint list")),
        (["--hosts-file", str(f), "--all-hosts", "checkpoint", "create", "x"],
         ("--all-hosts", "only")),
        (["--hosts-file", str(f), "--all-hosts", "--token", "t", "vm", "list"],
         ("--token", "not with --all-hosts")),
        (["--hosts-file", str(f), "--host", "alpha", "--ca-fingerprint", FP, "vm", "list"],
         ("--ca-fingerprint", "alpha", str(f))),
        (["--hosts-file", str(f), "--socket", "/x.sock", "vm", "list"],
         ("--hosts-file", "--socket")),
    ]
    for argv, parts in cases:
        code, out, err = hvctl(capsys, *argv)
        one_error(code, err, *parts)
        assert out == ""


def test_host_with_socket_or_url_is_refused_by_the_parser(
        capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--host", "a", "--socket", "/x"], ["--host", "a", "--url", "https://h:1"],
                 ["--all-hosts", "--host", "a"], ["--all-hosts", "--socket", "/x"]):
        code, _, err = hvctl(capsys, *argv, "vm", "list")
        assert code == 2 and "not allowed with argument" in err and "Traceback" not in err


def test_host_and_default_pick_the_agent(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """No agent runs: the error names the socket hvctl went to, so it shows the pick.
    A relative socket is relative to the hosts file's directory."""
    monkeypatch.setenv("HVCTL_CONFIG_DIR", str(tmp_path))
    write(tmp_path, {"default": "beta", "hosts": [
        {"name": "alpha", "socket": "/nonexistent/a.sock"},
        {"name": "beta", "socket": "b.sock"}]})
    code, _, err = hvctl(capsys, "--host", "alpha", "vm", "list")
    one_error(code, err, "cannot reach the agent at /nonexistent/a.sock")
    code, _, err = hvctl(capsys, "vm", "list")
    one_error(code, err, f"cannot reach the agent at {tmp_path / 'b.sock'}")
    # --socket still wins over the file's default
    code, _, err = hvctl(capsys, "--socket", "/nonexistent/c.sock", "vm", "list")
    one_error(code, err, "cannot reach the agent at /nonexistent/c.sock")


def test_without_a_default_the_local_socket_is_used(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from hvagent.cli.hvctl.client import default_socket

    monkeypatch.setenv("HVCTL_CONFIG_DIR", str(tmp_path))
    for content in (None, {"hosts": [{"name": "alpha", "socket": "/nonexistent/a.sock"}]}):
        if content is not None:
            write(tmp_path, content)
        code, _, err = hvctl(capsys, "vm", "list")
        if default_socket().exists():
            pytest.skip(f"an agent answers on {default_socket()} here")
        one_error(code, err, f"cannot reach the agent at {default_socket()}")


def test_fingerprint_forms_and_token_file_are_read(tmp_path: Path) -> None:
    sub = tmp_path / "tokens"
    sub.mkdir()
    (sub / "b.token").write_text("hvt_from_file\n")
    hexfp = "ab" * 32
    f = write(tmp_path, {"default": "a", "hosts": [
        remote("a", ca_fingerprint=hexfp, token="hvt_inline"),
        remote("b", ca_fingerprint=f"SHA256:{hexfp.upper()}", token_file="tokens/b.token"),
        remote("c", ca_fingerprint=FP)]})
    fleet = hosts.load(f)
    assert fleet.default == "a"
    assert [h.ca_fingerprint for h in fleet.hosts] == [FP, FP, FP]
    assert [h.token for h in fleet.hosts] == ["hvt_inline", "hvt_from_file", None]


def test_the_real_command_prints_one_line(tmp_path: Path) -> None:
    f = write(tmp_path, {"hosts": [remote(url="http://127.0.0.1:1")]})
    r = subprocess.run([sys.executable, "-m", "hvagent.cli.hvctl", "--hosts-file", str(f),
                        "--all-hosts", "vm", "list"], capture_output=True, text=True,
                       timeout=60, cwd=REPO, env={**os.environ, "HVCTL_CONFIG_DIR": str(tmp_path)})
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        f"hvctl: {f}: hosts[0].url: 'http://127.0.0.1:1': the agent's TCP listener speaks "
        "only https://"]


def test_help_documents_the_exit_codes() -> None:
    r = subprocess.run([sys.executable, "-m", "hvagent.cli.hvctl", "--help"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    text = " ".join(r.stdout.split())
    assert r.returncode == 0
    assert "exit status: 0 success" in text and "3 with --all-hosts: some hosts answered" in text
