"""GET /metrics: the agent's Prometheus metrics (hvagent.services.metrics) in the text
exposition format, for holders of Sys.Metrics on / (the MetricsReader role), and the
middleware that times every API request by its route template."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.routing import compile_path

from hvagent.access.privileges import Privilege as P
from hvagent.api.auth import require
from hvagent.api.routes import routes
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


class RouteTemplates:
    """The full path template of the route a request is for (`/api/v1/vms/{name}`),
    never the raw path: a label value per VM name would grow without bound. Also for
    requests that never reached their route (a 401 from the security middleware)."""

    def __init__(self, app: Any) -> None:
        self._by_route = {id(r): path for path, r in routes(app)}
        self._patterns = [(compile_path(path)[0], path) for path in self._by_route.values()]

    def __call__(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is not None and id(route) in self._by_route:
            return self._by_route[id(route)]
        for pattern, path in self._patterns:
            if pattern.match(scope["path"]):
                return path
        return UNMATCHED


class RequestTimer:
    """Pure ASGI middleware: observes each HTTP request's duration, by method, route
    template and status, into the app's metrics (401s included: it runs outermost)."""

    def __init__(self, app: Any, metrics: AgentMetrics) -> None:
        self.app = app
        self.histogram = metrics.ops.http_duration
        self._templates: RouteTemplates | None = None

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
            if self._templates is None:  # the routes are all there by the first request
                self._templates = RouteTemplates(scope["app"])
            route = self._templates(scope)
            self.histogram.labels(method=scope["method"], route=route,
                                  status=str(status[0])).observe(time.perf_counter() - start)
