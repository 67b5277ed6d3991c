"""A Redfish client of a SecureAgent for the Redfish tests: HTTPS trusting only the
agent's CA, a session login (POST Sessions -> X-Auth-Token), and the tiny guest's serial
console read through the agent's REST API as root."""

from __future__ import annotations

import ssl
import time
from typing import Any

import httpx
from secure_agent import SecureAgent

ROOT = "/redfish/v1"


def https(agent: SecureAgent, **headers: str) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=str(agent.ca_pem))
    return httpx.Client(base_url=agent.url, verify=ctx, headers=headers, timeout=120)


def login(agent: SecureAgent, user: str, token: str) -> tuple[httpx.Client, str]:
    """(a client sending the new session's X-Auth-Token, the session's URL)."""
    with https(agent) as c:
        r = c.post(f"{ROOT}/SessionService/Sessions",
                   json={"UserName": user, "Password": token})
    assert r.status_code == 201, r.text
    return https(agent, **{"X-Auth-Token": r.headers["X-Auth-Token"]}), r.headers["Location"]


def message_id(r: httpx.Response) -> str:
    """The Base registry message of a Redfish error answer."""
    body = r.json()
    return str(body["error"]["@Message.ExtendedInfo"][0]["MessageId"])


def console(agent: SecureAgent, vm: str) -> str:
    r = agent.root_client.get(f"/vms/{vm}/console", params={"lines": 100000})
    assert r.status_code == 200, r.text
    return str(r.json()["text"])


def wait_console(agent: SecureAgent, vm: str, text: str, after: int = 0,
                 timeout: float = 180) -> str:
    """The console once `text` appears past its first `after` characters."""
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        out = console(agent, vm)
        if text in out[after:]:
            return out
        time.sleep(0.3)
    raise AssertionError(f"{vm}: {text!r} not on the console (after {after} chars) in "
                         f"{timeout}s:\n{out[-3000:]}")


def power_state(client: httpx.Client, vm: str) -> str:
    r = client.get(f"{ROOT}/Systems/{vm}")
    assert r.status_code == 200, r.text
    return str(r.json()["PowerState"])


def wait_power(client: httpx.Client, vm: str, want: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = power_state(client, vm)
        if state == want:
            return
        time.sleep(0.3)
    raise AssertionError(f"{vm}: PowerState {state}, not {want}, after {timeout}s")


def create_vm(agent: SecureAgent, **spec: Any) -> dict[str, Any]:
    r = agent.root_client.post("/vms", json=spec)
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]
