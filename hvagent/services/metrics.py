"""The agent's Prometheus metrics: the metric objects the services observe (request
latency, checkpoint and hot-add durations, scrape errors), and the per-VM and host
series collected at scrape time, in one CollectorRegistry per app (never the global
default registry: one process may run several apps).

Per-VM series carry `domain="<vm name>"` and follow the names of libvirt's exporter
(`libvirt_domain_*` -> `hvagent_domain_*`), so existing dashboards translate. The VM
state is the one last observed (QMP events keep it current); a scrape asks each running
VM's QMP monitor for its block counters, bounded per VM, and a VM that does not answer
in time only loses its block series for that scrape (counted in
`hvagent_scrape_errors_total`). The API layer only renders `AgentMetrics.render()`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from hvagent.drivers import net
from hvagent.drivers.machine import BlockStats, process_cpu_seconds
from hvagent.drivers.net import tap_name
from hvagent.errors import HVError
from hvagent.spec import ACTIVE_STATES, VMSpec, VMState
from hvagent.store import Store
from hvagent.store.jobs import JobStatus

if TYPE_CHECKING:
    from hvagent.services.vms import VMService

log = logging.getLogger(__name__)

# How long one VM's QMP monitor may take to answer a scrape's query.
VM_QUERY_TIMEOUT = 2.0
# libvirt's virDomainState numbers, which dashboards built on libvirt's exporter use.
STATE_CODES: dict[VMState, int] = {
    VMState.RUNNING: 1,
    VMState.PAUSED: 3,
    VMState.DEFINED: 5,
    VMState.STOPPED: 5,
    VMState.CRASHED: 6,
    VMState.UNRESPONSIVE: 0,
}
STATE_HELP = ("VM state, libvirt's numbers: 0 no state (QEMU runs but its QMP monitor does "
              "not answer), 1 running, 3 paused, 5 shut off (defined or stopped), 6 crashed")
# Seconds: QMP answers in milliseconds, a guest sees a device in about a second, a
# checkpoint of a large VM takes minutes.
HOTADD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
CHECKPOINT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class OperationMetrics:
    """What the services and the HTTP layer observe as it happens."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.http_duration = Histogram(
            "hvagent_http_request_duration_seconds",
            "API requests by method, route template (not the raw path) and status",
            ["method", "route", "status"], registry=registry)
        self.checkpoint_duration = Histogram(
            "hvagent_checkpoint_duration_seconds",
            "Checkpoint jobs from start to end, by operation (create, revert, delete)",
            ["operation"], registry=registry, buckets=CHECKPOINT_BUCKETS)
        self.hotadd_duration = Histogram(
            "hvagent_hotadd_duration_seconds",
            "Hot-adds to running VMs until QEMU has the device, by device (vcpu, memory, "
            "disk, nic)", ["device"], registry=registry, buckets=HOTADD_BUCKETS)
        self.scrape_errors = Counter(
            "hvagent_scrape_errors",
            "Scrapes in which a VM's QMP monitor did not answer in time or failed (its "
            "block series were left out)", ["domain"], registry=registry)


@dataclass
class DomainSample:
    """One VM as a scrape saw it."""

    name: str
    state: VMState
    spec: VMSpec
    cpu_seconds: float | None = None
    blocks: dict[str, BlockStats] = field(default_factory=dict)
    taps: dict[str, dict[str, int]] = field(default_factory=dict)


