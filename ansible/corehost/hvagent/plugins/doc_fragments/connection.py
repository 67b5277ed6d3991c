"""The connection options every corehost.hvagent module takes (which agent, as whom)."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  host:
    description:
      - Name of the agent in the hosts file (the file hvctl reads).
      - Without O(host), O(url) and O(socket), the hosts file's C(default) host is used.
      - Mutually exclusive with O(url) and O(socket).
    type: str
  hosts_file:
    description:
      - The fleet hosts file.
      - Default C($HVCTL_CONFIG_DIR/hosts.yaml), else C(~/.config/hvctl/hosts.yaml).
    type: path
  url:
    description:
      - The agent's HTTPS listener, C(https://HOST:PORT), instead of a host of the hosts file.
      - Needs O(ca_fingerprint).
    type: str
  ca_fingerprint:
    description:
      - sha256 fingerprint of the agent's own CA, as the agent logs it at start
        (C(AB:CD:...); also accepted without colons or with a C(SHA256:) prefix).
      - The module fetches C(/ca.pem) once, checks it against this pin and then trusts
        only that CA (no host name check).
    type: str
  token:
    description:
      - API token (C(hvt_...)), sent as a bearer token. Overrides the hosts file's.
      - Mutually exclusive with O(token_file).
    type: str
  token_file:
    description:
      - File holding the API token.
    type: path
  socket:
    description:
      - The agent's local unix socket instead of a URL (root on the socket needs no token).
    type: path
  timeout:
    description:
      - Seconds to wait for one API answer (long operations wait longer on their own).
    type: float
    default: 60
"""
