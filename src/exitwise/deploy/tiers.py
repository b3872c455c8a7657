"""Tier chaining: one `exitwise serve` per tier, each holding a contiguous range of stages (docs/tiers.md).

A tier's scheduler runs its stages `first..last`; the samples that leave at its exits are answered there; the
survivors after `last` go to the next tier in batches (the batches the scheduler formed at `last`), as features
in a wire format (`exitwise.deploy.wire`) with the exit policy's state, by `POST /v2/tiers/features` (below).
The next tier answers each row (or forwards it on), and the answers come back through every tier to the client,
each saying which exit and which tier answered.

Faults: when the next tier cannot be reached, refuses, answers badly or not within `forward_timeout_ms`, the
batch is answered by this tier's own last exit (recomputed from the features it holds), marked degraded and
counted in /metrics (`exitwise_degraded_samples`); for `retry_after_ms` after a failure the next tier is not
tried (batches are answered degraded at once), then forwarding resumes on the next batch that gets through.
No sample is lost: every forwarded sample is answered, by the next tier or degraded.

`POST /v2/tiers/features` body: a 4-byte little-endian length, a JSON header {"stage": the first stage to run,
"state": the policy state, one list per row}, then one wire payload of the features (`wire.encode`). Answer:
{"tier": name, "answers": [[exit, class, probability, tier, degraded], ...]} in row order. Errors: 4xx/5xx with
a one-line JSON body, as every other endpoint.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse

from ..config import TierConfig, check_url
from ..errors import UserError, first_line
from .connections import KeptConnections
from .oip import MESSAGE_CHARS, BadRequest, answered, not_taken, read_body
from .scheduler import Answer, QueueFull, Sample, TooLarge, settle
from .wire import IMAGE, decode, encode

ENDPOINT = "/v2/tiers/features"
_log = logging.getLogger("exitwise.tiers")
FORWARD_THREADS = 4     # batches in flight to the next tier at once


def parse_stages(text: str, num_stages: int) -> tuple[int, int]:
    """`2-3` or `2` -> (first, last), within 0..num_stages-1, first <= last."""
    try:
        ends = [int(v) for v in text.split("-")]
    except ValueError:
        ends = []
    if len(ends) not in (1, 2):
        raise UserError(f"--stages {text!r}: expected FIRST-LAST (e.g. 0-1) or one stage")
    first, last = ends[0], ends[-1]
    if first > last:
        raise UserError(f"--stages {text!r}: stages out of order ({first} after {last})")
    if first < 0 or last >= num_stages:
        raise UserError(f"--stages {text!r}: the model has stages 0-{num_stages - 1}")
    return first, last


def encode_features(stage: int, features: np.ndarray, state: np.ndarray, wire: str) -> bytes:
    head = json.dumps({"stage": stage, "state": state.tolist()}, separators=(",", ":")).encode()
    return struct.pack("<I", len(head)) + head + encode(features, wire)


def decode_features(body: bytes, state_columns: int) -> tuple[int, np.ndarray, np.ndarray]:
    """(stage, float32 features or uint8 images, int64 state) of a features request; UserError when malformed."""
    if len(body) < 4:
        raise UserError("malformed features request: too short")
    (n,) = struct.unpack("<I", body[:4])
    try:
        head = json.loads(body[4:4 + n])
        stage, state = head["stage"], np.asarray(head["state"], dtype=np.int64)
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError):  # Recursion: nested ~1000 deep
        raise UserError("malformed features request: its header is not the JSON expected") from None
    features = decode(body[4 + n:])
    if not len(features):
        raise UserError("malformed features request: no rows")
    if not isinstance(stage, int) or isinstance(stage, bool) or state.size != len(features) * state_columns:
        raise UserError(f"malformed features request: state of shape {state.shape} for {len(features)} rows")
    return stage, features, state.reshape(len(features), state_columns)


@dataclass(frozen=True)
class TierAnswer(Answer):
    """An answer that says which tier gave it, and whether it is a degraded one (the next tier failed)."""
    tier: str = ""
    degraded: bool = False


class CarryImages:
    """A runner whose features carry each row's original image along (through compaction and re-batching), so a
    tier can send survivors' images instead of their features (`TierConfig.send_images`). On the first tier the
    images come in as requests; on a later one the tier before sends them (`from_numpy` gets the uint8 images),
    and its first `step` runs the stages before its own on them first (without their exits)."""

    def __init__(self, runner):
        self.runner = runner

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def to_input(self, images: np.ndarray):
        return self.runner.to_input(images), images

    def from_numpy(self, images: np.ndarray):
        return None, images  # features not computed yet: `step` does it, knowing its stage

    def step(self, k: int, features, state: np.ndarray):
        x, images = features
        out = self.runner.step(k, _early_stages(self.runner, images, k) if x is None else x, state)
        return replace(out, features=(out.features, images))

    def take(self, features, rows):
        return self.runner.take(features[0], rows), features[1][rows]

    def concat(self, parts):
        return self.runner.concat([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def to_numpy(self, features):
        return self.runner.to_numpy(features[0]), features[1]


class Forwarder:
    """The scheduler's `forward` hook: survivors' features to the next tier, off the scheduler's thread."""

    def __init__(self, runner, config: TierConfig, metrics=None):
        self.runner, self.config = runner, config
        url = check_url(config.next_url)
        self.path = url.prefix + ENDPOINT
        self.pool = ThreadPoolExecutor(FORWARD_THREADS, thread_name_prefix="exitwise-forward")
        self.connections = KeptConnections(url, config.forward_timeout_ms / 1e3, config.next_tls)
        self.down_until = 0.0
        self.lock = threading.Lock()
        self.counters = _counters(metrics)

    def __call__(self, features: np.ndarray, state: np.ndarray, samples: list[Sample]) -> None:
        self.pool.submit(self._send, features, state, samples)

    def _send(self, features, state: np.ndarray, samples: list[Sample]) -> None:
        """Every sample answered: by the next tier, else at this tier's last exit (degraded), else failed (a broken
        model), never left to its deadline."""
        features, images = features if self.config.send_images else (features, None)
        try:
            answers = self._forwarded(features if images is None else images, state, len(samples))
            if answers is not None:
                self.counters["forwarded"].inc(len(samples))
            else:
                answers = self._degraded(features)
                self.counters["degraded"].inc(len(samples))
        except Exception as e:  # a broken model: fail these samples
            for s in samples:
                settle(s, error=e)
            return
        for s, a in zip(samples, answers):
            settle(s, a)

    def _forwarded(self, values: np.ndarray, state: np.ndarray, rows: int) -> list[TierAnswer] | None:
        """The next tier's answers; None while it rests after a failure, when it fails now (then it rests for
        `retry_after_ms`), or when these values cannot be sent (not finite, or out of the wire format's range: this
        batch only, the next tier not blamed)."""
        with self.lock:
            if time.monotonic() < self.down_until:
                return None
        try:
            body = encode_features(self.config.last + 1, values, state,
                                   IMAGE if self.config.send_images else self.config.wire)
        except UserError as e:
            _log.warning("exitwise: tier %s: %s; answering at exit %d, degraded", self.config.name,
                         first_line(e, MESSAGE_CHARS), self.config.last)
            return None
        try:
            return self._post(body, rows)
        except Exception as e:  # any failure of the next tier: refused, down, too slow, a bad answer
            _log.warning("exitwise: tier %s: the next tier %s failed (%s); answering at exit %d, degraded",
                         self.config.name, self.config.next_url, first_line(e, MESSAGE_CHARS), self.config.last)
            with self.lock:
                self.down_until = time.monotonic() + self.config.retry_after_ms / 1e3
            return None

    def _post(self, body: bytes, rows: int) -> list[TierAnswer]:
        status, data, _ = self.connections.request("POST", self.path, body,
                                                   {"Content-Type": "application/octet-stream"})
        self.counters["bytes"].inc(len(body))
        if status != 200:
            raise RuntimeError(f"the next tier answered {status}{_why(data)}")
        rows_back = json.loads(data)["answers"]
        if len(rows_back) != rows:
            raise RuntimeError(f"the next tier answered {len(rows_back)} rows of {rows}")
        answers = [TierAnswer(int(e), int(c), float(p), str(t), bool(d)) for e, c, p, t, d in rows_back]
        if not all(self.config.last < a.exit < self.runner.num_exits and 0 <= a.probability <= 1 for a in answers):
            # NaN or out of range: malformed rows (a NaN would have failed this tier's own JSON answer, a 500)
            raise RuntimeError("the next tier answered an exit or probability out of range")
        return answers

    def _degraded(self, features: np.ndarray) -> list[TierAnswer]:
        """This tier's last exit on the features it holds (its head, run again: only on the degraded path)."""
        k = self.config.last
        predictions, p = self.runner.answer(k, features)
        return [TierAnswer(k, int(c), float(q), self.config.name, True) for c, q in zip(predictions, p)]


