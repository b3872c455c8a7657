"""The stage-level batcher, on a fake numpy runner whose every decision is known in advance.

A sample is one number d (its "difficulty"): it leaves at exit d, predicting class 10 * d + its row's
value mod 10. The fake records every stage call, so re-batching, dropping and forwarding are visible.
"""
import threading
import time
from concurrent.futures import wait

import numpy as np
import pytest

from exitwise.deploy.runner import StepOut
from exitwise.config import SchedulerConfig
from exitwise.deploy.scheduler import Answer, Expired, Observer, QueueFull, Scheduler, TooLarge
from exitwise.errors import UserError

from conftest import until


class FakeRunner:
    num_exits, input_shape, class_names, name, platform = 4, (1, 1, 1), None, "fake", "numpy"

    def __init__(self):
        self.calls: list[tuple[int, int]] = []   # (stage, rows) of every step
        self.entered: list[int] = []              # the stage of every step begun (before the gate)
        self.gate = threading.Event()            # step waits for it (set: no waiting)
        self.gate.set()

    def to_input(self, images):
        return images.reshape(len(images), 1).astype(np.float64)

    def init_state(self, n):
        return np.zeros((n, 1), dtype=np.int64)

    def step(self, k, features, state):
        self.entered.append(k)
        self.gate.wait(10)
        self.calls.append((k, len(features)))
        d = features[:, 0].astype(int) % 4
        leave = d <= k if k < 3 else np.ones(len(d), dtype=bool)
        return StepOut(features + 100, leave, (features[:, 0] % 10 + 10 * k).astype(np.int64),
                       np.full(len(d), 0.5, dtype=np.float32), state + 1)

    def take(self, features, rows):
        return features[rows]

    def concat(self, parts):
        return np.concatenate(parts)

    def to_numpy(self, features):
        return features

    def from_numpy(self, array):
        return array


def two_batches(schedule: str) -> list[tuple[int, int]]:
    """The stage calls for two batches of [1, 1, 0, 0] under `schedule`, the second arriving while stage 0 runs
    the first; one worker, so the order of the calls is the rule's alone."""
    runner = FakeRunner()
    runner.gate.clear()  # the first batch blocks in stage 0 while the second arrives
    scheduler = Scheduler(runner, SchedulerConfig(max_batch=4, schedule=schedule, workers=1)).start()
    first = scheduler.submit(images([1, 1, 0, 0]))
    until(lambda: runner.entered)  # the first batch is in stage 0
    second = scheduler.submit(images([1, 1, 0, 0]))
    runner.gate.set()
    results(first + second)
    scheduler.close(5)
    return runner.calls


class Counts(Observer):
    def __init__(self):
        self.batches, self.exits, self.drops = [], {}, {}

    def batch(self, stage, rows, seconds):
        assert seconds >= 0
        self.batches.append((stage, rows))

    def left(self, exit, rows):
        self.exits[exit] = self.exits.get(exit, 0) + rows

    def dropped(self, reason, rows):
        self.drops[reason] = self.drops.get(reason, 0) + rows


def images(values):
    return np.asarray(values, dtype=np.uint8).reshape(-1, 1, 1, 1)


def results(futures, timeout=10):
    done, pending = wait(futures, timeout)
    assert not pending
    return [f.result() for f in futures]


@pytest.mark.parametrize("rule", ["deepest", "oldest", "request-level"])
def test_every_sample_leaves_at_its_own_exit_under_every_rule(rule):
    runner = FakeRunner()
    scheduler = Scheduler(runner, SchedulerConfig(max_batch=8, schedule=rule)).start()
    values = np.arange(40) % 256
    answers = results(scheduler.submit(images(values)))
    assert [a.exit for a in answers] == list(values % 4)
    assert max(rows for _, rows in runner.calls) <= 8  # no stage call over max_batch
    # the prediction is made from the features at the exit taken: 100 added per stage run before it
    assert [a.prediction for a in answers] == [(v + 100 * (v % 4)) % 10 + 10 * (v % 4) for v in values]
    assert scheduler.close(5) and scheduler.inside == 0


def test_under_deepest_survivors_of_different_batches_run_together_at_the_next_stage():
    # stage 0 ran each batch of 4; the two survivors of each met at stage 1 as one batch of 4
    assert two_batches("deepest") == [(0, 4), (0, 4), (1, 4)]


def test_under_oldest_the_earliest_samples_go_on_first():
    # the first batch's two survivors are older than the second batch: they run stage 1 before it runs stage 0
    assert two_batches("oldest") == [(0, 4), (1, 2), (0, 4), (1, 2)]


