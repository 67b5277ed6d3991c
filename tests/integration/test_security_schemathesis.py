"""schemathesis against the live agent's /openapi.json over HTTPS, with every check
(`--checks all`) and every phase (examples, coverage, fuzzing, stateful), once as an
Administrator and once as a VMCreator: no 5xx, every answer declared and matching its
schema and media type, 405s with `Allow`, schema-valid requests not refused for rules
the schema does not state (schemathesis_hooks.py says precisely what is allowed).

Every operation runs, the ones that start QEMU too: the host policy caps each VM at one
vCPU and 256 MiB, and without a kernel or disk a generated VM only runs its firmware, so
the guests cost little; the fixture ends whatever the run left. Examples per operation
are capped (and the run has a time budget) so both roles together take about three
minutes on a 2-core machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from secure_agent import SecureAgent

pytestmark = pytest.mark.integration

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
HOOKS = Path(__file__).with_name("schemathesis_hooks.py")
POLICY = {"quotas": {"max_vcpus_per_vm": 1, "max_memory_mib_per_vm": 256,
                     "max_memory_mib_per_host": 1024}}
# 400, 404 and 409 need state the schema cannot know; 422 only for cross-field rules
# (checked by the hook). 5xx stays a failure (not_a_server_error).
CONFIG = """
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "422", "429"]
"""


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[SecureAgent]:
    a = SecureAgent(tmp_path, POLICY)
    a.start()
    try:
        yield a
    finally:
        a.stop()
        # Nothing it made may keep running (matched by this agent's run dir only).
        marker = f"unix:{tmp_path / 'run'}/".encode()
        for d in Path("/proc").iterdir():
            try:
                if d.name.isdigit() and marker in (d / "cmdline").read_bytes():
                    os.kill(int(d.name), signal.SIGKILL)
            except OSError:
                pass


@pytest.mark.parametrize("role", ["Administrator", "VMCreator"])
def test_schemathesis_finds_no_contract_failure(agent: SecureAgent, role: str) -> None:
    token = agent.token(f"fuzz-{role.lower()}", role)["token"]
    config = agent.root / "schemathesis.toml"
    config.write_text(CONFIG)
    r = subprocess.run(
        [str(SCHEMATHESIS), "--config-file", str(config), "run", f"{agent.url}/openapi.json",
         "--header", f"Authorization: Bearer {token}",
         "--tls-verify", str(agent.ca_pem),
         "--checks", "all", "--phases", "examples,coverage,fuzzing,stateful",
         "--max-examples", "4", "--seed", "20261126", "--workers", "1",
         "--max-time", "75", "--request-timeout", "60",
         # A schema-valid policy push replaces POLICY, whose quotas keep the generated
         # guests cheap; PUT /api/v1/policy's contract is test_policy_api.py's.
         "--exclude-name", "PUT /api/v1/policy"],
        capture_output=True, text=True, timeout=600, cwd=agent.root,
        env={**os.environ, "SCHEMATHESIS_HOOKS": HOOKS.stem,
             "PYTHONPATH": os.pathsep.join([str(HOOKS.parent),
                                            os.environ.get("PYTHONPATH", "")])})
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-2000:]
    assert "Tested:" in r.stdout  # it really ran operations
    assert "schema_valid_data_breaks_only_cross_field_rules" not in r.stderr  # hook loaded