class AgentMetrics:
    """The app's registry: the process collector, the operation metrics and the
    per-VM/host series (once `bind` has the services)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.ops = OperationMetrics(self.registry)
        self._store: Store | None = None
        self._vms: VMService | None = None

    def bind(self, vms: VMService) -> None:
        """Collect the VMs and jobs of `vms` from now on."""
        self._store, self._vms = vms.store, vms

    async def render(self) -> bytes:
        """The Prometheus text exposition of everything, sampled now. Scrapes run side
        by side, each with its own sample (no lock: behind a stuck VM's deadline,
        scrapes arriving faster than it would queue up without end)."""
        samples = await self._sample()
        series = CollectorRegistry(auto_describe=False)
        series.register(_Series(samples, self._store))
        return generate_latest(self.registry) + generate_latest(series)

    async def _sample(self) -> list[DomainSample]:
        if self._store is None or self._vms is None:
            return []
        out = []
        for row in self._store.list_vms():
            try:
                spec = VMSpec.model_validate_json(row.spec)
            except ValueError:
                continue  # a row this version cannot read: no series rather than no scrape
            s = DomainSample(row.name, VMState(row.state), spec)
            if s.state in ACTIVE_STATES:
                s.cpu_seconds = process_cpu_seconds(row.pid)
                for n in spec.nics:
                    if n.tapped:
                        tap = tap_name(n.mac)
                        counters = net.tap_counters(tap)
                        if counters is not None:
                            s.taps[tap] = counters
            out.append(s)
        await asyncio.gather(*(self._block_stats(s) for s in out
                               if s.state in ACTIVE_STATES))
        return out

    async def _block_stats(self, s: DomainSample) -> None:
        assert self._vms is not None
        m = self._vms.attached(s.name)
        if m is None or not m.connected:
            return
        try:
            s.blocks = await asyncio.wait_for(m.block_stats(VM_QUERY_TIMEOUT),
                                              VM_QUERY_TIMEOUT)
        except (TimeoutError, HVError) as e:
            log.warning("%s: metrics: no block stats: %s", s.name, e)
            self.ops.scrape_errors.labels(domain=s.name).inc()


class _Series(Collector):
    """One scrape's per-VM and host series."""

    def __init__(self, samples: list[DomainSample], store: Store | None) -> None:
        self.samples = samples
        self.store = store

    def describe(self) -> Iterable[Metric]:
        return []  # collected only at scrape time, never at registration

    def collect(self) -> Iterator[Metric]:
        samples = self.samples
        yield from _domain_series(samples)
        by_state = Tally(s.state for s in samples)
        vms = GaugeMetricFamily("hvagent_vms", "VMs defined on this host, by state",
                                labels=["state"])
        for state in VMState:
            vms.add_metric([str(state)], by_state.get(state, 0))
        yield vms
        store = self.store
        if store is not None:
            by_status = Tally(j.status for j in store.jobs.list())
            jobs = GaugeMetricFamily("hvagent_jobs", "Jobs known to the agent, by state "
                                     "(running now; succeeded and failed since kept)",
                                     labels=["state"])
            for status in JobStatus:
                jobs.add_metric([str(status)], by_status.get(status, 0))
            yield jobs


def _domain_series(samples: list[DomainSample]) -> Iterator[Metric]:
    d = ["domain"]
    vcpus = GaugeMetricFamily("hvagent_domain_info_virtual_cpus",
                              "vCPUs of the VM (boot and hot-added)", labels=d)
    maxmem = GaugeMetricFamily("hvagent_domain_info_maximum_memory_bytes",
                               "Memory the VM may grow to", labels=d)
    mem = GaugeMetricFamily("hvagent_domain_info_memory_usage_bytes",
                            "Memory the VM has now (boot memory and hot-added DIMMs)",
                            labels=d)
    cpu = CounterMetricFamily("hvagent_domain_info_cpu_time_seconds",
                              "CPU time of the VM's QEMU process (user + system)", labels=d)
    state = GaugeMetricFamily("hvagent_domain_state_code", STATE_HELP, labels=d)
    b = ["domain", "target_device"]
    block = {k: CounterMetricFamily(f"hvagent_domain_block_stats_{k}", text, labels=b)
             for k, text in (
                 ("read_bytes", "Bytes the guest read from the disk"),
                 ("write_bytes", "Bytes the guest wrote to the disk"),
                 ("read_requests", "Read requests of the guest to the disk"),
                 ("write_requests", "Write requests of the guest to the disk"))}
    # The guest's point of view, as libvirt reports it: what the tap transmits, the guest
    # receives. NICs on QEMU's user-mode network have no tap and no series.
    nic = {k: (CounterMetricFamily(
        f"hvagent_domain_interface_stats_{k}",
        f"{text} (from the host tap's counters; user-mode NICs have none)", labels=b), src)
        for k, text, src in (
            ("receive_bytes", "Bytes the guest received on the NIC", "tx_bytes"),
            ("transmit_bytes", "Bytes the guest sent on the NIC", "rx_bytes"),
            ("receive_packets", "Packets the guest received on the NIC", "tx_packets"),
            ("transmit_packets", "Packets the guest sent on the NIC", "rx_packets"))}
    for s in samples:
        label = [s.name]
        vcpus.add_metric(label, s.spec.vcpus)
        mem.add_metric(label, s.spec.memory_mib << 20)
        maxmem.add_metric(label, (s.spec.max_memory_mib or s.spec.memory_mib) << 20)
        state.add_metric(label, STATE_CODES[s.state])
        if s.cpu_seconds is not None:
            cpu.add_metric(label, s.cpu_seconds)
        for dev, st in sorted(s.blocks.items()):
            block["read_bytes"].add_metric([s.name, dev], st.read_bytes)
            block["write_bytes"].add_metric([s.name, dev], st.write_bytes)
            block["read_requests"].add_metric([s.name, dev], st.read_requests)
            block["write_requests"].add_metric([s.name, dev], st.write_requests)
        for tap, counters in sorted(s.taps.items()):
            for family, src in nic.values():
                family.add_metric([s.name, tap], counters[src])
    yield from (vcpus, maxmem, mem, cpu, state, *block.values(),
                *(family for family, _ in nic.values()))

