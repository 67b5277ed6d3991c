"""`hvagent token create|list|revoke`: API tokens, managed on the host (as root) directly
in the agent's database; the running agent sees a change on its next request."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from hvagent.access.policy import AclEntry, load_policy
from hvagent.access.tokens import TokenInfo, Tokens, parse_duration
from hvagent.config import AgentConfig, load_config
from hvagent.errors import InvalidRequest
from hvagent.store import Store


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    t = sub.add_parser("token", help="API tokens (create, list, revoke)")
    t.add_argument("--config", type=Path, default=None,
                   help="configuration file (default /etc/hvagent/hvagent.yaml if present)")
    t.add_argument("--json", action="store_true", help="print JSON for scripts")
    ts = t.add_subparsers(dest="token_command", required=True)
    c = ts.add_parser("create", help="create a token (printed once)")
    c.add_argument("principal", help="who the token acts as, e.g. alice")
    c.add_argument("--role", help="also grant this role to the principal (ACL entry)")
    c.add_argument("--path", default="/", help="ACL path of the grant (default /)")
    c.add_argument("--no-propagate", action="store_true",
                   help="the grant does not cover paths below --path")
    c.add_argument("--expires", default=None,
                   help="lifetime, e.g. 90d, 12h, never (default: token_ttl of the config)")
    c.add_argument("--comment", default="")
    c.set_defaults(func=_create)
    ts.add_parser("list", help="list tokens (never their secrets)").set_defaults(func=_list)
    r = ts.add_parser("revoke", help="revoke a token; effective on the next request")
    r.add_argument("id")
    r.set_defaults(func=_revoke)


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    try:
        return dt.datetime.fromtimestamp(t).isoformat(timespec="seconds")
    except (ValueError, OverflowError, OSError):  # a row no date can show (older agents)
        return f"@{t:.0f}"


def _grant(args: argparse.Namespace) -> AclEntry:
    """The ACL entry of --role/--path, or one line saying which argument is wrong."""
    try:
        return AclEntry(path=args.path, principal=args.principal, role=args.role,
                        propagate=not args.no_propagate)
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "path"
        if field == "path":
            shown = repr(args.path) if len(args.path) <= 80 else (
                f"{args.path[:40]!r}... ({len(args.path)} characters)")
            raise InvalidRequest(
                f"--path: {shown} is not a canonical ACL path (/ or /vms/NAME: "
                "absolute, no empty, . or .. parts, no trailing /)") from e
        raise InvalidRequest(f"{field}: {err['msg'].removeprefix('Value error, ')}") from e


def _as_dict(t: TokenInfo) -> dict[str, object]:
    return {"id": t.id, "principal": t.principal, "comment": t.comment,
            "created_at": t.created_at, "expires_at": t.expires_at,
            "revoked_at": t.revoked_at, "status": str(t.status())}


def run(args: argparse.Namespace) -> int:
    """Raises HVError on bad input (the caller prints it and exits 2)."""
    config = load_config(args.config)
    try:
        config.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidRequest(f"state_dir: {config.state_dir}: cannot create: "
                             f"{e.strerror or e}") from e
    store = Store(config.database)
    try:
        args.func(args, config, Tokens(store))
    finally:
        store.close()
    return 0


def _create(args: argparse.Namespace, config: AgentConfig, tokens: Tokens) -> None:
    if args.expires is not None:
        ttl = parse_duration(args.expires, "--expires")
    else:
        ttl = parse_duration(config.token_ttl, "token_ttl")
    grant = None
    if args.role:
        policy = load_policy(config.policy)
        grant = _grant(args)
        if policy.role(grant.role) is None:
            raise InvalidRequest(f"--role: unknown role {args.role!r}")
    info, secret = tokens.create(args.principal, ttl, args.comment)
    if grant is not None:
        tokens.grant(grant, policy)
    if args.json:
        print(json.dumps({**_as_dict(info), "token": secret}, indent=2))
    else:
        print(secret)
        print(f"token {info.id} for {info.principal}, expires {_when(info.expires_at)}"
              + (f"; granted {args.role} on {args.path}" if grant else "")
              + " (the token is shown only now)", file=sys.stderr)


def _list(args: argparse.Namespace, config: AgentConfig, tokens: Tokens) -> None:
    infos = tokens.list_tokens()
    if args.json:
        print(json.dumps([_as_dict(t) for t in infos], indent=2))
        return
    # rich only here: `hvagent serve` imports this module and never prints tables
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None)
    for col in ("ID", "PRINCIPAL", "STATUS", "CREATED", "EXPIRES", "COMMENT"):
        table.add_column(col)
    for t in infos:
        table.add_row(t.id, t.principal, str(t.status()), _when(t.created_at),
                      _when(t.expires_at), t.comment)
    Console().print(table)


def _revoke(args: argparse.Namespace, config: AgentConfig, tokens: Tokens) -> None:
    info = tokens.revoke(args.id)
    if args.json:
        print(json.dumps(_as_dict(info), indent=2))
    else:
        print(f"token {info.id} ({info.principal}): revoked")
