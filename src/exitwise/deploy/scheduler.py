"""The stage-level dynamic batcher: batches re-form at every exit, on worker threads (torch-free).

Requests queue at the first stage. When a worker is free it runs one stage on one batch: up to
`max_batch` rows of what waits there (oldest first). The samples that leave at that stage's exit are
answered at once (each sample has its own `concurrent.futures.Future`); the survivors join the queue of
the next stage, where they batch with the survivors of other batches. Which non-empty stage runs next
is `SchedulerConfig.schedule` (`exitwise serve --schedule`); `SchedulerConfig.workers` threads do this at once, each
taking the next batch when it is free:

* `deepest` (the default): the stage with the most samples waiting (ties: the later stage), so batches are
  large; on b-resnet11 (docs/serve.md) more throughput than `oldest` in most runs and a lower p50 under load,
  while neither rule has the lower p99 in every run (`oldest`'s was lower at capacity on 2026-12-05);
* `oldest`: the stage holding the sample that arrived first, so the oldest request finishes first (the default
  before: it measured best against the slower server of an earlier session the same day);
* `request-level`: no re-forming: a batch runs all its stages together (compacting as the offline
  runtime does) and is answered when its last sample is done; the baseline that shows what
  re-forming buys.

The first stage waits up to `max_wait_ms` for a full batch when nothing else is waiting; later stages
never wait (no worker idles while samples wait there). Before every stage, samples whose
future was cancelled (the client went away) or whose deadline passed (`timeout_ms`, answered with
`Expired`) are dropped. `submit` refuses at once (`QueueFull`) when `max_queue` samples are inside, and a submission of more
than `max_queue` samples (`TooLarge`), which would never fit.

A scheduler may hold only the stages `first..last` of a network (tiers): features enter at `first`
(`submit_features`) and the samples still there after `last` are handed to `forward` instead of being
answered.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..config import SchedulerConfig
from ..errors import UserError
from .runner import Runner, check_images

FAILURE_LOG_S = 10.0  # an unexpected failure's traceback is logged at most once in this long
_log = logging.getLogger("exitwise.serve")


class FailureLog:
    """Unexpected failures (a broken model, a bug) logged with their traceback: the first, then at most one every
    FAILURE_LOG_S saying how many went unlogged since (a broken model fails every batch; /metrics counts them all)."""

    def __init__(self, what: str, clock: Callable[[], float] = time.monotonic):
        self.what, self.clock, self.next_at, self.unlogged, self.lock = what, clock, 0.0, 0, threading.Lock()

    def __call__(self, e: BaseException) -> None:
        with self.lock:
            now = self.clock()
            if now < self.next_at:
                self.unlogged += 1
                return
            unlogged, self.unlogged, self.next_at = self.unlogged, 0, now + FAILURE_LOG_S
        since = f" ({unlogged} more since the last one logged)" if unlogged else ""
        _log.error("exitwise: %s failed%s", self.what, since, exc_info=e)


@dataclass(frozen=True)
class Answer:
    """A served sample: the exit it left at, its class there and that class's probability."""
    exit: int
    prediction: int
    probability: float


class QueueFull(Exception):
    """The scheduler holds `max_queue` samples (or is closing): try again later."""


class TooLarge(Exception):
    """One submission of more samples than the scheduler ever holds (`max_queue`): it would never fit."""


class Expired(Exception):
    """The sample's deadline passed before it was answered."""


@dataclass(eq=False)
class Sample:
    """One image inside the scheduler: its future, when it arrived and when it must be answered (monotonic s).
    The future is a `concurrent.futures.Future`, or the caller's own object with the same `done`, `cancelled`,
    `set_result` and `set_exception` (`submit(..., futures=)`; the HTTP server's, `deploy.answers.Slot`, hand
    answers to its event loop a batch at a time)."""
    future: Future
    arrival: float
    deadline: float


