"""`exitwise plan --measure`: a tier's own costs, timed on the machine it runs on: each stage with its head
(`measure_stages`), a request through the real server beyond its stages (`measure_request`, or from a client's side
against a running tier, `measure_request_at`), passing a request on as a relay (`measure_relay`), and what the lossy
wire formats change in the answers (`measure_wire`). Their results are the planner's inputs (`plan.Tier`, all three
at once: `measure_tier`; `plan.WireCost`); the planner itself stays a pure function.
"""
from __future__ import annotations

import gc
import json
import time
from contextlib import contextmanager
from typing import Sequence

import numpy as np

from ..config import NextURL, ServerTLS, check_url
from ..errors import UserError
from ..exit_rule import leaves
from .onnx_runtime import as_input
from .plan import Tier, WireCost
from .wire import decode, encode

MEASURE_BATCH = 1  # `exitwise plan --measure`: images per timed call (an image's latency on a lightly loaded tier)
SUSTAINED_SECONDS = 0.25  # `plan --measure` times each stage for at least this long (many CPU-quota periods)


@contextmanager
def _collector_paused():
    """No garbage collection while timing, as `timeit` does: a full collection stops the process for milliseconds (85
    ms in a server holding torch and a model), which a mean over a hundred calls would count as the measured cost."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def measure_tier(export, name: str = "tier", batch: int = MEASURE_BATCH, tls: ServerTLS | None = None) -> Tier:
    """`exitwise plan --measure`: tier `name`'s costs on this machine (run it there) for an ONNX export (a folder):
    its stages (`measure_stages`, `batch` images per call), a request (`measure_request`; over `tls`, as a tier served
    with it takes its requests) and a relay
    (`measure_relay`), with the export's sessions as `exitwise serve` runs them (its default workers' share of the
    CPUs this process may run on, no spinning; with ONNX Runtime's default thread count the stages timed
    differently: docs/tiers.md)."""
    from ..config import SchedulerConfig
    from .onnx_runner import OnnxRunner
    if batch < 1:
        raise UserError(f"--measure-batch must be at least 1, got {batch}")
    model = OnnxRunner.load(export, workers=SchedulerConfig().workers).model
    return Tier(name, stage_seconds=measure_stages(model, batch=batch),
                request_seconds=measure_request(model, tls=tls), relay_seconds=measure_relay(model))


def measure_stages(model, batch: int = MEASURE_BATCH, repeats: int = 20, seconds: float = SUSTAINED_SECONDS,
                   seed: int = 0) -> tuple[float, ...]:
    """Per-sample seconds of each stage with its head on this machine (`model`: an `OnnxEarlyExit`): the mean of
    back-to-back calls on `batch` random images over at least `repeats` calls and `seconds`, after an untimed one
    (batch 1: an image's latency). The mean of a sustained run, not the fastest call: on a machine whose CPU is
    shared or quota-limited (a cgroup, a VM's share) a short call can run in a burst at full speed, while a busy
    tier pays the sustained rate. Run on a tier's own machine (`exitwise plan --measure`), they are that tier's
    `stage-ms=`."""
    c, h, w = model.input_shape
    x = as_input(np.random.default_rng(seed).integers(0, 256, (batch, h, w, c), dtype=np.uint8))
    result = []
    for k in range(model.num_exits):
        out, _ = model.run_stage(k, x)
        with _collector_paused():
            calls, start = 0, time.perf_counter()
            while calls < repeats or time.perf_counter() - start < seconds:
                model.run_stage(k, x)
                calls += 1
            result.append((time.perf_counter() - start) / calls / batch)
        x = out
    return tuple(result)


class _StepClock:
    """A runner whose `step` calls add their wall time to `seconds` (what a served request spent in its stages)."""

    def __init__(self, runner):
        self.runner, self.seconds = runner, 0.0

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def step(self, k, features, state):
        start = time.perf_counter()
        try:
            return self.runner.step(k, features, state)
        finally:
            self.seconds += time.perf_counter() - start


def _round_trips(url: NextURL, model: str, images: np.ndarray, requests: int, after=lambda i: None,
                 context=None) -> list[tuple[float, int]]:
    """(seconds, exit taken) of `requests` one-image binary V2 infer requests sent back to back on one connection
    (as a busy tier gets them), cycling through `images` (uint8 NHWC), after three untimed ones that warm the
    connection and the sessions, to the server at `url` (over TLS for https, with `context`: `connections.connect`).
    `after(i)`: called when request i is answered."""
    from .connections import connect
    n, timed = len(images), []
    connection = connect(url, 30, context)
    with _collector_paused():  # here and in a server in this process
        try:
            for i in range(requests + 3):
                image = images[i % n:i % n + 1]
                head = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(image.shape),
                                               "parameters": {"layout": "NHWC", "binary_data_size": image.size}}]})
                headers = {"Content-Type": "application/octet-stream",
                           "Inference-Header-Content-Length": str(len(head))}
                start = time.perf_counter()
                connection.request("POST", f"/v2/models/{model}/infer", head.encode() + image.tobytes(), headers)
                response = connection.getresponse()
                body = response.read()
                took = time.perf_counter() - start
                after(i)
                if response.status != 200:
                    raise UserError(f"--measure: the server answered {response.status}: {body[:200]!r}")
                length = int(response.getheader("Inference-Header-Content-Length") or len(body))
                outputs = {o["name"]: o for o in json.loads(body[:length])["outputs"]}
                if i >= 3:
                    timed.append((took, int(outputs["exit"]["data"][0]) if "data" in outputs["exit"] else -1))
        except OSError as e:
            raise UserError(f"--measure: cannot reach the server at {url.host}:{url.port} ({e})") from None
        finally:
            connection.close()
    return timed


def _measure_images(shape: Sequence[int], images: np.ndarray | None) -> np.ndarray:
    c, h, w = shape
    return images if images is not None else np.random.default_rng(0).integers(0, 256, (1, h, w, c), dtype=np.uint8)


class _Serving:
    """`app` served by uvicorn on 127.0.0.1 (a free port) in a thread of this process, while inside the `with`;
    over `tls` where given."""

    def __init__(self, app, tls: ServerTLS | None = None):
        import socket
        import threading
        import uvicorn
        from .server import uvicorn_config
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn_config(app, "error", None, tls))  # as `exitwise serve` runs it
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> _Serving:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.__exit__()
                raise UserError("the server for --measure did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def _serve_imports():
    try:
        import uvicorn  # noqa: F401
        from .server import create_app
        from .relay import create_relay_app
    except ImportError as e:
        raise UserError(f"--measure times a request through the server: pip install 'exitwise[serve]' ({e.name})") \
            from None
    return create_app, create_relay_app


def measure_request(model, requests: int = 100, images: np.ndarray | None = None,
                    tls: ServerTLS | None = None) -> float:
    """Seconds a one-image request costs this machine beyond its stages, HTTP on both ends included: over
    `requests` binary V2 infer requests sent back to back (`images`, or one random image) to the real server
    (uvicorn on 127.0.0.1, a free port, in this process), the mean round trip less the time the request's stage
    calls took in that server (its runner's `step`, timed as served, whichever exit the image takes). `model`: an
    `OnnxEarlyExit`. The client runs here too: on this machine's CPU, as an application sending from the tier's
    own machine would. `tls`: the server speaks it, the client encrypting on a kept connection without checking the
    certificate (it may name another host; the handshake is not timed).
    Needs the serve extra."""
    create_app, _ = _serve_imports()
    from .onnx_runner import OnnxRunner
    served = _StepClock(OnnxRunner(model))
    app, inside = create_app(served), []

    async def timed(scope, receive, send):  # the time each request spent in its stages
        in_stages = served.seconds
        await app(scope, receive, send)
        if scope["type"] == "http":
            inside.append(served.seconds - in_stages)

    def noted(i: int) -> None:  # the app notes its time just after answering
        deadline = time.monotonic() + 5
        while len(inside) <= i and time.monotonic() < deadline:
            time.sleep(0.0005)

    try:
        with _Serving(timed, tls) as server:
            trips = _round_trips(NextURL(tls is not None, "127.0.0.1", server.port), served.name,
                                 _measure_images(model.input_shape, images), requests, noted,
                                 None if tls is None else _unchecked_tls())
    finally:
        app.state.scheduler.close(5)
    return max(0.0, float(np.mean([took - stages for (took, _), stages in zip(trips, inside[3:])])))


def _unchecked_tls():
    """A client's TLS context that encrypts without checking the server's certificate: for timing a server of this
    process on 127.0.0.1 only."""
    import ssl
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


def measure_relay(model, requests: int = 100, images: np.ndarray | None = None) -> float:
    """Seconds passing one request on costs this machine as a relay (a tier with no stages: `relay-ms`): over
    `requests` one-image binary V2 infer requests sent back to back, the mean round trip through a real relay
    (uvicorn on 127.0.0.1, in this process) to a server of `model` less the mean round trip straight to that
    server, the two alternating in rounds of ten. Needs the serve extra."""
    create_app, create_relay_app = _serve_imports()
    from ..config import RelayConfig, ServeConfig
    from .onnx_runner import OnnxRunner
    app = create_app(OnnxRunner(model))
    pixels = _measure_images(model.input_shape, images)
    try:
        with _Serving(app) as server:
            relay = create_relay_app(RelayConfig("measured", f"http://127.0.0.1:{server.port}"),
                                     ServeConfig().max_body_bytes)
            with _Serving(relay) as through:
                direct, relayed = [], []
                for _ in range(max(1, requests // 10)):
                    for port, trips in ((server.port, direct), (through.port, relayed)):
                        trips += [took for took, _ in _round_trips(NextURL(False, "127.0.0.1", port),
                                                                   app.state.runner.name, pixels, 10)]
    finally:
        app.state.scheduler.close(5)
    return max(0.0, float(np.mean(relayed) - np.mean(direct)))


def measure_request_at(url: str, model: str, stage_seconds: Sequence[float], images: np.ndarray,
                       requests: int = 100) -> float:
    """Seconds a one-image request costs a tier beyond its stages, as its client sees it: over `requests` binary V2
    infer requests sent back to back from here to the tier serving the whole network at `url`, the mean round
    trip less the `stage_seconds` (measured on the tier) of the stages up to the exit each answer names. For a
    tier whose clients run elsewhere (`images`: uint8 NHWC, real ones, so the exits spread)."""
    at = check_url(url)
    cumulative = np.cumsum(stage_seconds)
    trips = _round_trips(at, model, images, requests)  # https: checked against the system's certificates
    return max(0.0, float(np.mean([took - cumulative[k] for took, k in trips])))


def measure_wire(model, images: np.ndarray, formats: Sequence[str] = ("fp16", "int8"),
                 labels: np.ndarray | None = None) -> WireCost:
    """Per format and cut, the share of `images` whose exit or prediction differs from the fp32 early exit when
    the survivors' features cross that cut encoded in the format (`model`: an `OnnxEarlyExit`, whose
    `run_stage(k, x)` gives (features, logits)); with `labels`, also each accuracy change. The int8 scales come
    from all the survivors at once (a tier takes them from each batch it forwards)."""
    k_exits, n = model.num_exits, len(images)
    x = as_input(images)
    features, logits = [], []
    for k in range(k_exits):  # every stage on every image: the reference and the features at every cut
        x, out = model.run_stage(k, x)
        features.append(x)
        logits.append(out)
    thr = model.thresholds.astype(np.float32)

    def decide(logits_from: list[np.ndarray], k0: int, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exit and prediction of rows that reach stage k0, from their logits at stages k0..K-1."""
        rows = len(state)
        exits, preds, open_ = np.full(rows, k_exits - 1), logits_from[-1].argmax(-1), np.ones(rows, bool)
        for k in range(k0, k_exits - 1):
            scores, state = model.policy.step(k, logits_from[k - k0], state)
            leave = open_ & leaves(scores, thr[k])
            exits[leave], preds[leave] = k, logits_from[k - k0][leave].argmax(-1)
            open_ &= ~leave
        return exits, preds

    ref_exits, ref_preds = decide(logits, 0, model.policy.init_state(n))
    states, state = [model.policy.init_state(n)], model.policy.init_state(n)
    for k in range(k_exits - 1):
        state = model.policy.step(k, logits[k], state)[1]
        states.append(state)
    result: dict = {fmt: [] for fmt in formats}
    accuracy: dict = {fmt: [] for fmt in formats}
    right = None if labels is None else np.asarray(labels)
    for fmt in formats:
        for cut in range(1, k_exits):
            exits, preds = ref_exits.copy(), ref_preds.copy()
            rows = np.flatnonzero(ref_exits >= cut)
            if len(rows):
                y, later = decode(encode(features[cut - 1][rows], fmt)), []
                for k in range(cut, k_exits):
                    y, out = model.run_stage(k, y)
                    later.append(out)
                exits[rows], preds[rows] = decide(later, cut, states[cut][rows])
            result[fmt].append(float(((exits != ref_exits) | (preds != ref_preds)).mean()))
            if right is not None:
                accuracy[fmt].append(float(100 * ((preds == right).mean() - (ref_preds == right).mean())))
    return WireCost(n, {f: tuple(v) for f, v in result.items()},
                    None if right is None else {f: tuple(v) for f, v in accuracy.items()})
