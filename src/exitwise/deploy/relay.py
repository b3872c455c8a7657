"""A relay: a tier that holds no stages (the planner's empty tier; `exitwise serve --relay`). Before the first tier
with stages it carries the images on; between two, the features. It runs no model and answers nothing itself:
every request goes to the next tier unchanged and its answer comes back unchanged. Its own endpoints: health and
/metrics."""
from __future__ import annotations

import asyncio
import http.client
from concurrent.futures import ThreadPoolExecutor

from fastapi import Request
from fastapi.responses import JSONResponse

from ..config import check_url
from ..errors import first_line
from .connections import KeptConnections
from .oip import BadRequest, read_body

RELAY_THREADS = 16  # requests a relay passes on at once (each waits for its answer on its own connection)
_PASSED_HEADERS = ("content-type", "inference-header-content-length", "retry-after")


def _relay_once(connections: KeptConnections, method: str, path: str, body: bytes,
                headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
    """One request to the next tier: (status, body, the headers passed back)."""
    status, data, response = connections.request(method, path, body if method != "GET" else None, headers)
    return status, data, {h: v for h in _PASSED_HEADERS if (v := response.getheader(h)) is not None}


def create_relay_app(relay, max_body_bytes: int):
    """The app of a relay tier (`relay`: a `RelayConfig`). When the next tier cannot be reached or answers
    nothing it can read: 502 `{"error": ...}`; when it does not answer within `relay.timeout_ms`: 504. A relay
    has no exit to fall back on (the tiers before it degrade by themselves when it fails)."""
    from fastapi import FastAPI
    from fastapi.responses import Response
    from prometheus_client import CollectorRegistry, Counter, generate_latest
    from starlette.exceptions import HTTPException as StarletteHTTPException
    url = check_url(relay.next_url)
    registry = CollectorRegistry()
    relayed = Counter("exitwise_relayed_requests", "Requests passed to the next tier, by its status", ["code"],
                      registry=registry)
    relayed_bytes = Counter("exitwise_relayed_bytes", "Request bytes passed to the next tier", registry=registry)
    failed = Counter("exitwise_relay_failures", "Requests the relay answered itself (the next tier failed), by "
                     "reason (unreachable, timeout)", ["reason"], registry=registry)
    pool = ThreadPoolExecutor(RELAY_THREADS, thread_name_prefix="exitwise-relay")
    connections = KeptConnections(url, relay.timeout_ms / 1e3, relay.next_tls)

    async def lifespan(app):
        yield
        pool.shutdown(wait=False)  # its threads end (uvicorn has answered every request: none is still relaying)

    app = FastAPI(title="exitwise relay", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):  # its own 404/405: one-line JSON as a tier's
        return JSONResponse({"error": " ".join(str(e.detail).split())}, status_code=e.status_code)

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        return {"ready": True}

    @app.get("/metrics")
    async def scrape():
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def forward(path: str, request: Request):
        try:  # a chunked body too, as it arrives (it was read whole, however long, then passed on)
            body = await read_body(request.receive, request.headers.get("content-length"), max_body_bytes,
                                   relay.timeout_ms / 1e3, "--forward-timeout-ms")
        except BadRequest as e:
            return JSONResponse({"error": e.message}, status_code=e.status)
        # the path as it came (percent-encoded): decoded, a %20 or a non-ASCII one failed in http.client (a 502
        # blamed on the next tier, a 500) and a %2F went on as a /
        raw = request.scope.get("raw_path") or request.url.path.encode()
        query = request.scope.get("query_string", b"")
        target = url.prefix + (raw + b"?" + query if query else raw).decode("latin-1")
        if not target.isascii():
            return JSONResponse({"error": "the request's path is not ASCII (percent-encode it)"}, status_code=400)
        headers = {h: v for h in _PASSED_HEADERS if (v := request.headers.get(h)) is not None}
        try:
            status, data, back = await asyncio.get_running_loop().run_in_executor(
                pool, _relay_once, connections, request.method, target, body, headers)
        except TimeoutError:
            failed.labels(reason="timeout").inc()
            return JSONResponse({"error": f"relay {relay.name}: the next tier {relay.next_url} did not answer within "
                                          f"{relay.timeout_ms:g} ms"}, status_code=504)
        except (OSError, http.client.HTTPException) as e:
            failed.labels(reason="unreachable").inc()
            why = first_line(e, 160)
            return JSONResponse({"error": f"relay {relay.name}: the next tier {relay.next_url} failed ({why})"},
                                status_code=502)
        relayed.labels(code=str(status)).inc()
        relayed_bytes.inc(len(body))
        return Response(data, status_code=status, headers=back)

    return app
