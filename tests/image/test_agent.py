"""The partition agent is installed, configured from the profile, enabled and running."""

from __future__ import annotations

import json
import shlex

import pytest
import yaml
from testinfra.host import Host


@pytest.mark.smoke
def test_hvagent_enabled_and_active(host: Host) -> None:
    agent = host.service("hvagent")
    assert agent.is_enabled
    assert agent.is_running


def test_agent_config_rendered(host: Host) -> None:
    cfg = yaml.safe_load(host.file("/etc/hvagent/hvagent.yaml").content_string)
    assert set(cfg) == {"listen", "state_dir", "storage_dir", "run_dir", "log_dir", "accel"}
    assert host.socket(f"unix://{cfg['listen']}").is_listening
    for key in ("state_dir", "storage_dir", "log_dir"):
        d = host.file(cfg[key])
        assert d.is_directory and d.group == "hvagent"


def test_the_default_nat_network_is_up(host: Host) -> None:
    """The image's `default` network (a drop-in of the agent's configuration): its
    bridge has the host's address, its dnsmasq runs, its guests are masqueraded, and the
    kernel's bridges can filter VLANs (the Debian kernel has it)."""
    net = json.loads(host.check_output("hvctl --json net show default"))
    assert (net["kind"], net["address"], net["declared"]) == ("nat", "192.168.122.1/24", True)
    assert net["dhcp_server"] == "running" and net["error"] is None, net
    assert net["vlan_filtering"] == "available", net
    assert "192.168.122.1" in host.interface(net["bridge"]).addresses
    rules = host.check_output("nft list table ip hvagent")
    assert "masquerade" in rules and net["bridge"] in rules, rules


def test_agent_commands_on_path(host: Host) -> None:
    for tool in ("hvagent", "hvctl", "hvdisk"):
        assert host.run(f"{tool} --help").rc == 0, tool
    assert host.group("hvagent").exists


# Run by the agent's own interpreter (httpx is in its venv), as root on its socket.
PUSH_POLICY = """
import sys, httpx
c = httpx.Client(transport=httpx.HTTPTransport(uds=sys.argv[1]),
                 base_url="http://hvagent/api/v1", timeout=60)
before = c.get("/policy").json()["text"]
pushed = c.put("/policy", json={"text": before + "\\n# pushed by the image test\\n"})
after = open(sys.argv[2]).read()
restored = c.put("/policy", json={"text": before})
print(pushed.status_code, restored.status_code, "# pushed by the image test" in after)
"""


def test_the_agent_may_replace_its_policy_file_inside_its_sandbox(host: Host) -> None:
    # ProtectSystem=strict leaves /etc read-only to the agent unless its unit says
    # otherwise: PUT /api/v1/policy must still rename the new file into place.
    cfg = yaml.safe_load(host.file("/etc/hvagent/hvagent.yaml").content_string)
    policy = cfg.get("policy", "/etc/hvagent/policy.yaml")
    r = host.run(f"/opt/hvagent/bin/python -c {shlex.quote(PUSH_POLICY)} "
                 f"{shlex.quote(cfg['listen'])} {shlex.quote(policy)}")
    assert r.rc == 0, r.stderr
    assert r.stdout.split() == ["200", "200", "True"], r.stdout


@pytest.mark.smoke
def test_the_redfish_service_answers(host: Host) -> None:
    """The booted host serves Redfish next to the REST API: the service root, and the
    host itself as a ComputerSystem that hosts virtual machines."""
    cfg = yaml.safe_load(host.file("/etc/hvagent/hvagent.yaml").content_string)
    sock = shlex.quote(cfg["listen"])

    def get(path: str) -> dict[str, object]:
        # The agent's own Python and httpx (the image has no curl).
        script = ("import httpx,sys; t=httpx.HTTPTransport(uds=sys.argv[1]); "
                  "r=httpx.Client(transport=t, timeout=20).get('http://hvagent'+sys.argv[2]); "
                  "r.raise_for_status(); print(r.text)")
        out = host.check_output(f"/opt/hvagent/bin/python -c {shlex.quote(script)} {sock} "
                                f"{shlex.quote(path)}")
        return json.loads(out)  # type: ignore[no-any-return]

    root = get("/redfish/v1")
    assert root["@odata.type"] == "#ServiceRoot.v1_20_0.ServiceRoot", root
    system = get("/redfish/v1/Systems/_host")
    assert system["HostingRoles"] == ["VirtualMachineServer"], system
    assert system["PowerState"] == "On"
