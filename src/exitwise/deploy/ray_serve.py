"""`exitwise serve --ray --replicas N` (or `MIN-MAX`, autoscaled): the same app as a Ray Serve deployment
(`pip install 'exitwise[ray]'`).

Each replica builds its own runner (`make_runner`, shipped to it by Ray) and its own scheduler, so batches form
per replica; Ray's HTTP proxy spreads requests over the replicas, on one machine or a cluster; with a range, Ray
Serve's autoscaler adds and removes replicas by the requests in flight (`RayConfig`). `ray.init()`
joins the cluster that `RAY_ADDRESS` names (e.g. `auto` on a node of a cluster started with `ray start`), else
starts a local one. The model's files (an export folder, weights) must be at the same path on every node.
"""
from __future__ import annotations

import signal
import threading
from typing import Callable

from ..allocator import keep_freed_memory
from ..errors import UserError
from .runner import Runner
from ..config import RayConfig, ServeConfig
from .server import create_app, settle_heap

APP_NAME = "exitwise"


def deployment(make_runner: Callable[[], Runner], config: ServeConfig, scaling: RayConfig = RayConfig()):
    """The bound Ray Serve application: `scaling.replicas` copies of `create_app(make_runner(), config)`."""
    if config.grpc_port is not None:  # each replica would listen on it; Ray Serve's proxy is HTTP here
        raise UserError("--grpc-port with --ray: Ray Serve's proxy speaks HTTP here (drop --grpc-port)")
    from ray import serve

    @serve.deployment(max_ongoing_requests=config.scheduler.max_queue, **replica_options(scaling, config))
    @serve.ingress()
    class ExitwiseServer:
        def __init__(self, make_runner, config):
            keep_freed_memory()  # each replica is a process of Ray's, with glibc's defaults until then
            self.exitwise_app = create_app(make_runner(), config)
            settle_heap()

        def __serve_build_asgi_app__(self):
            return self.exitwise_app

    return ExitwiseServer.bind(make_runner, config)


def replica_options(scaling: RayConfig, config: ServeConfig) -> dict:
    """`serve.deployment`'s keywords for the replicas: a fixed number, or Ray Serve's `autoscaling_config`."""
    least, most = scaling.replicas
    if not scaling.autoscaled:
        return {"num_replicas": least}
    timing = {k: getattr(scaling, k) for k in ("upscale_delay_s", "downscale_delay_s", "look_back_period_s")
              if getattr(scaling, k) is not None}
    limit = config.scheduler.max_queue  # Ray's max_ongoing_requests: a replica never holds more
    target = min(config.scheduler.max_batch, limit) if scaling.target_ongoing is None else scaling.target_ongoing
    if target > limit:
        raise UserError(f"--target-ongoing {target} is above --max-queue {limit}, more than a replica ever holds")
    return {"autoscaling_config": {"min_replicas": least, "initial_replicas": least, "max_replicas": most,
                                   "target_ongoing_requests": target, **timing}}


def start_on_ray(make_runner: Callable[[], Runner], config: ServeConfig, scaling: RayConfig = RayConfig()) -> str:
    """Deploy on the Ray cluster this process is connected to (or a new local one); returns the URL."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise UserError("--ray needs Ray Serve: pip install 'exitwise[ray]'") from None
    tls = ({"ssl_certfile": str(config.tls.certfile), "ssl_keyfile": str(config.tls.keyfile)}
           if config.tls else {})  # Ray's HTTP proxy holds the certificate
    if config.tls and config.tls.ca_certs is not None:  # Ray's proxy takes the CAs, asks clients for no certificate
        raise UserError("--ssl-ca-certs with --ray: Ray Serve's HTTP proxy does not require client certificates; "
                        "put a proxy that does in front of it (drop --ssl-ca-certs)")
    if tls and "ssl_certfile" not in serve.config.HTTPOptions.model_fields:
        raise UserError("--ssl-certfile with --ray: this Ray Serve's HTTP proxy takes no certificate; upgrade it "
                        "(pip install -U 'ray[serve]')")
    app = deployment(make_runner, config, scaling)  # refused here (and above), before Ray starts
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": config.host, "port": config.port, **tls})
    serve.run(app, name=APP_NAME, route_prefix="/")
    return f"{config.scheme}://{config.host}:{config.port}"


def serve_on_ray(make_runner: Callable[[], Runner], config: ServeConfig, scaling: RayConfig = RayConfig()) -> None:
    """`start_on_ray`, then wait for SIGTERM or SIGINT and take the application down."""
    url = start_on_ray(make_runner, config, scaling)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"exitwise: serving on Ray Serve ({scaling.describe()}) at {url}", flush=True)
    stop.wait()
    from ray import serve
    serve.delete(APP_NAME)
    serve.shutdown()