def _why(body: bytes) -> str:
    """': <the error>' of a refusal's one-line JSON body (a misconfigured chain says why), else ''."""
    try:
        return f": {json.loads(body)['error']}"
    except (ValueError, KeyError, TypeError):
        return ""


def _counters(metrics) -> dict:
    """The tier's counters in the server's registry (or inert ones without a server)."""
    if metrics is None:
        class _Null:
            def inc(self, n=1): ...
        return {k: _Null() for k in ("forwarded", "degraded", "bytes")}
    from prometheus_client import Counter
    r = metrics.registry
    return {"forwarded": Counter("exitwise_forwarded_samples", "Samples answered by the next tier", registry=r),
            "degraded": Counter("exitwise_degraded_samples", "Samples answered by this tier's last exit because "
                                "the next tier failed (down, refused, too slow)", registry=r),
            "bytes": Counter("exitwise_forwarded_bytes", "Bytes of features sent to the next tier", registry=r)}


def _early_stages(runner, images: np.ndarray, stages: int):
    """The runner's features after stages 0..stages-1 of uint8 images (their heads are not run)."""
    x = runner.to_input(images)
    for k in range(stages):
        x = runner.stage(k, x)
    return x


def _recompute(runner, images: np.ndarray, stages: int) -> np.ndarray:
    return runner.to_numpy(_early_stages(runner, images, stages))


