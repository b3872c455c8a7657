"""`GET /metrics`: Prometheus metrics of one server (its own registry, so several servers live in one process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .scheduler import Observer, Scheduler

LATENCY_BUCKETS = (.001, .002, .003, .005, .0075, .01, .015, .02, .03, .05, .075, .1, .15, .2, .3, .5, 1, 2, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics(Observer):
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram("exitwise_request_seconds", "Time from a request's arrival to its answer",
                                 ["endpoint", "code"], buckets=LATENCY_BUCKETS, registry=r)
        self.exits = Counter("exitwise_exits", "Samples answered at each exit", ["exit"], registry=r)
        self.batches = Histogram("exitwise_batch_size", "Rows per stage call", ["stage"], buckets=BATCH_BUCKETS,
                                 registry=r)
        self.depth = Gauge("exitwise_queue_depth", "Samples waiting at each stage", ["stage"], registry=r)
        self.inside = Gauge("exitwise_samples_inside", "Samples accepted and not yet answered", registry=r)
        self.rejected = Counter("exitwise_rejected_requests", "Requests answered with an error, by reason",
                                ["reason"], registry=r)
        self.dropped_samples = Counter("exitwise_dropped_samples", "Samples the scheduler dropped or refused, "
                                       "by reason (disconnected, timeout, queue_full)", ["reason"], registry=r)

    def watch(self, scheduler: Scheduler) -> None:
        """Queue depths and the samples inside are read from `scheduler` at each scrape."""
        for k in scheduler.queues:
            self.depth.labels(stage=str(k)).set_function(lambda k=k: scheduler.depth(k))
        self.inside.set_function(lambda: scheduler.inside)

    def batch(self, stage: int, rows: int) -> None:
        self.batches.labels(stage=str(stage)).observe(rows)

    def left(self, exit: int, rows: int) -> None:
        if rows:
            self.exits.labels(exit=str(exit)).inc(rows)

    def dropped(self, reason: str, rows: int) -> None:
        self.dropped_samples.labels(reason=reason).inc(rows)

    def text(self) -> bytes:
        return generate_latest(self.registry)
