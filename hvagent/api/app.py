"""The FastAPI application: wires config -> store -> jobs -> services at startup and
detaches (never stops) the VMs at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from hvagent.access.policy import load_policy
from hvagent.access.security import Security
from hvagent.api import audit, auth, errors, listeners, v1
from hvagent.config import AgentConfig, agent_version
from hvagent.services.checkpoints import CheckpointService
from hvagent.services.devices import DeviceService
from hvagent.services.jobs import Jobs
from hvagent.services.vms import VMService
from hvagent.store import Store


def create_app(config: AgentConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        config.make_dirs()
        store = Store(config.database)
        jobs = Jobs(store)
        vms = VMService(config, store, jobs)
        app.state.security = security = Security(store, policy)
        vms.admission = security.admission()
        # Before startup: they listen to QMP events and recover interrupted work.
        app.state.devices = DeviceService(vms)
        app.state.checkpoints = CheckpointService(vms)
        app.state.disks = vms.disks
        # Probe the accelerator once before serving (cached per host boot).
        await asyncio.to_thread(lambda: vms.accel)
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
    errors.install(app)
    app.include_router(v1.router)
    app.include_router(audit.router, prefix="/api/v1")
    listeners.add_ca_route(app, config)
    auth.install(app)  # last: it checks every route declares a privilege
    errors.declare(app)  # the error statuses of every operation, in the OpenAPI document
    return app
