"""`exitwise serve --processes N`: N server processes on one port (SO_REUSEPORT, as `gunicorn --reuse-port`).

Each process builds its own runner (`make_runner`, on its 1/N share of the CPUs' threads), scheduler and event
loop, and listens on the port with a socket of its own: the kernel spreads connections evenly over them. The
processes start one after another (a torch model tunes its precision and micro-batch alone). Nothing is shared
between them but the port and the metrics: prometheus-client's multiprocess mode (its files in a temporary folder),
so `/metrics` from any process counts them all. This process only supervises: SIGTERM or SIGINT is passed on (each
drains as one server does) and it returns when they have; a server process that fails to start or dies stops the
others, and a one-line UserError says which (the CLI exits 2).

Why: on few cores one process loses to itself. Torch's threads wait at the end of every operator for the one whose
core the event loop took, and the event loop and the worker thread share one interpreter lock. On a 2-core AMD Zen 4
two processes of one thread each answered 6-13% more requests per second than one of two threads (b-resnet11, early
exit more than the full network), while a lone request took 25-38% longer on one thread: the default stays 1
(docs/serve.md, Measured).
"""
from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Callable

from ..config import ServeConfig
from ..errors import UserError
from .metrics import METRICS_DIR
from .runner import Runner, describe

START_SECONDS = 600  # a process that has not built its model by then is taken as failed


@dataclass(frozen=True)
class Started:
    """What a server process reports once its model is built and its app is about to serve (or why it failed)."""
    what: str = ""          # `describe(runner)`: "NAME (PLATFORM, PRECISION, micro-batch N)"
    error: str | None = None
    precision: str | None = None    # what a torch runner measured and chose (ONNX runners: None)
    micro_batch: int | None = None


def as_first(make_runner: Callable[[], Runner], first: Started) -> Callable[[], Runner]:
    """The processes after the first build their runners with the precision and micro-batch that the first measured
    and chose, so that every process answers alike (each measuring its own could pick bf16 in one and fp32 in
    another). ONNX runners measure nothing here (their micro-batch is the export's): unchanged."""
    if first.precision is None:
        return make_runner
    return functools.partial(make_runner, precision=first.precision, micro_batch=first.micro_batch)


def serve_processes(make_runner: Callable[[], Runner], config: ServeConfig, log_level: str = "warning") -> None:
    """Run `config.processes` servers on one socket until SIGTERM or SIGINT; returns when all have drained. A server
    process that fails to start or dies: the others are stopped and a one-line UserError says which and why."""
    from .server import grpc_line, listen
    sock = listen(config, reuse_port=True, listening=False)  # holds the port (0: the one the OS picks) for them
    held = [sock] if not config.grpc_port else [sock, listen(dataclasses.replace(
        config, port=config.grpc_port, grpc_port=None), reuse_port=True, listening=False)]  # held for them too
    host, port = sock.getsockname()[:2]
    config = dataclasses.replace(config, port=port)
    folder = tempfile.mkdtemp(prefix="exitwise-metrics-")
    os.environ[METRICS_DIR] = folder  # the processes started below inherit it
    context = multiprocessing.get_context("spawn")  # a fresh interpreter each (no forked threads or OpenMP state)
    children: list = []
    stopping = [False]

    def stop(*_) -> None:
        stopping[0] = True
        for child in children:
            if child.is_alive():
                child.terminate()  # SIGTERM: drain

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        what = ""
        for i in range(config.processes):
            receive, send = context.Pipe(duplex=False)
            child = context.Process(target=_server_process, args=(make_runner, config, send, log_level),
                                    name=f"exitwise-serve-{i}")
            child.start()
            children.append(child)
            send.close()
            started = _started(receive, child)
            if stopping[0]:  # stopped while starting (its SIGTERM may have ended a process mid-build): not a failure
                return
            if started.error is not None:
                raise UserError(started.error)
            what = started.what
            if i == 0:
                make_runner = as_first(make_runner, started)
        print(f"exitwise: serving {what} in {config.processes} processes on {config.scheme}://{host}:{port}",
              flush=True)
        if config.grpc_port:  # as one process prints it
            print(grpc_line(config, host, config.grpc_port), flush=True)
        while not stopping[0]:
            ended = wait([c.sentinel for c in children], timeout=1.0)
            if ended and not stopping[0]:
                dead = next(c for c in children if c.sentinel in ended)
                dead.join(5)  # its sentinel can come before its exit status (exitcode None until then)
                raise UserError(f"server process {dead.name} (pid {dead.pid}) exited with code {dead.exitcode}")
        for child in children:
            child.join()
        failed = [c for c in children if c.exitcode != 0]
        if failed:
            raise UserError(f"server process {failed[0].name} exited with code {failed[0].exitcode} while draining")
    finally:
        for child in children:
            if child.is_alive():
                child.terminate()
        for child in children:
            child.join(config.scheduler.timeout_ms / 1e3 + 10)
            if child.is_alive():
                child.kill()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for held_sock in held:
            held_sock.close()
        os.environ.pop(METRICS_DIR, None)
        shutil.rmtree(folder, ignore_errors=True)


def _started(receive, child) -> Started:
    """The child's report, or why there is none (it died, or took longer than START_SECONDS)."""
    ready = wait([receive, child.sentinel], timeout=START_SECONDS)
    if receive in ready:
        try:
            return receive.recv()
        except EOFError:
            pass
    if not ready:
        return Started(error=f"server process {child.name} did not start within {START_SECONDS} s")
    child.join(5)
    return Started(error=f"server process {child.name} exited with code {child.exitcode} before it served")


def _server_process(make_runner: Callable[[], Runner], config: ServeConfig, started, log_level: str) -> None:
    """One server process: its runner built, then served on its own socket of the port until SIGTERM (then it
    drains)."""
    from ..allocator import keep_freed_memory
    from .server import create_app, listen, run_app
    keep_freed_memory()  # as `exitwise serve` raised them in its own process: a spawned one starts with glibc's defaults
    os.setpgrp()  # Ctrl-C at a terminal reaches the supervisor alone, whose SIGTERM then drains this process once
    orphaned = _stop_with_parent()
    try:
        runner = make_runner()
        app = create_app(runner, config)
        sock = listen(config, reuse_port=True)
    except UserError as e:
        started.send(Started(error=str(e)))
        return
    started.send(Started(what=describe(runner), precision=getattr(runner, "precision", None),
                         micro_batch=runner.micro_batch))
    started.close()
    run_app(app, config, sock, log_level)
    if orphaned.is_set():  # no supervisor to remove the metrics' folder: the last process out does
        _leave_metrics(os.environ[METRICS_DIR])


def _leave_metrics(folder: str) -> None:
    """This process's metric files removed, and the folder too once no other process has files in it."""
    for name in os.listdir(folder):
        if name.rsplit(".", 1)[0].endswith(f"_{os.getpid()}"):
            os.remove(os.path.join(folder, name))
    try:
        os.rmdir(folder)
    except OSError:  # another process's files are still there: it removes the folder when it leaves
        pass


def _stop_with_parent() -> threading.Event:
    """SIGTERM to this process when its supervisor is gone (killed without passing a signal on); the event returned
    is set then."""
    parent, orphaned = os.getppid(), threading.Event()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        orphaned.set()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="exitwise-parent-watch", daemon=True).start()
    return orphaned
