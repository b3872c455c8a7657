"""`GET /metrics`: Prometheus metrics of one server (its own registry, so several servers live in one process), or
of all the processes of `exitwise serve --processes N` (prometheus-client's multiprocess mode: every process writes
its values to files in one folder, and a scrape of any of them adds them up). One server's also carry its process's
CPU, memory and garbage collections (prometheus-client's standard `process_*` and `python_*` metrics; not with
--processes, where a scrape would give the one process that answered it)."""
from __future__ import annotations

import os
import threading
import time

from prometheus_client import (CollectorRegistry, Counter, Gauge, GCCollector, Histogram, PlatformCollector,
                               ProcessCollector, generate_latest)

from .runner import Runner
from .scheduler import Observer, Scheduler

LATENCY_BUCKETS = (.001, .002, .003, .005, .0075, .01, .015, .02, .03, .05, .075, .1, .15, .2, .3, .5, 1, 2, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
STAGE_BUCKETS = (.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5)


METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"  # set by `serve --processes` (`deploy.processes`) for every server process;
# prometheus-client then keeps each value in a file there, and a scrape of any process adds them up
GAUGE_SECONDS = 0.5  # multiprocess: how often each process writes its queue gauges (a scrape reads the files)


class Metrics(Observer):
    def __init__(self, multiprocess: bool | None = None):
        """`multiprocess` None: as this process was started (METRICS_DIR set by `serve --processes`, or not)."""
        self.registry = CollectorRegistry()
        self.multiprocess = METRICS_DIR in os.environ if multiprocess is None else multiprocess
        r = self.registry
        live = {"multiprocess_mode": "livesum"}  # the gauges of the processes alive, added up (multiprocess only)
        self.latency = Histogram("exitwise_request_seconds", "Time from a request's arrival to its answer",
                                 ["endpoint", "code"], buckets=LATENCY_BUCKETS, registry=r)
        self.exits = Counter("exitwise_exits", "Samples answered at each exit", ["exit"], registry=r)
        self.batches = Histogram("exitwise_batch_size", "Rows per stage call", ["stage"], buckets=BATCH_BUCKETS,
                                 registry=r)
        self.stage_time = Histogram("exitwise_stage_seconds", "Time of one stage call (its stage, its exit's head and "
                                    "decision) on its rows", ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.depth = Gauge("exitwise_queue_depth", "Samples waiting at each stage", ["stage"], registry=r, **live)
        self.inside = Gauge("exitwise_samples_inside", "Samples accepted and not yet answered", registry=r, **live)
        self.rejected = Counter("exitwise_rejected_requests", "Requests answered with an error, by reason",
                                ["reason"], registry=r)
        self.dropped_samples = Counter("exitwise_dropped_samples", "Samples the scheduler dropped or refused, "
                                       "by reason (disconnected, timeout, queue_full)", ["reason"], registry=r)
        self.model = Gauge("exitwise_model_info", "The model served (always 1): its platform, the precision and "
                           "micro-batch it runs in (a torch model's measured on this machine at start), whether "
                           "samples leave early, its stages and the workers running them",
                           ["model", "platform", "precision", "micro_batch", "early_exit", "stages", "workers"],
                           registry=r, multiprocess_mode="livemax")
        if not multiprocess:
            for collector in (ProcessCollector, PlatformCollector, GCCollector):
                collector(registry=r)

    def serving(self, runner: Runner, scheduler: Scheduler) -> None:
        """`exitwise_model_info` for `runner` under `scheduler`."""
        self.model.labels(model=runner.name, platform=runner.platform, precision=getattr(runner, "precision", None)
                          or "", micro_batch=str(runner.micro_batch),
                          early_exit=str(getattr(runner, "early_exit", True)).lower(),
                          stages=f"{scheduler.first}-{scheduler.last}", workers=str(scheduler.config.workers)).set(1)

    def watch(self, scheduler: Scheduler) -> None:
        """Queue depths and the samples inside are read from `scheduler` at each scrape (multiprocess: written by a
        thread every GAUGE_SECONDS, as another process's scrape cannot call this one)."""
        if not self.multiprocess:
            for k in scheduler.queues:
                self.depth.labels(stage=str(k)).set_function(lambda k=k: scheduler.depth(k))
            self.inside.set_function(lambda: scheduler.inside)
            return

        def write() -> None:
            while True:
                for k in scheduler.queues:
                    self.depth.labels(stage=str(k)).set(scheduler.depth(k))
                self.inside.set(scheduler.inside)
                if not scheduler.accepting and scheduler.inside == 0:
                    return
                time.sleep(GAUGE_SECONDS)

        threading.Thread(target=write, name="exitwise-gauges", daemon=True).start()

    def batch(self, stage: int, rows: int, seconds: float) -> None:
        self.batches.labels(stage=str(stage)).observe(rows)
        self.stage_time.labels(stage=str(stage)).observe(seconds)

    def left(self, exit: int, rows: int) -> None:
        if rows:
            self.exits.labels(exit=str(exit)).inc(rows)

    def dropped(self, reason: str, rows: int) -> None:
        self.dropped_samples.labels(reason=reason).inc(rows)

    def text(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
