"""interlock.core.retry without I/O: the delays, when a retry gives up, what is tried again."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from interlock.core import retry as retry_module
from interlock.core.retry import Backoff, Retry, retrying, spread


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def slept(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every delay the helper asks for, without waiting for it."""
    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float) -> None:
        delays.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(retry_module, "sleep", sleep)  # this module's waits only, never the loop's
    return delays


def test_exponential_backoff_doubles_up_to_its_cap() -> None:
    backoff = Backoff(first=0.05, cap=1.0)
    assert [backoff.delay(n) for n in range(7)] == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert backoff.delay(10_000) == 1.0  # no overflow far past the cap


def test_linear_backoff_grows_by_its_step() -> None:
    backoff = Backoff(first=0.001, cap=0.05, growth=1.0, step=0.001)
    assert [backoff.delay(n) for n in (0, 1, 2, 48, 49, 500)] == pytest.approx([0.001, 0.002, 0.003, 0.049, 0.05, 0.05])


@pytest.mark.parametrize("bad", [dict(first=-1.0, cap=1.0), dict(first=0.1, cap=1.0, growth=0.5),
                                 dict(first=0.1, cap=1.0, step=-0.1)])
def test_a_shrinking_or_negative_backoff_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must not shrink"):
        Backoff(**bad)


def test_spread_stretches_by_at_most_six_sevenths_and_is_stable_per_key() -> None:
    values = {spread(0.7, f"run-{i}") for i in range(200)}
    assert min(values) >= 0.7 and max(values) <= 0.7 * (1 + 6 / 7) + 1e-12
    assert len(values) > 1  # different keys come back at different times
    assert spread(0.7, "run-1") == spread(0.7, "run-1")


def test_retry_gives_up_after_its_attempts() -> None:
    retry = Retry(Backoff(first=0.2, cap=2.0), attempts=3)
    delays = []
    while not retry.exhausted:  # each turn: a failed try, then a wait
        delays.append(retry.next_delay())
    assert delays == pytest.approx([0.2, 0.4])  # three tries, two waits between them
    assert retry.failures == 2


def test_retry_gives_up_at_its_deadline() -> None:
    clock = FakeClock()
    retry = Retry(Backoff(first=1.0, cap=1.0), patience=5.0, clock=clock)
    clock.now += 5.0
    assert not retry.exhausted  # the deadline itself still allows a try
    clock.now += 0.001
    assert retry.exhausted


def test_retry_without_bounds_never_gives_up() -> None:
    retry = Retry(Backoff(first=0.0, cap=0.0))
    for _ in range(1000):
        retry.next_delay()
    assert not retry.exhausted


def test_zero_attempts_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Retry(Backoff(first=0.1, cap=1.0), attempts=0)


async def test_retrying_tries_passing_failures_again_with_growing_delays(slept: list[float],
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 4:
            raise TimeoutError(f"try {calls}")
        return "done"

    with caplog.at_level(logging.WARNING):
        assert await retrying(flaky, what="saying hello", backoff=Backoff(first=0.1, cap=0.3),
                              passing=(TimeoutError,), attempts=10) == "done"
    assert calls == 4
    assert slept == pytest.approx([0.1, 0.2, 0.3])
    assert [r.getMessage() for r in caplog.records] == [
        f"saying hello failed (TimeoutError('try {n}')); retrying" for n in (1, 2, 3)]


async def test_retrying_raises_the_last_failure_when_attempts_run_out(slept: list[float]) -> None:
    calls = 0

    async def down() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError(f"try {calls}")

    with pytest.raises(ConnectionError, match="try 3"):
        await retrying(down, what="x", backoff=Backoff(first=0.1, cap=1.0), attempts=3)
    assert calls == 3 and len(slept) == 2


async def test_retrying_stops_at_once_on_a_failure_that_is_not_passing(slept: list[float]) -> None:
    calls = 0

    async def broken() -> None:
        nonlocal calls
        calls += 1
        raise KeyError("config")

    with pytest.raises(KeyError):
        await retrying(broken, what="x", backoff=Backoff(first=0.1, cap=1.0), passing=(TimeoutError,))
    assert calls == 1 and slept == []


async def test_retrying_takes_a_predicate(slept: list[float]) -> None:
    codes = iter([10158, 10158, 10071])

    class APIError(Exception):
        def __init__(self, code: int) -> None:
            self.code = code

    async def publish() -> None:
        raise APIError(next(codes))

    with pytest.raises(APIError) as info:
        await retrying(publish, what="publish", backoff=Backoff(first=0.05, cap=1.0),
                       passing=lambda e: isinstance(e, APIError) and e.code == 10158)
    assert info.value.code == 10071 and len(slept) == 2


async def test_retrying_is_bounded_by_patience(slept: list[float]) -> None:
    clock = FakeClock()
    calls = 0

    async def slow() -> None:
        nonlocal calls
        calls += 1
        clock.now += 2.0  # each try takes 2 s
        raise TimeoutError

    with pytest.raises(TimeoutError):
        await retrying(slow, what="x", backoff=Backoff(first=0.0, cap=0.0), patience=5.0, clock=clock)
    assert calls == 3  # tries end at 102, 104 and 106: past 105, give up
