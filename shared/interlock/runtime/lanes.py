"""Fast before slow inside one service process (#16): the in-process half of the lanes.

A high-priority run's commits are appended in the fast lane and reach a service through its
own durable consumer (``{service}_events_fast``, :func:`interlock.contracts.routing.lane_of`), so
they never queue behind a backlog's commits on the server. In the process, both consumers' handlers
share the event loop and the cores: :class:`LaneGate` makes a slow-lane handler wait before it
starts while any fast-lane work is pending, so the service drains the high-priority runs first.

A slow-lane handler that had started already gives way too, at its next run update
(:meth:`LaneGate.checkpoint`, which the event store calls): the lane of the running handler is in
a context variable, so a fast-lane handler, a timer or a command never waits there.

The wait is bounded (``max_wait``): under a sustained fast-lane load the slow lane still moves,
one handler per ``max_wait`` at worst, and its messages are kept alive by the consumer's progress
acks meanwhile. A lane orders work only: nothing a handler decides depends on it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from contextvars import ContextVar

from interlock.contracts import subjects as s

MAX_SLOW_WAIT_S = 1.0

_CURRENT: ContextVar[str | None] = ContextVar("interlock_lane", default=None)
"""The lane of the handler this task runs for (None: no lane, e.g. a timer or a command)."""


class LaneGate:
    """Slow-lane work waits while fast-lane work is pending (at most ``max_wait`` seconds each)."""

    def __init__(self, max_wait: float = MAX_SLOW_WAIT_S) -> None:
        self.max_wait = max_wait
        self._fast = 0
        self._clear = asyncio.Event()
        self._clear.set()
        self.stats: Counter[str] = Counter()  # fast, slow, slow_waited, slow_overdue

    @property
    def fast_pending(self) -> int:
        """Fast-lane work items delivered and not finished."""
        return self._fast

    @contextlib.asynccontextmanager
    async def fast(self) -> AsyncIterator[None]:
        """Around a fast-lane handler: slow-lane ones do not start meanwhile."""
        self._fast += 1
        self._clear.clear()
        self.stats["fast"] += 1
        try:
            yield
        finally:
            self._fast -= 1
            if self._fast == 0:
                self._clear.set()

    async def slow(self) -> None:
        """Before a slow-lane handler: wait until no fast-lane work is pending (or ``max_wait``)."""
        self.stats["slow"] += 1
        if self._fast == 0:
            return
        self.stats["slow_waited"] += 1
        try:
            await asyncio.wait_for(self._clear.wait(), self.max_wait)
        except TimeoutError:
            self.stats["slow_overdue"] += 1

    @contextlib.asynccontextmanager
    async def lane(self, lane: str | None) -> AsyncIterator[None]:
        """Around a handler of work in ``lane`` (None: unknown, handled as slow)."""
        token = _CURRENT.set(s.FAST_LANE if lane == s.FAST_LANE else s.SLOW_LANE)
        try:
            if lane == s.FAST_LANE:
                async with self.fast():
                    yield
                return
            await self.slow()
            yield
        finally:
            _CURRENT.reset(token)

    async def checkpoint(self) -> None:
        """Where slow-lane work that started already gives way (before each run update): a
        slow-lane handler waits here while fast-lane work is pending; anything else goes on."""
        if _CURRENT.get() == s.SLOW_LANE and self._fast:
            self.stats["checkpoint_waited"] += 1
            await self.slow()


__all__ = ["MAX_SLOW_WAIT_S", "LaneGate"]
