"""The HTTP server: a FastAPI app over one `Scheduler`, run by uvicorn (`exitwise serve`; `pip install 'exitwise[serve]'`).

Endpoints: the Open Inference Protocol (`exitwise.deploy.oip`) under /v2, `POST /v1/predict` (image files: a raw
body or multipart, several at once) and `GET /metrics` (Prometheus). Decoding runs on the event loop, inference
on the scheduler's worker threads (`--workers`), so the server accepts while it computes. Every refusal is a
4xx/5xx with a one-line JSON body `{"error": "..."}`; SIGTERM (or Ctrl-C) stops accepting, answers what was
accepted, then exits 0.
"""
from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import signal
import threading
import time
from typing import Sequence

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import ServeConfig, ServerTLS, __version__
from ..errors import UserError, first_line
from .metrics import Metrics
from .oip import (REASONS, BadRequest, answered, check_model, decode_images, infer_response, model_metadata, not_taken,
                  parse_infer, predictions, read_body, request_timeout_ms, requested_outputs)
from .answers import Answers
from .runner import Runner, describe
from .scheduler import Answer, FailureLog, QueueFull, Scheduler, TooLarge
from .tiers import CarryImages, Forwarder, TierAnswer, add_tier_routes

HEAD_BYTES = 64 * 1024  # a request's line and headers at most (431 past it)
DRAIN_GRACE_S = 5.0  # a drain waits for the last answers this long beyond a request's deadline
MAX_PARTS = 4096     # files (and fields) in one multipart /v1/predict body at most
BACKLOG = 2048       # connections the kernel holds for the server to accept
LINGER_S = 2.0  # after a refusal the connection's writing side is shut; it stays open for the client's bytes this long