def settle(sample: Sample, answer: Answer | None = None, error: Exception | None = None) -> None:
    """`sample`'s future given its answer or error, unless it is settled already (or cancelled by its client)."""
    if sample.future.done():
        return
    try:
        sample.future.set_exception(error) if error is not None else sample.future.set_result(answer)
    except Exception:  # cancelled meanwhile
        pass


class Observer:
    """What the scheduler reports (the server's metrics); this one ignores it."""

    def batch(self, stage: int, rows: int, seconds: float) -> None: ...
    def left(self, exit: int, rows: int) -> None: ...
    def dropped(self, reason: str, rows: int) -> None: ...


@dataclass(eq=False)
class _Chunk:
    """Rows waiting at a stage together: features (numpy at the entry stage), policy state, their samples."""
    data: Any
    state: np.ndarray
    samples: list[Sample]
    oldest: float = field(init=False)

    def __post_init__(self) -> None:
        self.oldest = min(s.arrival for s in self.samples)


Forward = Callable[[np.ndarray, np.ndarray, list[Sample]], None]


class Scheduler:
    """`Scheduler(runner, config).start()`; `submit(images)` -> one future per image, resolving to an `Answer`."""

    def __init__(self, runner: Runner, config: SchedulerConfig = SchedulerConfig(), forward: Forward | None = None,
                 observer: Observer | None = None):
        last = runner.num_exits - 1 if config.last is None else config.last
        if not 0 <= config.first <= last < runner.num_exits:
            raise UserError(f"stages {config.first}..{last} are not within the model's 0..{runner.num_exits - 1}")
        if last < runner.num_exits - 1 and forward is None:
            raise UserError(f"stages {config.first}..{last} end before the final exit: give a forward callback")
        self.runner, self.config, self.forward = runner, config, forward
        self.observer = observer or Observer()
        self.failures = FailureLog("a stage call")
        self.first, self.last = config.first, last
        self.queues: dict[int, collections.deque[_Chunk]] = {k: collections.deque() for k in range(config.first, last + 1)}
        self._inside = 0
        self._accepting = True
        self._cond = threading.Condition()
        self._threads = [threading.Thread(target=self._loop, name=f"exitwise-scheduler-{i}", daemon=True)
                         for i in range(config.workers)]

    def start(self) -> Scheduler:
        for thread in self._threads:
            thread.start()
        return self

    # the caller's side (any thread)

    def submit(self, images: np.ndarray, futures: list | None = None,
               timeout_ms: float | None = None) -> list[Future]:
        """uint8 (N, H, W, C) images into the first stage (which must be stage 0); `futures`: the caller's, one
        per image (see `Sample`), else new ones; `timeout_ms`: their deadline, where sooner than the config's."""
        if self.first != 0:
            raise ValueError("this scheduler starts at a later stage: submit_features")
        check_images(images, self.runner.input_shape)  # here, not in a batch it would share with other callers
        return self._enter(images, self.runner.init_state(len(images)), futures, timeout_ms)

    def submit_features(self, features: np.ndarray, state: np.ndarray, futures: list | None = None) -> list[Future]:
        """Features (`runner.to_numpy` of stage first - 1's output) and policy state into stage `first`; `futures`
        as for `submit`."""
        if len(features) != len(state):
            raise ValueError(f"{len(features)} rows of features but {len(state)} of state")
        return self._enter(features, state, futures)

    def _enter(self, data: np.ndarray, state: np.ndarray, futures: list | None = None,
               timeout_ms: float | None = None) -> list[Future]:
        now = time.monotonic()
        deadline = now + self.config.within_ms(timeout_ms) / 1e3
        if futures is not None and len(futures) != len(data):
            raise ValueError(f"{len(futures)} futures for {len(data)} rows")
        if len(data) > self.config.max_queue:  # not a QueueFull: waiting would not help
            raise TooLarge(f"{len(data)} samples; at most {self.config.max_queue} (--max-queue)")
        samples = [Sample(f, now, deadline) for f in (futures if futures is not None else
                                                       [Future() for _ in range(len(data))])]
        with self._cond:
            if not self._accepting:
                raise QueueFull("the server is shutting down")
            if self._inside + len(samples) > self.config.max_queue:
                self.observer.dropped("queue_full", len(samples))
                raise QueueFull(f"{self._inside} samples queued; at most {self.config.max_queue}")
            if samples:
                self._inside += len(samples)
                self.queues[self.first].append(_Chunk(data, state, samples))
                self._cond.notify()
        return [s.future for s in samples]

    def depth(self, stage: int) -> int:
        """Samples waiting at `stage` (not counting a batch running there)."""
        with self._cond:
            return sum(len(c.samples) for c in self.queues.get(stage, ()))

    @property
    def inside(self) -> int:
        """Samples accepted and not yet answered, dropped or forwarded."""
        return self._inside

    @property
    def accepting(self) -> bool:
        return self._accepting and all(t.is_alive() for t in self._threads)

    def close(self, timeout: float | None = None) -> bool:
        """Refuse new samples, answer those inside (no more waiting for full batches), stop the workers.
        True when they finished within `timeout` seconds."""
        with self._cond:
            self._accepting = False
            self._cond.notify_all()
        end = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            if thread.is_alive():
                thread.join(None if end is None else max(0.0, end - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    # the worker's side

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    stage, wait = self._pick(time.monotonic())
                    if stage is not None:
                        break
                    if not self._accepting and self._inside == 0:
                        return
                    self._cond.wait(wait)
                chunk = self._pop(stage)
            self._run(stage, chunk)

    def _pick(self, now: float) -> tuple[int | None, float | None]:
        """The stage to run now, or (None, seconds to wait; None: until notified)."""
        waiting = {k: q for k, q in self.queues.items() if q}
        if not waiting:
            return None, None
        later = [k for k in waiting if k != self.first]
        if not later:
            entry = waiting[self.first]
            due = entry[0].oldest + self.config.max_wait_ms / 1e3
            rows = sum(len(c.samples) for c in entry)
            if rows >= self.config.max_batch or now >= due or not self._accepting:
                return self.first, None
            expires = min(s.deadline for c in entry for s in c.samples)  # a request's own may be sooner
            if now > expires:  # waiting for a batch to fill, samples past their deadline leave and free their place
                live = (self._live(self.first, c) for c in list(entry))
                self.queues[self.first] = collections.deque(c for c in live if c is not None)
                return self._pick(now)
            return None, min(due, expires) - now + 1e-3
        if self.config.schedule == "oldest":
            return min(waiting, key=lambda k: (min(c.oldest for c in waiting[k]), -k)), None
        return max(waiting, key=lambda k: (sum(len(c.samples) for c in waiting[k]), k)), None

    def _pop(self, stage: int) -> _Chunk:
        """Up to max_batch rows from the front of `stage`'s queue, as one chunk (a chunk too big is split)."""
        queue, parts, rows = self.queues[stage], [], 0
        while queue and rows < self.config.max_batch:
            room = self.config.max_batch - rows
            chunk = queue[0]
            if len(chunk.samples) <= room:
                parts.append(queue.popleft())
            else:
                head, tail = np.arange(room), np.arange(room, len(chunk.samples))
                parts.append(self._take(stage, chunk, head))
                queue[0] = self._take(stage, chunk, tail)
            rows += len(parts[-1].samples)
        if len(parts) == 1:
            return parts[0]
        try:
            data = (np.concatenate([p.data for p in parts]) if stage == self.first
                    else self.runner.concat([p.data for p in parts]))
            state = np.concatenate([p.state for p in parts])
        except Exception:  # chunks that cannot join (rows of another shape): the first runs alone, the rest wait;
            queue.extendleft(reversed(parts[1:]))  # a chunk that cannot run fails its own samples in `_run`, never
            return parts[0]  # the worker, which an exception here (under the lock, outside `_run`) would end
        return _Chunk(data, state, [s for p in parts for s in p.samples])

    def _take(self, stage: int, chunk: _Chunk, rows: np.ndarray) -> _Chunk:
        data = chunk.data[rows] if stage == self.first else self.runner.take(chunk.data, rows)
        return _Chunk(data, chunk.state[rows], [chunk.samples[i] for i in rows])

    def _live(self, stage: int, chunk: _Chunk) -> _Chunk | None:
        """The chunk without samples whose client left or whose deadline passed (those are settled here)."""
        now = time.monotonic()
        gone = [s.future.cancelled() for s in chunk.samples]
        late = [not g and now > s.deadline for g, s in zip(gone, chunk.samples)]
        if not any(gone) and not any(late):
            return chunk
        if any(gone):
            self.observer.dropped("disconnected", sum(gone))
            self._finish([s for s, g in zip(chunk.samples, gone) if g])
        if any(late):
            self.observer.dropped("timeout", sum(late))
            self._finish([s for s, t in zip(chunk.samples, late) if t], error=Expired("deadline passed"))
        keep = np.flatnonzero(~(np.array(gone) | np.array(late)))
        return self._take(stage, chunk, keep) if len(keep) else None

    def _run(self, stage: int, chunk: _Chunk) -> None:
        """Stage `stage` on `chunk`, then (request-level) every later stage on its survivors. A batch that fails
        (a broken model) fails its own samples, never the server."""
        done: list[tuple[Sample, Answer]] = []
        answer_now = self.config.schedule != "request-level"
        for k in range(stage, self.last + 1):
            chunk = self._live(k, chunk)
            if chunk is None:
                break
            try:
                survivors, answers = self._stage(k, chunk)
            except Exception as e:
                self.failures(e)
                self._finish(chunk.samples, error=e)
                break
            if answer_now:
                self._answer(answers)
            else:
                done += answers
            if survivors is None:
                break
            if k == self.last:
                try:
                    self.forward(self.runner.to_numpy(survivors.data), survivors.state, survivors.samples)
                except Exception as e:
                    self.failures(e)
                    self._finish(survivors.samples, error=e)
                else:
                    self._settled(len(survivors.samples))
                break
            if answer_now:
                with self._cond:
                    self.queues[k + 1].append(survivors)
                    if sum(1 for q in self.queues.values() if q) > 1:  # this worker takes one queue next; an idle
                        self._cond.notify()  # one is woken only for another (a futile wake costs both of them CPU)
                break
            chunk = survivors
        self._answer(done)

    def _stage(self, k: int, chunk: _Chunk) -> tuple[_Chunk | None, list[tuple[Sample, Answer]]]:
        """Stage k for the chunk: the survivors (None: nobody stays) and the answers of those that leave."""
        features = (chunk.data if k != self.first else
                    self.runner.to_input(chunk.data) if self.first == 0 else self.runner.from_numpy(chunk.data))
        start = time.perf_counter()
        out = self.runner.step(k, features, chunk.state)
        self.observer.batch(k, len(chunk.samples), time.perf_counter() - start)
        answers = []
        if out.leave is None:
            stay = np.ones(len(chunk.samples), dtype=bool)
        else:
            leaving = np.flatnonzero(out.leave)
            answers = [(chunk.samples[i], Answer(k, int(out.predictions[i]), float(out.probabilities[i])))
                       for i in leaving]
            self.observer.left(k, len(leaving))
            stay = ~out.leave
        rows = np.flatnonzero(stay)
        if not len(rows):
            return None, answers
        features = out.features if len(rows) == len(stay) else self.runner.take(out.features, rows)
        return _Chunk(features, out.state[rows], [chunk.samples[i] for i in rows]), answers

    def _answer(self, answers: list[tuple[Sample, Answer]]) -> None:
        for sample, answer in answers:
            settle(sample, answer)
        self._settled(len(answers))

    def _finish(self, samples: list[Sample], error: Exception | None = None) -> None:
        if error is not None:
            for s in samples:
                settle(s, error=error)
        self._settled(len(samples))

    def _settled(self, n: int) -> None:
        if n:
            with self._cond:
                self._inside -= n
                if not self._accepting:
                    self._cond.notify_all()  # closing: every worker sees the last sample go
