"""`--all-hosts`: one read-only command's request sent to every host of the hosts file at
once (a thread per host, each bounded by HOST_TIMEOUT), and the answers shown as one
table with a HOST column first, or as a JSON list for scripts. A host that is out of
reach or answers an error is a row with its error; the others are shown as usual.

Exit status: 0 every host answered, 3 (PARTIAL) some did, 2 none did."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from hvagent.cli.hvctl import pinning
from hvagent.cli.hvctl.hosts import Fleet, Host
from hvagent.errors import HVError, InvalidRequest

HOST_TIMEOUT = 10.0  # seconds, to connect and for the answer, per host
MAX_THREADS = 32
OK, NONE, PARTIAL = 0, 2, 3
EXIT_CODES_HELP = ("exit status: 0 success; 2 an error (with --all-hosts: no host answered);"
                   " 3 with --all-hosts: some hosts answered and some did not (their rows "
                   "show the error)")


@dataclass(frozen=True)
class FleetView:
    """How a command runs over the fleet: the GET path for its arguments, the table's
    columns after HOST, and one host's answer as rows of those columns."""

    path: Callable[[argparse.Namespace], str]
    columns: tuple[str, ...]
    rows: Callable[[Any], list[list[str]]]


@dataclass(frozen=True)
class Answer:
    host: str
    result: Any = None
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        if self.error is None:
            return {"host": self.host, "ok": True, "result": self.result}
        return {"host": self.host, "ok": False, "error": self.error}


def ask(host: Host, path: str, token: str | None = None) -> Answer:
    """GET `path` from one host; an error of any kind becomes the answer's one line."""
    import httpx

    try:
        agent = host.agent(token)
        if host.url is not None:
            pinning.ssl_context(host.url, host.ca_fingerprint)  # its file is locked
        return Answer(host.name, result=agent.get(path, timeout=HOST_TIMEOUT))
    except HVError as e:
        return Answer(host.name, error=_one_line(e.message))
    except (httpx.HTTPError, OSError, ValueError) as e:  # e.g. a 200 that is not JSON
        return Answer(host.name, error=_one_line(f"{type(e).__name__}: {e}"))


def ask_all(fleet: Fleet, path: str, token: str | None) -> list[Answer]:
    """Every host's answer, in the order of the hosts file."""
    if not fleet.hosts:
        raise InvalidRequest(f"--all-hosts: {fleet.path} names no hosts")
    with ThreadPoolExecutor(max_workers=min(MAX_THREADS, len(fleet.hosts))) as pool:
        return list(pool.map(lambda h: ask(h, path, token), fleet.hosts))


def run(args: argparse.Namespace, view: FleetView, fleet: Fleet) -> int:
    """Run the command on every host, print the answers, return the exit status."""
    answers = ask_all(fleet, view.path(args), None)
    if args.json:
        print(json.dumps([a.as_json() for a in answers], indent=2))
    else:
        _table(view, answers)
    failed = [a for a in answers if a.error is not None]
    if not failed:
        return OK
    names = ", ".join(a.host for a in failed)
    if len(failed) == len(answers):
        print(f"hvctl: no host answered ({names})", file=sys.stderr)
        return NONE
    print(f"hvctl: {len(failed)} of {len(answers)} hosts did not answer ({names})",
          file=sys.stderr)
    return PARTIAL


def _table(view: FleetView, answers: list[Answer]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    with_errors = any(a.error is not None for a in answers)
    t = Table(box=None)
    t.add_column("HOST", no_wrap=True)
    for col in view.columns:
        t.add_column(col)
    if with_errors:
        t.add_column("ERROR", overflow="fold")
    blank = ["-"] * len(view.columns)
    for a in answers:
        if a.error is not None:
            t.add_row(escape(a.host), *blank, escape(a.error), style="red")
            continue
        # A host that answered with nothing still shows that it answered.
        rows = view.rows(a.result) or [["(none)", *[""] * (len(view.columns) - 1)]]
        for row in rows:
            t.add_row(escape(a.host), *(escape(c) for c in row), *([""] if with_errors else []))
    Console().print(t)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())