def create_app(runner: Runner, config: ServeConfig = ServeConfig()) -> FastAPI:
    """The app, its scheduler started; the scheduler drains when the app shuts down (uvicorn's lifespan)."""
    metrics = Metrics()  # of all the processes where `serve --processes` started this one
    tier = config.tier
    forward = Forwarder(runner, tier, metrics) if tier is not None and tier.next_url else None
    scheduled = CarryImages(runner) if tier is not None and tier.send_images else runner
    scheduler = Scheduler(scheduled, config.scheduler, forward=forward, observer=metrics).start()
    metrics.watch(scheduler)
    metrics.serving(runner, scheduler)
    limit = config.max_body_bytes
    timeout = config.scheduler.timeout_ms / 1e3
    name, shape = runner.name, tuple(runner.input_shape)
    drain = []  # the gRPC server's stop, once begun (`begin_drain`: as SIGTERM arrives, before HTTP drains)

    def accepting() -> bool:
        return scheduler.accepting and not drain

    async def lifespan(app):
        grpc_server = None
        if config.grpc_port is not None:  # the Open Inference Protocol over gRPC too, on this event loop
            from . import oip_grpc
            try:
                grpc_server, app.state.grpc_port = await oip_grpc.start(
                    config.host, config.grpc_port, [oip_grpc.handler(
                        name, runner.platform, shape, runner.class_names, __version__, accepting, answer,
                        lambda reason: metrics.rejected.labels(reason=reason).inc(),
                        lambda status, start: app.front.observe("grpc", status, start)),
                        oip_grpc.health(accepting)],
                    limit, reuse_port=config.processes > 1, tls=config.tls)
            except OSError as e:  # the port taken since `serve` checked it: `run_app` stops and says so in one line
                app.state.startup_error = UserError(first_line(e))  # (raised here: uvicorn's traceback, exit 3)
            if grpc_server is not None and config.processes == 1:
                print(grpc_line(config, config.host, app.state.grpc_port), flush=True)

        def begin_drain() -> None:
            """The gRPC server refuses new calls and waits for those accepted (its health streams see the drain and
            end: oip_grpc.health), from SIGTERM on (`run_app`), while uvicorn still answers the HTTP requests in
            flight."""
            if not drain:
                drain.append(asyncio.ensure_future(grpc_server.stop(timeout + DRAIN_GRACE_S))
                             if grpc_server is not None else None)

        app.state.begin_drain = begin_drain
        yield
        begin_drain()
        # the scheduler refuses new samples at once and answers those inside, while the gRPC server drains
        closing = asyncio.get_running_loop().run_in_executor(None, scheduler.close, timeout + DRAIN_GRACE_S)
        if drain[0] is not None:
            await drain[0]
        await closing
        if forward is not None:  # its threads end (uvicorn has answered every request: none is still sending)
            forward.pool.shutdown(wait=False)

    app = _App(title="exitwise", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
               openapi_url=None)  # the protocol is the OIP's (docs/serve.md), not a generated schema
    app.state.scheduler, app.state.metrics, app.state.runner = scheduler, metrics, runner

    waiter = app.state.answers = Answers()  # where a request waits for its samples' answers

    async def answer(call: _Call, images: np.ndarray, timeout_ms: float | None = None) -> list[Answer]:
        """The images through the scheduler (`deploy.answers`), answered within `timeout_ms` where the request set a
        deadline sooner than --timeout-ms; a client that leaves has its samples cancelled (dropped downstream)."""
        if scheduler.first != 0:
            raise BadRequest(409, f"this tier starts at stage {scheduler.first}: send images to the first tier")
        within = config.scheduler.within_ms(timeout_ms)
        try:
            why, outcomes = await waiter.wait(lambda slots: scheduler.submit(images, slots, timeout_ms), len(images),
                                              within / 1e3, call.on_disconnect)
        except (QueueFull, TooLarge) as e:
            raise not_taken(e, f"{len(images)} images", config.scheduler.max_queue) from None
        outcomes = answered(why, outcomes, within)
        if tier is None:
            return outcomes
        return [a if isinstance(a, TierAnswer) else TierAnswer(a.exit, a.prediction, a.probability, tier.name)
                for a in outcomes]

    def refused(e: BadRequest) -> JSONResponse:
        metrics.rejected.labels(reason=REASONS.get(e.status, "bad_request")).inc()
        headers = {"Retry-After": "1"} if e.status == 503 else {"Allow": "POST"} if e.status == 405 else None
        return JSONResponse({"error": e.message}, status_code=e.status, headers=headers)

    async def on_refused(request: Request, e: BadRequest) -> JSONResponse:
        return refused(e)

    app.add_exception_handler(BadRequest, on_refused)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        metrics.rejected.labels(reason="bad_request").inc()
        return JSONResponse({"error": " ".join(str(e.detail).split())}, status_code=e.status_code)

    failures = FailureLog("a request")

    def failed(e: Exception) -> JSONResponse:
        failures(e)
        metrics.rejected.labels(reason="failed").inc()
        return JSONResponse({"error": " ".join(f"internal error: {type(e).__name__}: {e}".split())}, status_code=500)

    async def on_failed(request: Request, e: Exception) -> JSONResponse:
        return failed(e)

    app.add_exception_handler(Exception, on_failed)

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        ok = accepting()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2")
    async def server_metadata():
        return {"name": "exitwise", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/models/{model}")
    @app.get("/v2/models/{model}/versions/{version}")
    async def metadata(model: str, version: str = ""):
        check_model(name, model, version)
        return model_metadata(name, shape, runner.platform)

    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{version}/ready")
    async def model_ready(model: str, version: str = ""):
        check_model(name, model, version)
        ok = accepting()
        return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)

    # The two inference routes are answered by `_Front` itself, past FastAPI's routing, middlewares, request and
    # response objects, which cost more per request than the rest of the route (docs/serve.md, the server's overhead).
    async def infer(call: _Call, model: tuple[str, str]) -> dict:  # (name, version: "" where the path names none)
        check_model(name, *model)
        body = await call.body(limit, timeout)
        images, parsed = parse_infer(body, call.header("inference-header-content-length"), shape)
        requested_outputs(parsed)
        answers = await answer(call, images, request_timeout_ms(parsed.get("parameters")))
        return infer_response(name, parsed, answers, runner.class_names)

    async def predict(call: _Call, _model: None) -> dict:  # /v1/predict names no model
        body = await call.body(limit, timeout)
        blobs, names = await _files(call, body)
        answers = await answer(call, decode_images(blobs, shape, [n or f"#{i}" for i, n in enumerate(names)]))
        return {"model": name, "predictions": predictions(answers, runner.class_names, names)}

    app.front = _Front(super(_App, app).__call__, metrics, config.scheduler.max_queue,
                       {"infer": infer, "predict": predict}, refused, failed)

    if tier is not None:
        add_tier_routes(app, runner, tier, limit)

    @app.get("/metrics")
    async def scrape():
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


class _App(FastAPI):
    """FastAPI, with every HTTP request passing `front` first."""
    front: "_Front"

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            return await self.front(scope, receive, send)
        await super().__call__(scope, receive, send)