def test_request_level_runs_each_batch_to_the_end_before_the_next():
    assert two_batches("request-level") == [(0, 4), (1, 2), (0, 4), (1, 2)]


class HeldAtStage1(FakeRunner):
    """Stage 1 waits for `release` (stage 0 runs freely)."""

    def __init__(self):
        super().__init__()
        self.reached, self.release = threading.Event(), threading.Event()

    def step(self, k, features, state):
        if k == 1:
            self.reached.set()
            self.release.wait(10)
        return super().step(k, features, state)


@pytest.mark.parametrize("rule, at_once", [("deepest", True), ("oldest", True), ("request-level", False)])
def test_a_sample_that_leaves_early_is_answered_at_once_except_under_request_level(rule, at_once):
    runner = HeldAtStage1()
    scheduler = Scheduler(runner, SchedulerConfig(max_batch=4, schedule=rule, workers=1)).start()
    left, stays = scheduler.submit(images([0, 1]))  # 0 leaves at exit 0; 1 goes on to stage 1, held there
    until(runner.reached.is_set)  # an answer given at once was settled before stage 1 began, on the same thread
    assert left.done() == at_once  # request-level answers a batch when its last sample is done
    runner.release.set()
    assert [a.exit for a in results([left, stays])] == [0, 1]
    assert scheduler.close(5)


def test_later_stages_never_wait_for_a_full_batch():
    runner = FakeRunner()
    scheduler = Scheduler(runner, SchedulerConfig(max_batch=4, max_wait_ms=60_000)).start()
    answers = results(scheduler.submit(images([1, 1, 0, 0])), timeout=10)  # stage 0 full; 2 go on to stage 1 alone
    assert [a.exit for a in answers] == [1, 1, 0, 0] and runner.calls == [(0, 4), (1, 2)]
    assert scheduler.close(5)


def test_the_first_stage_waits_for_a_full_batch_at_most_max_wait():
    runner = FakeRunner()
    scheduler = Scheduler(runner, SchedulerConfig(max_batch=3, max_wait_ms=300)).start()
    a = scheduler.submit(images([0]))
    time.sleep(0.05)
    b = scheduler.submit(images([0, 0]))  # the batch is full now: it runs at once
    results(a + b, timeout=0.2)
    start = time.monotonic()
    results(scheduler.submit(images([0])), timeout=2)  # alone: it runs when its wait is over
    assert time.monotonic() - start >= 0.25
    assert runner.calls == [(0, 3), (0, 1)]
    scheduler.close(5)


def test_a_submission_may_set_a_sooner_deadline_which_ends_its_wait_for_a_full_batch():
    runner = FakeRunner()
    scheduler = Scheduler(runner, SchedulerConfig(max_batch=8, max_wait_ms=60_000, timeout_ms=60_000)).start()
    patient = scheduler.submit(images([0]))
    start = time.monotonic()
    hurried = scheduler.submit(images([0, 0]), timeout_ms=100)  # behind a sample that may wait a minute
    with pytest.raises(Expired):
        hurried[0].result(10)
    assert 0.09 <= time.monotonic() - start < 5 and isinstance(hurried[1].exception(1), Expired)
    assert not patient[0].done() and runner.calls == []  # the first sample waits on for its batch
    later = scheduler.submit(images([0]), timeout_ms=10**9)  # later than the config's: the config's holds
    assert max(s.deadline - s.arrival for c in scheduler.queues[0] for s in c.samples) == pytest.approx(60.0)
    scheduler.close(5)  # no more waiting for full batches: the two left are answered together
    assert all(isinstance(a, Answer) for a in results(patient + later)) and runner.calls[0] == (0, 2)


def test_a_full_queue_refuses_at_once_and_a_closed_one_too():
    runner = FakeRunner()
    runner.gate.clear()
    counts = Counts()
    scheduler = Scheduler(runner, SchedulerConfig(max_batch=2, max_queue=4), observer=counts).start()
    held = scheduler.submit(images([0, 0, 0]))
    with pytest.raises(QueueFull):
        scheduler.submit(images([0, 0]))
    assert counts.drops == {"queue_full": 2}
    with pytest.raises(TooLarge, match="5 samples; at most 4"):  # never fits, full or not: no retry helps
        scheduler.submit(images([0] * 5))
    assert counts.drops == {"queue_full": 2} and scheduler.inside == 3
    runner.gate.set()
    results(held)
    scheduler.close(5)
    with pytest.raises(QueueFull):
        scheduler.submit(images([0]))


