"""Exponential backoff: the one formula behind every retry loop in the adapters (the processor
client, the SMS dispatcher, the webhook dispatcher, the outbox relay).

The delay before retry ``attempt`` (0 for the first retry) is ``base_s * 2**attempt``, at most
``cap_s``, multiplied by a factor drawn uniformly from ``jitter = (low, high)``. Jitter spreads
out callers that failed together (an outage ends for all of them at once), so they do not all
come back in the same instant; each caller picks its range:

- ``NO_JITTER`` (1, 1): the plain doubling, for tests and for callers that want it exact.
- ``EQUAL_JITTER`` (0.5, 1): half the step fixed, half random: spread out, but never a retry
  at once.
- ``(1 - f, 1)``: up to the fraction ``f`` taken off, never above the cap.
- ``(1 - f, 1 + f)``: around the step, so up to ``f`` above the cap too.
"""

from __future__ import annotations

import random

__all__ = ["EQUAL_JITTER", "NO_JITTER", "backoff_s"]

NO_JITTER = (1.0, 1.0)
EQUAL_JITTER = (0.5, 1.0)

# 2.0 ** 1024 overflows a float (an OverflowError, not inf); past this the step is above any
# cap anyway, so a caller counting attempts without bound (the relay) never needs to stop.
_MAX_EXPONENT = 1023


def backoff_s(
    attempt: int,
    *,
    base_s: float,
    cap_s: float,
    jitter: tuple[float, float] = NO_JITTER,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry ``attempt`` (0-based: 0 waits about ``base_s``).

    ``rng`` makes the jitter reproducible (tests); without it the module's generator is used.
    A negative ``attempt`` counts as 0.
    """
    low, high = jitter
    assert 0 <= low <= high, f"jitter is a (low, high) factor range, got {jitter}"
    assert base_s >= 0 and cap_s >= 0, "delays are not negative"
    step = min(cap_s, base_s * 2.0 ** min(max(attempt, 0), _MAX_EXPONENT))
    if low == high:
        return step * low
    uniform = rng.uniform if rng is not None else random.uniform
    return step * uniform(low, high)
