"""One way to wait and try again: growing delays, bounded by a deadline or a number of tries.

Used wherever Interlock rides through something that passes (a stream-leader election, a
reconnect, a busy server at start-up, a conflicting writer): the event store's appends, plain
JetStream publishes, provisioning, consumer creation, redelivery delays.

    retry = Retry(Backoff(first=0.05, cap=1.0), patience=30.0)
    while True:
        try:
            return await do_it()
        except Passing:
            if retry.exhausted:
                raise
        await retry.wait()

or, when every failure of one kind is worth another try, :func:`retrying`.
"""

from __future__ import annotations

import logging
import time
from asyncio import sleep  # this module's name for it: tests replace only the retry waits
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Delay before try ``n + 1`` (``n`` from 0): ``min(cap, first * growth ** n + step * n)``.

    The default doubles; ``growth=1.0`` with a ``step`` grows linearly.
    """

    first: float
    cap: float
    growth: float = 2.0
    step: float = 0.0

    def __post_init__(self) -> None:
        if self.first < 0 or self.cap < 0 or self.growth < 1.0 or self.step < 0:
            raise ValueError(f"{self!r}: delays must be >= 0 and must not shrink")

    def delay(self, n: int) -> float:
        """The delay after the ``n``-th failure (0-based), at most ``cap``."""
        if self.growth > 1.0 and n > 64:  # past the cap long before: no float overflow
            return self.cap
        return min(self.cap, self.first * self.growth ** n + self.step * n)


def spread(delay: float, key: object) -> float:
    """``delay`` stretched by up to 6/7 depending on ``key``, so writers that collided on the same
    key do not all come back at the same instant (string hashes differ per process)."""
    return delay * (1 + (hash(key) % 7) / 7)


class Retry:
    """The state of one operation being retried: how many waits so far, and until when.

    ``patience`` (seconds from now) and ``attempts`` (tries in all, the first included) bound it;
    with neither it never gives up. Once :attr:`exhausted`, the caller stops and raises.
    """

    def __init__(self, backoff: Backoff, *, patience: float | None = None, attempts: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if attempts is not None and attempts < 1:
            raise ValueError(f"attempts must be at least 1, not {attempts}")
        self.backoff = backoff
        self.attempts = attempts
        self._clock = clock
        self._deadline = None if patience is None else clock() + patience
        self.failures = 0  # tries that failed so far (each followed by a wait, unless exhausted)

    @property
    def exhausted(self) -> bool:
        """True once the deadline has passed or the last allowed try has failed."""
        if self._deadline is not None and self._clock() > self._deadline:
            return True
        return self.attempts is not None and self.failures + 1 >= self.attempts

    def next_delay(self) -> float:
        """Count one more failure and return how long to wait before the next try."""
        delay = self.backoff.delay(self.failures)
        self.failures += 1
        return delay

    async def wait(self) -> None:
        """Count one more failure and sleep before the next try."""
        await sleep(self.next_delay())


async def retrying(call: Callable[[], Awaitable[T]], *, what: str, backoff: Backoff,
                   passing: tuple[type[BaseException], ...] | Callable[[BaseException], bool] = (Exception,),
                   patience: float | None = None, attempts: int | None = None,
                   logger: logging.Logger = log, clock: Callable[[], float] = time.monotonic) -> T:
    """``await call()`` until it succeeds; a failure that is ``passing`` (an exception type in the
    tuple, or for which the predicate is true) is logged and tried again after a backoff, until
    ``patience`` or ``attempts`` run out; then, and for any other failure, the exception propagates.
    """
    retry = Retry(backoff, patience=patience, attempts=attempts, clock=clock)
    while True:
        try:
            return await call()
        except Exception as e:
            is_passing = isinstance(e, passing) if isinstance(passing, tuple) else passing(e)
            if not is_passing or retry.exhausted:
                raise
            logger.warning("%s failed (%r); retrying", what, e)
        await retry.wait()
