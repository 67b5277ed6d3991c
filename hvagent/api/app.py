"""The FastAPI application: wires config -> store -> jobs -> services at startup and
detaches (never stops) the VMs at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from hvagent.access.policy import load_policy
from hvagent.access.principal import ROOT
from hvagent.access.privileges import ADMINISTRATOR
from hvagent.access.security import Security
from hvagent.api import audit, auth, errors, listeners, metrics, redfish, v1
from hvagent.config import AgentConfig, agent_version
from hvagent.host.persistence import state_persistence
from hvagent.services.checkpoints import CheckpointService
from hvagent.services.devices import DeviceService
from hvagent.services.jobs import Jobs
from hvagent.services.media import MediaService
from hvagent.services.metrics import AgentMetrics
from hvagent.services.vms import VMService
from hvagent.store import Store

log = logging.getLogger(__name__)


def bootstrap_token(security: Security, sha256: str) -> None:
    """The host config's Administrator token (by its hash), made on the first start that
    has it and audited then; later starts find it and change nothing."""
    info = security.tokens.bootstrap(sha256, security.policy)
    if info is None:
        return
    detail = f"token {info.id} for {info.principal}: {info.comment}; granted " \
             f"{ADMINISTRATOR} on /"
    security.audit.record(principal=ROOT, action="hvagent bootstrap token",
                          privilege=None, target="/", result="ok", status=201,
                          detail=detail)


def create_app(config: AgentConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        config.make_dirs()
        store = Store(config.database)
        jobs = Jobs(store)
        vms = VMService(config, store, jobs)
        app.state.security = security = Security(store, policy)
        vms.admission = security.admission()
        if config.bootstrap_token_sha256:
            bootstrap_token(security, config.bootstrap_token_sha256)
        # Once, at start: where the open database is (a disk mounted over state_dir
        # later would not move it).
        app.state.persistence = persistence = state_persistence(config.state_dir)
        for warning in persistence.warnings:
            log.warning("%s (%s)", warning, persistence.reason)
        # Before startup: they listen to QMP events and recover interrupted work.
        app.state.devices = DeviceService(vms, agent_metrics.ops)
        app.state.checkpoints = CheckpointService(vms, agent_metrics.ops)
        app.state.media = MediaService(vms)
        agent_metrics.bind(vms)
        app.state.disks = vms.disks
        # The accelerator probe (cached per host boot) runs while the agent serves.
        vms.begin_accel_probe()
        await vms.startup()
        app.state.store, app.state.jobs, app.state.vms = store, jobs, vms
        try:
            yield
        finally:
            # Bounded: the VMs keep running whatever happens here (a stuck QMP close).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(vms.shutdown(), listeners.SHUTDOWN_GRACE)
            store.close()

    policy = load_policy(config.policy)  # a bad policy file stops the agent before it serves
    app = FastAPI(title="hvagent", version=agent_version(), lifespan=lifespan,
                  description="Child VM (partition) management of a corehost host.")
    # One registry per app (not the process's default): several apps may share a process.
    app.state.metrics = agent_metrics = AgentMetrics()
    errors.install(app)
    app.include_router(v1.router)
    app.include_router(redfish.router)
    app.include_router(metrics.router)
    app.include_router(audit.router, prefix="/api/v1")
    listeners.add_ca_route(app, config)
    auth.install(app)  # last: it checks every route declares a privilege
    # Outermost: times every request, those the security middleware refuses too.
    app.add_middleware(metrics.RequestTimer, metrics=agent_metrics)
    errors.declare(app)  # the error statuses of every operation, in the OpenAPI document
    return app
