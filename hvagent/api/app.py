"""The FastAPI application: wires config -> store -> jobs -> services at startup and
detaches (never stops) the VMs at shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from hvagent.api import errors, v1
from hvagent.config import AgentConfig, agent_version
from hvagent.jobs import Jobs
from hvagent.store import Store
from hvagent.vm.service import VMService


def create_app(config: AgentConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        config.make_dirs()
        store = Store(config.database)
        jobs = Jobs(store)
        vms = VMService(config, store, jobs)
        # Probe the accelerator once before serving (cached per host boot).
        await asyncio.to_thread(lambda: vms.accel)
        await vms.startup()
        app.state.store, app.state.jobs, app.state.vms = store, jobs, vms
        try:
            yield
        finally:
            await vms.shutdown()
            store.close()

    app = FastAPI(title="hvagent", version=agent_version(), lifespan=lifespan,
                  description="Child VM (partition) management of a corehost host.")
    errors.install(app)
    app.include_router(v1.router)
    return app
