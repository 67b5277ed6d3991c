"""`hvctl`: the command line over the agent's REST API (local unix socket by default,
`--url` for a remote agent). Tables for people, `--json` for scripts; on failure one
line on stderr and exit status 2.

    main.py         the command tree and the one dispatch (set_defaults(func=...))
    client.py       the agent: socket or URL, token, one request, errors as one line
    pinning.py      TLS trust in remote agents (pinned CA per URL)
    output.py       --json or the human view
    vms.py devices.py disks.py checkpoints.py audit.py   one module per command group
"""

from hvagent.cli.hvctl.main import main

__all__ = ["main"]
