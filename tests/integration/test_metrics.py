"""The agent's /metrics as operators use it: a real Prometheus server (Debian's
/usr/bin/prometheus) scrapes a real agent over HTTPS, trusting only the agent's own CA
and sending a MetricsReader token made with the real `hvagent token` command, while a
tiny guest runs under TCG; the test asks Prometheus's own query API for the series.
Also: who may read /metrics, the latency histogram's route label, and the Grafana
dashboard's queries against what the agent really exports."""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tinyguest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from secure_agent import REPO, SecureAgent, free_port

from hvagent.services.metrics import VM_QUERY_TIMEOUT

pytestmark = pytest.mark.integration

PROMETHEUS = "/usr/bin/prometheus"
DASHBOARD = REPO / "contrib" / "grafana" / "hvagent.json"
VM = "m1"
BOOT_TIMEOUT = 180


class Prometheus:
    """A Prometheus server on 127.0.0.1 with its TSDB in a temporary directory."""

    def __init__(self, root: Path, scrape: dict[str, Any]) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = root / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "scrape_configs": [scrape]}))
        self.log = root / "prometheus.log"
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={root / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=self.url, timeout=30)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log.read_text()}")
            try:
                if self.http.get("/-/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"prometheus not ready in 60 s: {self.log.read_text()}")

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = self.http.get("/api/v1/query", params={"query": expr})
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (expr, r.text)
        return body["data"]["result"]  # type: ignore[no-any-return]

    def value(self, expr: str) -> float | None:
        """The single value of `expr` now, None while it has no sample."""
        result = self.query(expr)
        assert len(result) <= 1, (expr, result)
        return float(result[0]["value"][1]) if result else None

    def wait_value(self, expr: str, ok: Any, timeout: float = 60) -> float:
        deadline = time.monotonic() + timeout
        v = None
        while time.monotonic() < deadline:
            v = self.value(expr)
            if v is not None and ok(v):
                return v
            time.sleep(0.5)
        raise AssertionError(f"{expr}: last value {v} in {timeout}s; targets: "
                             f"{self.http.get('/api/v1/targets').text}")

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory,
          tiny_guest: tinyguest.TinyGuest) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("metrics")
    (root / "agent").mkdir()
    a = SecureAgent(root / "agent")
    a.start()
    prom: Prometheus | None = None
    try:
        # The CA the agent serves at /ca.pem (what a Prometheus operator would fetch).
        # Its server certificate names 127.0.0.1 as an IP SAN (hvagent.api.tls), so
        # Prometheus checks the host name of the target address as it is.
        trust = ssl.create_default_context(cafile=str(a.ca_pem))
        ca = httpx.get(a.url + "/ca.pem", verify=trust, timeout=30).text
        assert "BEGIN CERTIFICATE" in ca
        (root / "ca.pem").write_text(ca)
        token = a.token("prometheus", "MetricsReader")["token"]
        (root / "token").write_text(token)
        prom = Prometheus(root, {
            "job_name": "hvagent", "scheme": "https", "metrics_path": "/metrics",
            "static_configs": [{"targets": [f"127.0.0.1:{a.port}"]}],
            "tls_config": {"ca_file": str(root / "ca.pem")},
            "authorization": {"type": "Bearer", "credentials_file": str(root / "token")}})
        body = {"name": VM, "vcpus": 1, "max_vcpus": 2, "memory_mib": 256,
                "kernel": str(tiny_guest.kernel), "initrd": str(tiny_guest.initrd),
                # tiny_disk_log: the guest writes a block to its disk every 0.5 s (and
                # reads each new 4 KiB page of it first).
                "append": tiny_guest.append() + " tiny_disk_log",
                "disks": [{"size": "16M", "format": "raw"}]}
        r = a.root_client.post("/vms", json=body)
        assert r.status_code == 201, r.text
        r = a.root_client.post(f"/vms/{VM}/start")
        assert r.status_code == 200, r.text
        _wait_console(a, tinyguest.BOOT_MARKER)
        yield {"agent": a, "prom": prom, "root": root, "token": token}
    finally:
        if prom is not None:
            prom.stop()
        try:
            a.root_client.post(f"/vms/{VM}/stop", json={"force": True})
        except httpx.HTTPError:
            pass
        a.stop()


