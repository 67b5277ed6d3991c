"""`hvctl audit [--since WHEN] [--limit N]`: the agent's audit log (needs Sys.Audit)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import time
from typing import Any

from hvagent.cli.hvctl.client import Agent
from hvagent.errors import InvalidRequest

_AGO = re.compile(r"^(\d+)\s*([smhdw])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def add_parsers(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    a = top.add_parser("audit", help="the agent's audit log (mutations and denials)")
    a.add_argument("--since", metavar="WHEN",
                   help="only newer entries: 30m, 2h, 1d (ago), an ISO time or unix seconds")
    a.add_argument("--limit", type=int, default=1000, help="at most N entries (newest)")
    a.set_defaults(func=audit)


def parse_since(value: str, now: float | None = None) -> float:
    v = value.strip()
    m = _AGO.match(v.lower())
    if m:
        return (now or time.time()) - int(m.group(1)) * _SECONDS[m.group(2)]
    try:
        return float(v)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(v)
    except ValueError as e:
        raise InvalidRequest(f"--since {value}: not a time (examples: 30m, 2h, "
                             "2026-01-31T12:00, 1767182400)") from e
    return when.timestamp()


def audit(args: argparse.Namespace, agent: Agent) -> None:
    params: dict[str, Any] = {"limit": args.limit}
    if args.since:
        params["since"] = parse_since(args.since)
    entries = agent.get("/audit", params=params)
    if args.json:
        print(json.dumps(entries, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    rows = [(dt.datetime.fromtimestamp(e["time"]).isoformat(timespec="seconds"),
             e["principal"], e["result"], str(e["status"]), e["action"], e["target"],
             e["detail"]) for e in entries]
    if not console.is_terminal:  # plain lines for pipes and logs: one entry per line
        for row in rows:
            print("  ".join(row).rstrip())
        return
    t = Table(box=None)
    for col in ("TIME", "PRINCIPAL", "RESULT", "STATUS", "ACTION", "TARGET", "DETAIL"):
        t.add_column(col, no_wrap=col != "DETAIL")
    for row in rows:
        t.add_row(*row)
    console.print(t)
