"""CircuitBreaker: closed -> open after N consecutive failures, open rejects, half-open lets one
trial through, the trial's result closes or reopens; time from a stepped clock."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from adapters.processors.circuit_breaker import CircuitBreaker, CircuitState


class SteppedClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> SteppedClock:
    return SteppedClock()


def breaker(
    clock: SteppedClock, threshold: int = 3, reset_s: float = 10.0, **kwargs: Any
) -> CircuitBreaker:
    return CircuitBreaker(failure_threshold=threshold, reset_timeout_s=reset_s, clock=clock, **kwargs)


def fail(b: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        assert b.try_acquire()
        b.record_failure()


def test_closed_lets_every_call_through_and_opens_after_threshold_consecutive_failures(
    clock: SteppedClock,
) -> None:
    b = breaker(clock)
    assert b.state == CircuitState.CLOSED
    fail(b, 2)
    assert b.state == CircuitState.CLOSED and b.consecutive_failures == 2
    fail(b, 1)
    assert b.state == CircuitState.OPEN
    assert not b.try_acquire() and not b.is_available()


def test_a_success_resets_the_consecutive_failure_count(clock: SteppedClock) -> None:
    b = breaker(clock)
    fail(b, 2)
    assert b.try_acquire()
    b.record_success()
    fail(b, 2)
    assert b.state == CircuitState.CLOSED


def test_open_rejects_until_the_reset_timeout_then_half_open_admits_exactly_one_trial(
    clock: SteppedClock,
) -> None:
    b = breaker(clock)
    fail(b, 3)
    clock.advance(9.999)
    assert b.state == CircuitState.OPEN and not b.try_acquire()
    clock.advance(0.001)
    assert b.state == CircuitState.HALF_OPEN
    assert b.is_available()
    assert b.try_acquire()  # the trial
    assert not b.is_available() and not b.try_acquire()  # only one at a time


def test_a_successful_trial_closes_the_circuit(clock: SteppedClock) -> None:
    b = breaker(clock)
    fail(b, 3)
    clock.advance(10)
    assert b.try_acquire()
    b.record_success()
    assert b.state == CircuitState.CLOSED and b.consecutive_failures == 0
    assert b.try_acquire() and b.try_acquire()


def test_a_failed_trial_reopens_and_restarts_the_cool_down(clock: SteppedClock) -> None:
    b = breaker(clock)
    fail(b, 3)
    clock.advance(10)
    assert b.try_acquire()
    clock.advance(2)
    b.record_failure()
    assert b.state == CircuitState.OPEN
    clock.advance(9)
    assert b.state == CircuitState.OPEN  # 9 s after the trial failed, not 11 s after opening
    clock.advance(1)
    assert b.state == CircuitState.HALF_OPEN


def test_results_reported_while_open_are_ignored(clock: SteppedClock) -> None:
    b = breaker(clock, threshold=1)
    assert b.try_acquire() and b.try_acquire()  # two calls in flight
    b.record_failure()
    b.record_success()  # the straggler admitted before the circuit opened
    assert b.state == CircuitState.OPEN


def test_a_trial_that_never_reports_is_presumed_lost_after_the_reset_timeout(clock: SteppedClock) -> None:
    b = breaker(clock)
    fail(b, 3)
    clock.advance(10)
    assert b.try_acquire()
    clock.advance(10)
    assert b.try_acquire()  # another trial; the breaker cannot stay half-open forever


def test_state_changes_are_reported_to_the_listener(clock: SteppedClock) -> None:
    seen: list[tuple[str, str]] = []
    b = breaker(clock, on_state_change=lambda br, old, new: seen.append((old.value, new.value)))
    fail(b, 3)
    clock.advance(10)
    assert b.try_acquire()
    b.record_success()
    assert seen == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_threshold_and_timeout_are_checked() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker(reset_timeout_s=-1)


def test_concurrent_callers_in_half_open_get_exactly_one_trial(clock: SteppedClock) -> None:
    b = breaker(clock)
    fail(b, 3)
    clock.advance(10)
    start = threading.Barrier(16)
    granted: list[bool] = []
    lock = threading.Lock()

    def contend() -> None:
        start.wait()
        ok = b.try_acquire()
        with lock:
            granted.append(ok)

    threads = [threading.Thread(target=contend) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert granted.count(True) == 1


def test_concurrent_failures_open_the_circuit_exactly_once(clock: SteppedClock) -> None:
    opened: list[int] = []
    b = breaker(clock, threshold=50, on_state_change=lambda br, old, new: opened.append(1))

    def hammer() -> None:
        for _ in range(10):
            if b.try_acquire():
                b.record_failure()

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert b.state == CircuitState.OPEN and opened == [1]