def _wait_console(a: SecureAgent, text: str) -> None:
    deadline = time.monotonic() + BOOT_TIMEOUT
    out = ""
    while time.monotonic() < deadline:
        r = a.root_client.get(f"/vms/{VM}/console", params={"lines": 100000})
        out = r.json()["text"]
        if text in out:
            return
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not on the console in {BOOT_TIMEOUT}s:\n{out}")


def _scrape(a: SecureAgent) -> str:
    """/metrics as root over the unix socket (no token: peer credentials)."""
    r = a.root_client.get("http://hvagent/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return r.text


def test_prometheus_scrapes_the_agent_over_https_with_a_token(setup: dict[str, Any]) -> None:
    prom: Prometheus = setup["prom"]
    a: SecureAgent = setup["agent"]
    prom.wait_value('up{job="hvagent"}', lambda v: v == 1)
    d = f'{{job="hvagent",domain="{VM}"}}'
    spec = a.root_client.get(f"/vms/{VM}").json()["spec"]
    assert prom.wait_value(f"hvagent_domain_info_virtual_cpus{d}",
                           lambda v: True) == spec["vcpus"] == 1
    assert prom.value(f"hvagent_domain_info_memory_usage_bytes{d}") == 256 << 20
    assert prom.value(f"hvagent_domain_info_maximum_memory_bytes{d}") == 256 << 20
    assert prom.value(f"hvagent_domain_state_code{d}") == 1  # libvirt's "running"
    assert prom.value('hvagent_vms{job="hvagent",state="running"}') == 1
    # A guest under TCG burns CPU: its QEMU's CPU time only grows.
    cpu1 = prom.wait_value(f"hvagent_domain_info_cpu_time_seconds_total{d}", lambda v: v > 0)
    prom.wait_value(f"hvagent_domain_info_cpu_time_seconds_total{d}", lambda v: v > cpu1)

    # The guest keeps writing its disk (tiny_disk_log) and reads each new page it
    # writes into: both counters of disk0 grow between scrapes.
    disk = f'{{job="hvagent",domain="{VM}",target_device="disk0"}}'
    for name in ("read_bytes", "write_bytes", "read_requests", "write_requests"):
        first = prom.wait_value(f"hvagent_domain_block_stats_{name}_total{disk}",
                                lambda v: v > 0)
        prom.wait_value(f"hvagent_domain_block_stats_{name}_total{disk}",
                        lambda v, first=first: v > first)

    # A vCPU hot-add: the gauge follows the spec, the hot-add histogram has it.
    r = a.root_client.put(f"/vms/{VM}/vcpus", json={"vcpus": 2})
    assert r.status_code == 200, r.text
    assert a.root_client.get(f"/vms/{VM}").json()["spec"]["vcpus"] == 2
    prom.wait_value(f"hvagent_domain_info_virtual_cpus{d}", lambda v: v == 2)
    assert prom.wait_value('hvagent_hotadd_duration_seconds_count{device="vcpu"}',
                           lambda v: True) == 1

    # A checkpoint job: its duration is observed once, and the jobs gauge counts it.
    r = a.root_client.post(f"/vms/{VM}/checkpoints", json={"name": "c1"})
    assert r.status_code == 202, r.text
    job = r.json()
    deadline = time.monotonic() + BOOT_TIMEOUT
    while job["status"] == "running":
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
        job = a.root_client.get(f"/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job
    assert prom.wait_value('hvagent_checkpoint_duration_seconds_count{operation="create"}',
                           lambda v: True) == 1
    prom.wait_value('hvagent_jobs{job="hvagent",state="succeeded"}', lambda v: v == 1)


def test_metrics_need_sys_metrics(setup: dict[str, Any]) -> None:
    a: SecureAgent = setup["agent"]
    metrics = a.url + "/metrics"
    with a.client() as anonymous:
        r = anonymous.get(metrics)
    assert r.status_code == 401, r.text
    assert r.headers["content-type"] == "application/problem+json"
    creator = a.token("metrics-creator", "VMCreator")["token"]
    with a.client(creator) as c:
        r = c.get(metrics)
    assert r.status_code == 403, r.text
    assert "Sys.Metrics" in r.json()["detail"]
    # MetricsReader reads the metrics and nothing else.
    with a.client(setup["token"]) as c:
        assert c.get(metrics).status_code == 200
        assert c.get("/vms").status_code == 403
    with a.client(a.token("metrics-auditor", "Auditor")["token"]) as c:
        assert c.get(metrics).status_code == 200


def _samples(text: str, name: str) -> list[Any]:
    return [s for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == name]


def test_request_latency_is_labelled_by_route_template(setup: dict[str, Any]) -> None:
    a: SecureAgent = setup["agent"]
    for _ in range(3):
        assert a.root_client.get(f"/vms/{VM}").status_code == 200
    assert a.root_client.get("/vms/no-such-vm-xyz").status_code == 404
    counts = _samples(_scrape(a), "hvagent_http_request_duration_seconds_count")
    routes = {s.labels["route"] for s in counts}
    assert not any(VM in r or "no-such-vm" in r for r in routes), routes
    by_status = {s.labels["status"]: s.value for s in counts
                 if s.labels["route"] == "/api/v1/vms/{name}" and s.labels["method"] == "GET"}
    assert by_status.get("200", 0) >= 3 and by_status.get("404", 0) >= 1, (by_status, routes)
    # Refused before reaching the route (401): still the template.
    with a.client() as anonymous:
        assert anonymous.get(f"/vms/{VM}").status_code == 401
    # Unknown paths share one label value whatever they are.
    assert a.root_client.get("http://hvagent/nothing/here/42").status_code == 404
    counts = _samples(_scrape(a), "hvagent_http_request_duration_seconds_count")
    routes = {s.labels["route"] for s in counts}
    assert "unmatched" in routes and not any("nothing" in r for r in routes), routes
    assert any(s.labels["route"] == "/api/v1/vms/{name}" and s.labels["status"] == "401"
               for s in counts), routes


# the Grafana dashboard

METRIC_RE = re.compile(r"\b(hvagent_[a-z0-9_]+|process_[a-z0-9_]+|up)\b")
SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    panels = list(dashboard["panels"])
    for p in list(panels):
        panels += p.get("panels", [])  # rows
    return [t["expr"] for p in panels for t in p.get("targets", []) if t.get("expr")]


def test_dashboard_queries_only_metrics_the_agent_exports(setup: dict[str, Any]) -> None:
    a: SecureAgent = setup["agent"]
    prom: Prometheus = setup["prom"]
    dash = json.loads(DASHBOARD.read_text())
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert "instance" in variables
    assert variables["instance"]["datasource"]["uid"] == "${DS_PROMETHEUS}"
    exprs = _exprs(dash)
    assert len(exprs) >= 8
    families = list(text_string_to_metric_families(_scrape(a)))
    exported = {f.name for f in families} | {s.name for f in families for s in f.samples}
    exported.add("up")  # Prometheus's own series of every target
    used = {m for e in exprs for m in METRIC_RE.findall(e)}
    unknown = {m for m in used if m not in exported and not any(
        m.endswith(sfx) and m.removesuffix(sfx) in exported for sfx in SUFFIXES)}
    assert not unknown, f"dashboard uses metrics the agent does not export: {unknown}"
    for wanted in ("hvagent_vms", "hvagent_domain_info_cpu_time_seconds_total",
                   "hvagent_http_request_duration_seconds_bucket",
                   "hvagent_checkpoint_duration_seconds_bucket",
                   "hvagent_hotadd_duration_seconds_bucket"):
        assert wanted in used, wanted
    # Every query is valid PromQL for the real server, with Grafana's variables filled.
    for e in exprs:
        concrete = (e.replace("$__rate_interval", "1m").replace("$__interval", "1m")
                    .replace("$instance", ".*").replace("$domain", ".*"))
        prom.query(concrete)


# Last in this module: it freezes the VM's QEMU for a moment.


def test_a_vm_whose_monitor_is_stuck_does_not_stall_the_scrape(
        setup: dict[str, Any]) -> None:
    a: SecureAgent = setup["agent"]
    pid = a.root_client.get(f"/vms/{VM}").json()["pid"]
    errors = f'hvagent_scrape_errors_total{{domain="{VM}"}}'
    before = _value(_scrape(a), "hvagent_scrape_errors_total", VM) or 0
    os.kill(pid, signal.SIGSTOP)  # QEMU reads nothing from its QMP socket any more
    try:
        # A client that gives up well before the agent's own QMP deadline would pass:
        # the per-VM bound is what keeps the scrape short.
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(a.socket)),
                          timeout=3 * VM_QUERY_TIMEOUT) as c:
            r = c.get("http://hvagent/metrics")
        assert r.status_code == 200, r.text
        text = r.text
    finally:
        os.kill(pid, signal.SIGCONT)
    # (Prometheus's own scrapes meanwhile count too.)
    assert (_value(text, "hvagent_scrape_errors_total", VM) or 0) > before, errors
    assert _value(text, "hvagent_domain_info_virtual_cpus", VM) is not None
    assert not [s for f in text_string_to_metric_families(text) for s in f.samples
                if s.name.startswith("hvagent_domain_block_stats_")
                and s.labels.get("domain") == VM]
    # The monitor answers again: the block series are back.
    assert _value(_scrape(a), "hvagent_domain_block_stats_read_bytes_total", VM)


