"""The partition agent is installed, configured from the profile, enabled and running."""

from __future__ import annotations

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


def test_agent_commands_on_path(host: Host) -> None:
    for tool in ("hvagent", "hvctl", "hvdisk"):
        assert host.run(f"{tool} --help").rc == 0, tool
    assert host.group("hvagent").exists