def _inference_route(scope) -> tuple[str, tuple[str, str] | None] | None:
    """("infer", (model, "")) for /v2/models/{model}/infer, ("infer", (model, version)) for
    /v2/models/{model}/versions/{version}/infer, ("predict", None) for /v1/predict, else None."""
    path = scope["path"]
    if path == "/v1/predict":
        return "predict", None
    parts = path.split("/")
    if parts[:3] != ["", "v2", "models"] or parts[-1] != "infer" or not all(parts[3:-1]):
        return None
    if len(parts) == 5:
        return "infer", (parts[3], "")
    if len(parts) == 7 and parts[4] == "versions":
        return "infer", (parts[3], parts[5])
    return None


class _Front:
    """Pure ASGI, before FastAPI: each HTTP request's time to its answer, by endpoint and status; admission: while
    `max_inflight` inference requests (`--max-queue`) are being handled, another is answered 503 with Retry-After at
    once, before its body is read, so past capacity the server refuses instead of letting requests wait in the event
    loop, where no deadline counts; and the two inference routes answered here (their errors as the app's handlers
    answer them), past FastAPI's middlewares and routing. Every other request goes on to `app`."""

    def __init__(self, app, metrics: Metrics, max_inflight: int, routes: dict, refused, failed):
        self.app, self.metrics, self.max_inflight, self.inflight = app, metrics, max_inflight, 0
        self.routes, self.refused, self.failed = routes, refused, failed
        self.latency: dict[tuple[str, int], object] = {}  # the histogram's child by (endpoint, status)

    def observe(self, endpoint: str, status: int, start: float) -> None:
        child = self.latency.get((endpoint, status))
        if child is None:
            child = self.latency[endpoint, status] = self.metrics.latency.labels(endpoint=endpoint, code=str(status))
        child.observe(time.perf_counter() - start)

    async def __call__(self, scope, receive, send):
        start, path = time.perf_counter(), scope["path"]
        route = _inference_route(scope)
        endpoint = (route[0] if route else "features" if path == "/v2/tiers/features"
                    else "metrics" if path == "/metrics" else "other")
        inference = endpoint in ("infer", "predict", "features")
        if inference and self.inflight >= self.max_inflight:
            await self.refused(BadRequest(503, f"overloaded, try again: {self.inflight} requests in flight; at most "
                                               f"{self.max_inflight}"))(scope, receive, send)
            self.observe(endpoint, 503, start)
            return
        self.inflight += inference
        status = 500
        try:
            if route is None:
                async def send_status(message):
                    nonlocal status
                    if message["type"] == "http.response.start":
                        status = message["status"]
                    await send(message)

                await self.app(scope, receive, send_status)
                return
            try:
                if scope["method"] != "POST":
                    raise BadRequest(405, f"{scope['method']} {path}: send POST")
                content = await self.routes[route[0]](_Call(scope, receive), route[1])
            except BadRequest as e:
                response = self.refused(e)
            except Exception as e:
                response = self.failed(e)
            else:
                status = 200
                await _send_json(send, 200, json.dumps(content, ensure_ascii=False, allow_nan=False,
                                                       separators=(",", ":")).encode())
                return
            status = response.status_code
            await response(scope, receive, send)
        finally:
            self.inflight -= inference
            self.observe(endpoint, status, start)