def _value(text: str, name: str, domain: str) -> float | None:
    found = [s.value for s in _samples(text, name) if s.labels.get("domain") == domain]
    return found[0] if found else None


# NICs on taps, against an agent in a network namespace of its own (its bridge and tap
# never touch the host's network).


class NetnsAgent(SecureAgent):
    def __init__(self, root: Path, netns: str) -> None:
        super().__init__(root)
        self.netns = netns
        self.wrapper = ("ip", "netns", "exec", netns)

    def tap_counters(self, tap: str) -> dict[str, int]:
        """The tap's kernel counters, read inside the agent's namespace."""
        out = subprocess.run(
            ["ip", "netns", "exec", self.netns, "sh", "-c",
             f"cd /sys/class/net/{tap}/statistics && "
             "echo $(cat rx_bytes rx_packets tx_bytes tx_packets)"],
            capture_output=True, text=True, check=True, timeout=60).stdout.split()
        return dict(zip(("rx_bytes", "rx_packets", "tx_bytes", "tx_packets"),
                        map(int, out), strict=True))


@pytest.fixture(scope="module")
def tap_vm(tmp_path_factory: pytest.TempPathFactory,
           tiny_guest: tinyguest.TinyGuest) -> Iterator[tuple[NetnsAgent, str]]:
    netns = f"hvt-metrics-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True, timeout=60)
    try:
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True,
                       timeout=60)
        root = tmp_path_factory.mktemp("metrics-tap")
        a = NetnsAgent(root, netns)
        a.start()
        mac = "52:54:00:0a:0d:01"
        try:
            # It pings an address nobody has: the guest sends ARP requests and hardly
            # receives anything, so sent and received differ.
            r = a.root_client.post("/vms", json={
                "name": VM, "memory_mib": 256, "kernel": str(tiny_guest.kernel),
                "initrd": str(tiny_guest.initrd), "nics": [{"vlan": 10, "mac": mac}],
                "append": tiny_guest.append(ip="10.0.10.1/24", ping=("10.0.10.99",))})
            assert r.status_code == 201, r.text
            assert a.root_client.post(f"/vms/{VM}/start").status_code == 200
            _wait_console(a, "TINY-PING peer=10.0.10.99")
            yield a, "hv" + mac.replace(":", "")
        finally:
            a.root_client.post(f"/vms/{VM}/stop", json={"force": True})
            a.stop()
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False, timeout=60)


def test_tap_nic_counters_are_the_guests_point_of_view(
        tap_vm: tuple[NetnsAgent, str]) -> None:
    a, tap = tap_vm
    deadline = time.monotonic() + BOOT_TIMEOUT
    while True:  # until the guest has clearly sent more than it received
        c = a.tap_counters(tap)
        if c["rx_packets"] > c["tx_packets"] + 3 and c["rx_bytes"] > c["tx_bytes"] + 100:
            break
        assert time.monotonic() < deadline, c
        time.sleep(0.5)
    before = a.tap_counters(tap)
    text = _scrape(a)
    after = a.tap_counters(tap)

    def metric(name: str) -> float:
        found = [s.value for s in _samples(text, f"hvagent_domain_interface_stats_{name}")
                 if s.labels == {"domain": VM, "target_device": tap}]
        assert len(found) == 1, (name, text)
        return found[0]

    # What the tap receives, the guest sent; what the tap transmits, the guest received.
    for guest, host in (("transmit_packets_total", "rx_packets"),
                        ("transmit_bytes_total", "rx_bytes"),
                        ("receive_packets_total", "tx_packets"),
                        ("receive_bytes_total", "tx_bytes")):
        assert before[host] <= metric(guest) <= after[host], (guest, before, after)
