"""GET /metrics: the agent's Prometheus metrics (hvagent.services.metrics) in the text
exposition format, for holders of Sys.Metrics on / (the MetricsReader role), and the
middleware that times every API request by its route template."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.routing import Match

from hvagent.access.privileges import Privilege as P
from hvagent.api.auth import require
from hvagent.services.metrics import AgentMetrics

router = APIRouter(tags=["metrics"])

# The route label of requests no route matched: one value, whatever the path was.
UNMATCHED = "unmatched"


@router.get("/metrics", response_class=Response,
            dependencies=[Depends(require(P.SYS_METRICS, "/"))],
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}},
                             "description": "Prometheus text format"}})
async def metrics(request: Request) -> Response:
    """Per-VM series (`hvagent_domain_*`, label `domain`), VMs and jobs by state, API
    latency, checkpoint and hot-add durations, the agent process."""
    agent_metrics: AgentMetrics = request.app.state.metrics
    return Response(await agent_metrics.render(), media_type=CONTENT_TYPE_LATEST)


Scope = MutableMapping[str, Any]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def route_template(scope: Scope) -> str:
    """The path template of the route that served the request (`/api/v1/vms/{name}`),
    never the raw path: a label value per VM name would grow without bound."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    app = scope.get("app")
    for r in getattr(getattr(app, "router", None), "routes", ()):
        match, _ = r.matches(scope)
        if match is Match.FULL:
            return str(getattr(r, "path", UNMATCHED))
    return UNMATCHED


class RequestTimer:
    """Pure ASGI middleware: observes each HTTP request's duration, by method, route
    template and status, into the app's metrics (401s included: it runs outermost)."""

    def __init__(self, app: Any, metrics: AgentMetrics) -> None:
        self.app = app
        self.histogram = metrics.ops.http_duration

    async def __call__(self, scope: Scope, receive: Any, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_status(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.histogram.labels(method=scope["method"], route=route_template(scope),
                                  status=str(status[0])).observe(time.perf_counter() - start)
