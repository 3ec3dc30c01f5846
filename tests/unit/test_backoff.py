"""The one backoff formula (adapters/backoff.py), and each retry loop's parameters through it."""

from __future__ import annotations

import random

import pytest

from adapters.backoff import EQUAL_JITTER, NO_JITTER, backoff_s


@pytest.mark.parametrize(
    ("attempt", "base_s", "cap_s", "expected_s"),
    [
        (0, 1.0, 60.0, 1.0),
        (1, 1.0, 60.0, 2.0),
        (5, 1.0, 60.0, 32.0),
        (6, 1.0, 60.0, 60.0),  # 64 capped
        (-3, 1.0, 60.0, 1.0),  # a negative attempt counts as the first
        (10_000, 1.0, 60.0, 60.0),  # no overflow however long a loop has been failing
        (10_000, 1e-300, 60.0, 60.0),
        (3, 0.0, 60.0, 0.0),  # no backoff at all (tests)
        (0, 10.0, 5.0, 5.0),  # the cap wins over the base
        # The relay: 0.5 s doubling up to 30 s, by consecutive failed loops.
        (0, 0.5, 30.0, 0.5),
        (5, 0.5, 30.0, 16.0),
        (6, 0.5, 30.0, 30.0),
        # The webhook dispatcher's defaults: 30 s doubling up to an hour.
        (6, 30.0, 3600.0, 1920.0),
        (7, 30.0, 3600.0, 3600.0),
    ],
)
def test_the_delay_doubles_from_the_base_up_to_the_cap(
    attempt: int, base_s: float, cap_s: float, expected_s: float
) -> None:
    assert backoff_s(attempt, base_s=base_s, cap_s=cap_s) == expected_s
    assert backoff_s(attempt, base_s=base_s, cap_s=cap_s, jitter=NO_JITTER) == expected_s


@pytest.mark.parametrize(
    ("caller", "base_s", "cap_s", "jitter", "low", "high"),
    [
        # The processor client: equal jitter, half the step fixed.
        ("processor client", 0.1, 2.0, EQUAL_JITTER, 0.5, 1.0),
        # The SMS dispatcher and the relay: a fifth either way, so above the cap by up to a fifth.
        ("sms", 2.0, 300.0, (0.8, 1.2), 0.8, 1.2),
        ("relay", 0.5, 30.0, (0.8, 1.2), 0.8, 1.2),
        # The webhook dispatcher: up to its jitter (0.2) taken off, never above the cap.
        ("webhooks", 30.0, 3600.0, (0.8, 1.0), 0.8, 1.0),
    ],
)
def test_jitter_stays_within_each_callers_range_of_the_step(
    caller: str, base_s: float, cap_s: float, jitter: tuple[float, float], low: float, high: float
) -> None:
    rng = random.Random(caller)
    for attempt in range(20):
        step = min(cap_s, base_s * 2**attempt)
        delays = [backoff_s(attempt, base_s=base_s, cap_s=cap_s, jitter=jitter, rng=rng) for _ in range(200)]
        assert all(step * low <= delay <= step * high for delay in delays), caller
        assert max(delays) - min(delays) > step * (high - low) / 2, "the draws are spread over the range"


def test_a_seeded_generator_gives_the_same_delays() -> None:
    first = [backoff_s(n, base_s=1.0, cap_s=60.0, jitter=EQUAL_JITTER, rng=random.Random(7)) for n in range(6)]
    again = [backoff_s(n, base_s=1.0, cap_s=60.0, jitter=EQUAL_JITTER, rng=random.Random(7)) for n in range(6)]
    assert first == again


def test_without_jitter_the_generator_is_not_used() -> None:
    rng = random.Random(3)
    state = rng.getstate()
    backoff_s(2, base_s=1.0, cap_s=60.0, rng=rng)
    assert rng.getstate() == state
