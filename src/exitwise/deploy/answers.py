"""Answers from the scheduler's threads to the event loop: how a request of the HTTP server (or a tier's features
from the tier before) waits for its samples.

Each sample's future is a `Slot`: what the scheduler needs of a future (`done`, `cancelled`, `set_result`,
`set_exception`), settled once on a scheduler or forwarding thread and handed to the event loop a batch at a time
(`Handoff`: the first slot settled after a delivery schedules the next, which takes every slot settled meanwhile;
one wake-up of the loop for a stage call's answers, where a `concurrent.futures.Future` per sample had cost its
lock, a callback and a thread-safe call each). `Answers.wait` submits a request's samples and waits for the first
of: every answer, the client leaving, the deadline.
"""
from __future__ import annotations

import asyncio
import collections
from typing import Callable


class Waiting:
    """A request waiting for its samples, on the event loop: how many are still out, and `ended`, which resolves
    to why the wait ended ("answered", "gone", "late")."""
    __slots__ = ("left", "ended")

    def __init__(self, n: int, ended: asyncio.Future):
        self.left, self.ended = n, ended

    def end(self, why: str) -> None:
        if not self.ended.done():
            self.ended.set_result(why)


class Handoff:
    """Settled `Slot`s from any thread to the event loop `loop`, a batch per wake-up."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.settled, self.scheduled = loop, collections.deque(), False

    def put(self, slot: Slot) -> None:  # any thread
        self.settled.append(slot)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon_threadsafe(self.deliver)

    def deliver(self) -> None:  # the event loop
        self.scheduled = False  # before draining: a slot put from here on schedules another delivery
        settled = self.settled
        while settled:
            waiting = settled.popleft().waiting
            waiting.left -= 1
            if waiting.left == 0:
                waiting.end("answered")


class Slot:
    """One sample's future as the scheduler uses it (`Sample.future`): settled once, with an `Answer` or an
    exception (its `outcome`); cancelled by the event loop when its client goes away."""
    __slots__ = ("waiting", "handoff", "outcome", "_cancelled")

    def __init__(self, waiting: Waiting, handoff: Handoff):
        self.waiting, self.handoff, self.outcome, self._cancelled = waiting, handoff, None, False

    def done(self) -> bool:
        return self._cancelled or self.outcome is not None

    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        self._cancelled = True

    def set_result(self, answer) -> None:
        if self.outcome is None:
            self.outcome = answer
            self.handoff.put(self)

    def set_exception(self, error: BaseException) -> None:
        self.set_result(error)


class Answers:
    """An app's way to wait for its samples; its `Handoff` is made for the event loop serving the app, on that
    loop's first request (a slot keeps the one it was made with)."""

    def __init__(self):
        self.handoff: Handoff | None = None

    async def wait(self, submit: Callable[[list[Slot]], object], n: int, seconds: float,
                   on_disconnect: Callable[[Callable[[str], None]], Callable[[], None]] | None = None
                   ) -> tuple[str, list]:
        """`submit(slots)` (its errors are the caller's), then (why the wait ended, each sample's outcome: an
        `Answer`, an exception, or None when unanswered). `on_disconnect(end)` calls `end("gone")` when the client
        leaves and returns the function that stops watching; the slots of a client gone are cancelled."""
        if n == 0:
            return "answered", []
        loop = asyncio.get_running_loop()
        if self.handoff is None or self.handoff.loop is not loop:
            self.handoff = Handoff(loop)
        waiting = Waiting(n, loop.create_future())
        slots = [Slot(waiting, self.handoff) for _ in range(n)]
        submit(slots)
        stop_watching = on_disconnect(waiting.end) if on_disconnect is not None else None
        late = loop.call_later(seconds, waiting.end, "late")
        try:
            why = await waiting.ended
        except asyncio.CancelledError:  # the waiter was cancelled (a gRPC stream the client cancelled): no one
            for s in slots:             # wants these answers any more
                s.cancel()
            raise
        finally:
            late.cancel()
            if stop_watching is not None:
                stop_watching()
        if why == "gone":
            for s in slots:
                s.cancel()
        return why, [s.outcome for s in slots]