def test_late_and_abandoned_samples_are_dropped_before_the_next_stage():
    runner = FakeRunner()
    runner.gate.clear()
    counts = Counts()
    scheduler = Scheduler(runner, SchedulerConfig(max_batch=8, timeout_ms=200), observer=counts).start()
    futures = scheduler.submit(images([3, 3, 3, 3]))  # all would run every stage
    until(lambda: runner.entered)
    futures[0].cancel()  # its client went away while stage 0 ran
    time.sleep(0.3)      # and the others' deadline passes
    runner.gate.set()
    wait(futures[1:], 5)
    assert all(isinstance(f.exception(), Expired) for f in futures[1:])
    assert counts.drops == {"disconnected": 1, "timeout": 3}
    assert runner.calls == [(0, 4)]  # nobody ran stage 1
    assert scheduler.close(5) and scheduler.inside == 0


def test_a_stage_range_forwards_its_survivors_to_the_next_tier():
    """Tier A runs stages 0-1 and forwards the rest's features; tier B runs 2-3 on them: the same answers as one."""
    lower, upper = FakeRunner(), FakeRunner()
    tier_b = Scheduler(upper, SchedulerConfig(first=2)).start()

    def forward(features, state, samples):
        assert state[:, 0].tolist() == [2] * len(samples)  # the policy state travels with the features
        for sample, future in zip(samples, tier_b.submit_features(features, state)):
            future.add_done_callback(lambda f, s=sample: s.future.set_result(f.result()))

    tier_a = Scheduler(lower, SchedulerConfig(last=1), forward=forward).start()
    values = np.arange(20)
    answers = results(tier_a.submit(images(values)))
    whole = Scheduler(FakeRunner()).start()
    assert answers == results(whole.submit(images(values)))
    assert {k for k, _ in lower.calls} == {0, 1} and {k for k, _ in upper.calls} == {2, 3}
    for s in (tier_a, tier_b, whole):
        assert s.close(5)


def test_a_range_that_stops_early_needs_a_forward_and_a_failing_batch_fails_only_its_samples(caplog):
    with pytest.raises(UserError, match="give a forward callback"):
        Scheduler(FakeRunner(), SchedulerConfig(last=1))
    with pytest.raises(UserError, match="not within"):
        Scheduler(FakeRunner(), SchedulerConfig(first=2, last=7), forward=lambda *a: None)
    runner = FakeRunner()
    scheduler = Scheduler(runner, SchedulerConfig()).start()
    good_step = runner.step
    runner.step = lambda k, f, s: (_ for _ in ()).throw(RuntimeError("broken"))
    bad = scheduler.submit(images([0, 1]))
    wait(bad, 5)
    assert all(isinstance(f.exception(), RuntimeError) for f in bad)
    wait(scheduler.submit(images([0])), 5)  # a broken model fails every batch: logged once, with its traceback
    logged = [r for r in caplog.records if r.name == "exitwise.serve"]
    assert len(logged) == 1 and "a stage call failed" in logged[0].getMessage() and logged[0].exc_info
    runner.step = good_step
    assert results(scheduler.submit(images([0]))) == [Answer(0, 0, 0.5)]
    assert scheduler.close(5) and scheduler.inside == 0


def test_chunks_that_cannot_join_run_one_by_one_and_the_worker_lives_on():
    runner = FakeRunner()
    runner.gate.clear()  # the first submission blocks in stage 1 while the two others queue together
    scheduler = Scheduler(runner, SchedulerConfig(max_batch=8, workers=1, first=1)).start()
    state = lambda n: np.zeros((n, 1), dtype=np.int64)
    first = scheduler.submit_features(np.zeros((1, 1)), state(1))
    until(lambda: runner.entered)
    odd = scheduler.submit_features(np.zeros((2, 3)), state(2))  # another shape: np.concatenate refuses to join
    plain = scheduler.submit_features(np.zeros((2, 1)), state(2))
    runner.gate.set()
    assert results(first + plain + odd, 5) == [Answer(1, 10, 0.5)] * 5  # each chunk in a call of its own
    assert results(scheduler.submit_features(np.zeros((1, 1)), state(1))) == [Answer(1, 10, 0.5)]  # still serves
    assert scheduler.close(5) and scheduler.inside == 0


@pytest.mark.parametrize("bad", [np.zeros((2, 1, 2, 1), dtype=np.uint8),    # another size
                                 np.zeros((2, 1, 1, 1), dtype=np.float32),  # float pixels, read as 0-255 by a runner
                                 np.zeros((2, 1, 1), dtype=np.uint8),       # one image's worth of dimensions short
                                 [[[[0]]]]])                                # not a numpy array
