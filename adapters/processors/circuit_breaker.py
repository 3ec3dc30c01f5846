"""A per-processor circuit breaker: stop calling a processor that keeps failing, and probe it
with one trial call once a cool-down has passed.

    closed --(failure_threshold consecutive failures)--> open
    open --(reset_timeout_s elapsed)--> half_open: exactly one trial call is let through
    half_open --(trial succeeds)--> closed;  half_open --(trial fails)--> open (cool-down restarts)

Pure (no I/O) and thread-safe; time comes from an injected monotonic clock so tests can step it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from enum import StrEnum


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


StateListener = Callable[["CircuitBreaker", CircuitState, CircuitState], None]


class CircuitBreaker:
    """Callers ask ``try_acquire()`` before a call and report ``record_success()`` or
    ``record_failure()`` after it; every acquired call must report exactly once.

    A result reported while the circuit is open is ignored: it comes from a call admitted
    before the circuit opened and says nothing about the cool-down that is running. A trial
    that never reports (its caller crashed) is presumed lost after ``reset_timeout_s`` and
    another trial is allowed, so the breaker cannot stay half-open forever.
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        reset_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        name: str = "",
        on_state_change: StateListener | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be at least 1, got {failure_threshold}")
        if reset_timeout_s < 0:
            raise ValueError(f"reset_timeout_s must not be negative, got {reset_timeout_s}")
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self.name = name
        self._clock = clock
        self._on_state_change = on_state_change
        # Re-entrant so a state listener may read the breaker it is told about.
        self._lock = threading.RLock()
        self._state = CircuitState.CLOSED
        self._consecutive_failures = 0
        self._opened_at = 0.0
        self._trial_started_at: float | None = None

    # -- reading -------------------------------------------------------------------------------

    @property
    def state(self) -> CircuitState:
        with self._lock:
            return self._current_state()

    @property
    def consecutive_failures(self) -> int:
        with self._lock:
            return self._consecutive_failures

    def is_available(self) -> bool:
        """Would ``try_acquire()`` succeed now? Reserves nothing; routers use it to choose."""
        with self._lock:
            state = self._current_state()
            if state == CircuitState.CLOSED:
                return True
            if state == CircuitState.HALF_OPEN:
                return self._trial_free()
            return False

    # -- calling -------------------------------------------------------------------------------

    def try_acquire(self) -> bool:
        """Permission for one call: always when closed, never when open, and for a single
        trial at a time when half-open."""
        with self._lock:
            state = self._current_state()
            if state == CircuitState.CLOSED:
                return True
            if state == CircuitState.HALF_OPEN and self._trial_free():
                self._trial_started_at = self._clock()
                return True
            return False

    def record_success(self) -> None:
        with self._lock:
            state = self._current_state()
            if state == CircuitState.OPEN:
                return
            self._consecutive_failures = 0
            if state == CircuitState.HALF_OPEN:
                self._change(CircuitState.CLOSED)

    def record_failure(self) -> None:
        with self._lock:
            state = self._current_state()
            if state == CircuitState.OPEN:
                return
            if state == CircuitState.HALF_OPEN:
                self._open()
                return
            self._consecutive_failures += 1
            if self._consecutive_failures >= self.failure_threshold:
                self._open()

    # -- internals (hold the lock) -------------------------------------------------------------

    def _current_state(self) -> CircuitState:
        # Open turns half-open lazily, when someone looks after the cool-down has passed.
        if self._state == CircuitState.OPEN and self._clock() - self._opened_at >= self.reset_timeout_s:
            self._trial_started_at = None
            self._change(CircuitState.HALF_OPEN)
        return self._state

    def _trial_free(self) -> bool:
        return (
            self._trial_started_at is None
            or self._clock() - self._trial_started_at >= self.reset_timeout_s
        )

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._trial_started_at = None
        self._change(CircuitState.OPEN)

    def _change(self, new: CircuitState) -> None:
        old, self._state = self._state, new
        if new == CircuitState.CLOSED:
            self._trial_started_at = None
        if self._on_state_change is not None and old != new:
            self._on_state_change(self, old, new)

    def __repr__(self) -> str:
        return f"CircuitBreaker(name={self.name!r}, state={self._state.value})"