def add_tier_routes(app, runner, config: TierConfig, max_body_bytes: int) -> None:
    """`POST /v2/tiers/features` on a server whose scheduler starts at `config.first` (> 0: the first tier takes
    images only). A tier that sends images on (`config.send_images`) takes images only: it cannot make them from
    features. Bodies over `max_body_bytes` (--max-body-mb) get 413; features not of stage first - 1's output shape,
    400 (in the scheduler they would fail inside a batch, with the good rows that joined it)."""
    if config.first == 0:
        return
    scheduler = app.state.scheduler
    columns = runner.init_state(0).shape[1]
    c, h, w = runner.input_shape
    expected = _recompute(runner, np.zeros((1, h, w, c), np.uint8), config.first).shape[1:]

    @app.post(ENDPOINT)
    async def features(request: Request):
        try:
            body = await read_body(request.receive, request.headers.get("content-length"), max_body_bytes,
                                   scheduler.config.timeout_ms / 1e3)  # a tier before that stalls: 408
            stage, x, state = decode_features(body, columns)
        except UserError as e:
            raise BadRequest(400, str(e)) from None
        if stage != config.first:
            raise BadRequest(409, f"tier {config.name} holds stages {config.first}-{config.last}; features for stage "
                                  f"{stage} belong elsewhere")
        if config.send_images and x.dtype != np.uint8:
            raise BadRequest(409, f"tier {config.name} sends the images on to the next tier: send it the images, not "
                                  "features (--send-images on the tier before)")
        if x.dtype == np.uint8:  # the images, not features: stages 0..first-1 first (no exits: none left there)
            if x.shape[1:] != (h, w, c):
                raise BadRequest(400, f"images of shape {list(x.shape[1:])}; the model takes {[h, w, c]} (NHWC)")
            if not config.send_images:  # else the scheduler's runner (`CarryImages`) runs them, keeping the images
                x = await asyncio.get_running_loop().run_in_executor(None, _recompute, runner, x, config.first)
        elif x.shape[1:] != expected:
            raise BadRequest(400, f"features of shape {list(x.shape[1:])}; stage {config.first} takes "
                                  f"{list(expected)} (stage {config.first - 1}'s output)")
        try:
            why, answers = await app.state.answers.wait(lambda slots: scheduler.submit_features(x, state, slots),
                                                        len(x), scheduler.config.timeout_ms / 1e3 + 1)
        except (QueueFull, TooLarge) as e:
            raise not_taken(e, f"{len(x)} rows", scheduler.config.max_queue) from None
        answers = answered(why, answers, scheduler.config.timeout_ms)
        if not all(math.isfinite(a.probability) for a in answers):  # finite features far outside what stages give
            raise BadRequest(400, "features out of range: the model's answer to them is not a number")
        rows = [[a.exit, a.prediction, a.probability, getattr(a, "tier", "") or config.name,
                 getattr(a, "degraded", False)] for a in answers]
        return JSONResponse({"tier": config.name, "answers": rows})