async def _send_json(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class _Call:
    """One inference request at the ASGI level: its headers, its body (read up to a limit), and a watch on its
    connection. Under `exitwise serve`'s own uvicorn protocol the connection itself says when the client goes away
    (`_OneWrite.on_lost`); under another server (Ray Serve's) a task waits on `receive` for the disconnect, which
    costs the event loop more per request (docs/serve.md)."""

    def __init__(self, scope, receive):
        self.scope, self.receive = scope, receive
        self.headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    async def body(self, limit: int, within_s: float) -> bytes:
        return await read_body(self.receive, self.headers.get("content-length"), limit, within_s)

    def on_disconnect(self, callback):
        """`callback("gone")` once the client goes away; returns the function that stops watching."""
        connection = getattr(getattr(self.receive, "__self__", None), "transport", None)
        if isinstance(connection, _OneWrite):
            if connection.is_closing():  # gone already (while its body was read or decoded)
                callback("gone")

            def lost() -> None:
                callback("gone")

            def stop() -> None:
                if connection.on_lost is lost:
                    connection.on_lost = None

            connection.on_lost = lost
            return stop

        def seen(watch) -> None:
            if not watch.cancelled() and watch.exception() is None and watch.result().get("type") == "http.disconnect":
                callback("gone")

        watch = asyncio.ensure_future(self.receive())
        watch.add_done_callback(seen)
        return watch.cancel


async def _files(call: _Call, body: bytes) -> tuple[Sequence[bytes], list[str | None]]:
    """The image files of a `/v1/predict` request: every file part of a multipart body, or the raw body."""
    if not (call.header("content-type") or "").startswith("multipart/form-data"):
        if not body:
            raise BadRequest(400, "empty request body: send an image file (or several as multipart/form-data)")
        return [body], [None]
    from starlette.datastructures import Headers
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream():
        yield body

    try:
        form = await MultiPartParser(Headers(scope=call.scope), stream(), max_files=MAX_PARTS,
                                     max_fields=MAX_PARTS).parse()
    except (MultiPartException, ValueError, KeyError) as e:
        raise BadRequest(400, f"malformed multipart body: {e}") from None
    files = [v for _, v in form.multi_items() if not isinstance(v, str)]
    if not files:
        raise BadRequest(400, "no file in the multipart body")
    return [await f.read() for f in files], [f.filename for f in files]


def serve(runner: Runner | None, config: ServeConfig = ServeConfig(), log_level: str = "warning") -> None:
    """Run the server until SIGTERM or SIGINT; then accepted requests are answered and it returns. Port 0: any free
    port; the line printed on start says which. With `config.relay`: a relay tier, no model (`runner` None).
    (`config.processes` above 1: `deploy.processes.serve_processes`, which builds a runner in each process.)"""
    if config.processes > 1:
        raise ValueError(f"serve() runs one process, not {config.processes}: serve_processes(make_runner, config) "
                         "builds a runner in each")
    sock = listen(config)  # before the app starts its scheduler: a port in use stops nothing that runs
    if config.grpc_port:  # free now (the gRPC server binds it as the app starts)
        listen(dataclasses.replace(config, port=config.grpc_port, grpc_port=None), listening=False).close()
    if config.relay is not None:
        from .relay import create_relay_app
        app, what = create_relay_app(config.relay, config.max_body_bytes), f"relay {config.relay.name}"
    else:
        app, what = create_app(runner, config), describe(runner)
    host, port = sock.getsockname()[:2]
    print(f"exitwise: serving {what} on {config.scheme}://{host}:{port}", flush=True)
    run_app(app, config, sock, log_level)


def grpc_line(config: ServeConfig, host: str, port: int) -> str:
    """What a server prints when its gRPC port listens."""
    return f"exitwise: gRPC (Open Inference Protocol{' over TLS' * (config.scheme == 'https')}) on {host}:{port}"


def listen(config: ServeConfig, reuse_port: bool = False, listening: bool = True):
    """The listening socket on config.host:config.port (connections queue from here on), or a one-line UserError.
    `reuse_port`: several processes' sockets share the port, the kernel spreading connections evenly over those
    listening (`serve --processes`); `listening=False`: bound only, holding the port."""
    import socket
    sock = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((config.host, config.port))
        if listening:
            sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {config.host}:{config.port}: {e.strerror or e}") from None
    return sock


def run_app(app, config: ServeConfig, sock, log_level: str = "warning") -> None:
    """`app` served by uvicorn on `sock` until SIGTERM or SIGINT, which drain it (this process's main thread)."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if getattr(app.state, "startup_error", None) is not None:
                self.should_exit = True  # before serving a request

        async def shutdown(self, sockets=None):
            begin = getattr(app.state, "begin_drain", None)  # the gRPC port drains from SIGTERM on, not only after
            if begin is not None:  # uvicorn has answered every HTTP request in flight
                begin()
            await super().shutdown(sockets)

    deadline_ms = config.relay.timeout_ms if config.relay is not None else config.scheduler.timeout_ms
    server = Server(uvicorn_config(app, log_level, deadline_ms / 1e3 + DRAIN_GRACE_S, config.tls, config.access_log))
    previous = {}
    if threading.current_thread() is threading.main_thread():
        # uvicorn drains on SIGTERM or SIGINT, then raises the signal again under the handler it found: these, so a
        # drained server returns (exit 0; Ctrl-C had been a KeyboardInterrupt); the caller's come back after
        previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        settle_heap()
        server.run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if getattr(app.state, "startup_error", None) is not None:
        raise app.state.startup_error


def settle_heap() -> None:
    """Before serving (or sending a load): what is loaded (the model, torch, the libraries: about 200,000 objects)
    moves out of the garbage collector's reach for good, so the full collections that the requests' short-lived
    objects set off walk only what came after, not for 85 ms with the process stopped (the event loop's CPU per
    request 12-21% lower; AMD Zen 4, docs/serve.md)."""
    gc.collect()
    gc.freeze()


def uvicorn_config(app, log_level: str = "warning", graceful_seconds: float | None = None,
                   tls: ServerTLS | None = None, access_log: bool = False):
    """How exitwise runs uvicorn (`exitwise serve`, and the servers `plan --measure` times): no Server and Date
    headers, and each response's head and body sent in one write (`_OneWrite`); HTTPS with a `tls` (its client CAs:
    only for clients that show a certificate they signed); uvicorn's access log only with `access_log` (whatever
    `log_level`)."""
    import logging
    import ssl
    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class OneWriteProtocol(AutoHTTPProtocol):  # httptools where installed (uvicorn[standard]), else h11
        # bytes of a request's head (its line and headers) received so far; None: in its body, or under h11
        _head: int | None = 0 if hasattr(AutoHTTPProtocol, "on_headers_complete") else None
        _refused = False  # answered a refusal and closing: what the client still sends is dropped

        def connection_made(self, transport):
            super().connection_made(_OneWrite(transport))

        def data_received(self, data) -> None:
            """httptools holds a head in memory until it ends, however long (h11 stops at its own limit, given the
            same): past HEAD_BYTES the request is refused with 431 and the connection closed."""
            if self._refused:
                return
            if self._head is not None:
                self._head += len(data)  # all of it head if the head has not ended once this data is parsed
            super().data_received(data)
            if self._head is not None and self._head > HEAD_BYTES and not self.transport.is_closing():
                self._refuse(b"431 Request Header Fields Too Large",
                             f"request line and headers over {HEAD_BYTES} bytes")

        def on_headers_complete(self) -> None:  # httptools' callbacks (h11 has none: its limit applies there)
            self._head = None
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._head = 0

        def send_400_response(self, msg: str) -> None:  # bytes that are no HTTP request: uvicorn's 400, as the app's
            self._refuse(b"400 Bad Request", msg)  # one-line JSON, not text/plain (then it closes, as uvicorn does)

        def _refuse(self, status: bytes, msg: str) -> None:
            """The answer, then a lingering close: closing a socket that holds bytes the client sent and nobody
            read sends a reset, which can destroy the answer before the client reads it; so the writing side is
            shut (the client sees the answer and its end), what still comes is dropped, and the connection is
            closed when the client closes it or after LINGER_S."""
            body = json.dumps({"error": msg}).encode()
            self.transport.write(b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: "
                                 b"%d\r\nconnection: close\r\n\r\n%s" % (status, len(body), body))
            if not self.transport.can_write_eof():  # TLS: no half close
                self.transport.close()
                return
            self._refused = True
            self.transport.write_eof()
            asyncio.get_running_loop().call_later(LINGER_S, self.transport.close)

        def connection_lost(self, exc):
            if isinstance(self.transport, _OneWrite):
                self.transport.lost()
            super().connection_lost(exc)

    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, proxy_headers=False, server_header=False,
                            date_header=False, http=OneWriteProtocol, timeout_graceful_shutdown=graceful_seconds,
                            h11_max_incomplete_event_size=HEAD_BYTES,
                            **({} if tls is None else {
                                "ssl_certfile": str(tls.certfile), "ssl_keyfile": str(tls.keyfile),
                                "ssl_ca_certs": None if tls.ca_certs is None else str(tls.ca_certs),
                                "ssl_cert_reqs": ssl.CERT_NONE if tls.ca_certs is None else ssl.CERT_REQUIRED}))
    if access_log:  # its lines are INFO, under a quieter log level too
        logging.getLogger("uvicorn.access").setLevel(logging.INFO)
    return config


class _OneWrite:
    """A transport whose writes in one turn of the event loop leave in one `write` at the end of the turn: uvicorn
    writes a response's head and its body separately, two system calls and two TCP segments (TCP_NODELAY); a
    fifth of the event loop's time per request went to them (docs/serve.md). Everything else is the transport's."""

    def __init__(self, transport):
        self._transport, self._pending, self._loop = transport, [], asyncio.get_running_loop()
        self.on_lost = None  # the request in progress on this connection: called when the client goes away

    def lost(self) -> None:
        if self.on_lost is not None:
            self.on_lost()

    def write(self, data) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(bytes(data))

    def _flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def __getattr__(self, name):
        return getattr(self._transport, name)