def test_images_a_runner_cannot_take_are_refused_at_submit_and_the_scheduler_serves_on(bad):
    scheduler = Scheduler(FakeRunner(), SchedulerConfig(max_batch=8)).start()
    with pytest.raises(UserError, match=r"images must be a numpy array of uint8 \(N, 1, 1, 1\) pixels, got "):
        scheduler.submit(bad)
    assert results(scheduler.submit(images([0, 1]))) == [Answer(0, 0, 0.5), Answer(1, 11, 0.5)]
    assert scheduler.close(5) and scheduler.inside == 0


def test_a_caller_may_give_its_own_futures_and_the_scheduler_settles_those():
    class Slot:  # the least a sample's future must do
        def __init__(self):
            self.outcome, self.event = None, threading.Event()

        def done(self):
            return self.outcome is not None

        def cancelled(self):
            return False

        def set_result(self, answer):
            self.outcome = answer
            self.event.set()

        set_exception = set_result

    scheduler = Scheduler(FakeRunner()).start()
    slots = [Slot(), Slot()]
    assert scheduler.submit(images([0, 2]), slots) == slots
    assert all(s.event.wait(5) for s in slots)
    assert [(s.outcome.exit, s.outcome.prediction) for s in slots] == [(0, 0), (2, 22)]
    with pytest.raises(ValueError):
        scheduler.submit(images([1]), [Slot(), Slot()])
    scheduler.close(5)


def test_close_answers_what_was_accepted():
    runner = FakeRunner()
    scheduler = Scheduler(runner, SchedulerConfig(max_batch=64, max_wait_ms=60_000)).start()
    futures = scheduler.submit(images([3, 2, 1]))  # would wait a minute for a full batch
    assert scheduler.close(5)
    assert [f.result(0).exit for f in futures] == [3, 2, 1]


def test_samples_waiting_for_a_batch_to_fill_leave_at_their_deadline_and_free_their_place():
    runner, counts = FakeRunner(), Counts()
    config = SchedulerConfig(max_batch=64, max_wait_ms=60_000, max_queue=2, timeout_ms=200)
    scheduler = Scheduler(runner, config, observer=counts).start()
    late = scheduler.submit(images([3, 3]))  # a batch of 64 never fills
    wait(late, 5)
    assert all(isinstance(f.exception(), Expired) for f in late) and scheduler.inside == 0
    assert counts.drops == {"timeout": 2} and runner.calls == []
    assert len(scheduler.submit(images([1, 1]))) == 2  # their places are free again
    scheduler.close(5)


def test_two_workers_run_two_stage_calls_at_once_and_answer_as_one_does():
    runner = FakeRunner()
    runner.gate.clear()  # every stage call blocks until the gate opens
    scheduler = Scheduler(runner, SchedulerConfig(max_batch=4, workers=2)).start()
    futures = scheduler.submit(images([1, 1, 0, 0])) + scheduler.submit(images([3, 2, 1, 0]))
    until(lambda: len(runner.entered) >= 2)
    assert runner.entered == [0, 0]  # both batches are in stage 0 at once
    runner.gate.set()
    assert [a.exit for a in results(futures)] == [1, 1, 0, 0, 3, 2, 1, 0]
    assert scheduler.close(5) and scheduler.inside == 0 and not scheduler.accepting


@pytest.mark.parametrize("field, value, message", [
    ("max_batch", 0, "--max-batch must be at least 1, got 0"),
    ("max_queue", -3, "--max-queue must be at least 1, got -3"),
    ("workers", 0, "--workers must be at least 1, got 0"),
    ("max_wait_ms", -1.5, "--max-wait-ms must be at least 0 and finite, got -1.5"),
    ("max_wait_ms", float("inf"), "--max-wait-ms must be at least 0 and finite, got inf"),
    ("timeout_ms", 0, "--timeout-ms must be above 0 and finite, got 0"),
    ("timeout_ms", float("nan"), "--timeout-ms must be above 0 and finite, got nan"),
    ("timeout_ms", float("inf"), "--timeout-ms must be above 0 and finite, got inf")])
def test_a_bad_batching_setting_is_refused_by_its_flag_and_value(field, value, message):
    with pytest.raises(UserError, match=f"^{message}$"):
        SchedulerConfig(**{field: value})


def test_unexpected_failures_are_logged_at_most_once_an_interval_saying_how_many_were_not(caplog):
    from exitwise.deploy import scheduler as module
    clock = [100.0]
    log = module.FailureLog("a stage call", clock=lambda: clock[0])
    for seconds in (0, 1, 2, module.FAILURE_LOG_S + 1):
        clock[0] = 100.0 + seconds
        log(RuntimeError("broken"))
    messages = [r.getMessage() for r in caplog.records if r.name == "exitwise.serve"]
    assert messages == ["exitwise: a stage call failed",
                        "exitwise: a stage call failed (2 more since the last one logged)"]
