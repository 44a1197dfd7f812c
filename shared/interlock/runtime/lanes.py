"""Fast before slow in a service process (#16): the in-process half of the lanes.

A high-priority run's commits are appended in the fast lane and reach a service through its
own durable consumer (``{service}_events_fast``, :func:`interlock.contracts.routing.lane_of`), so
they never queue behind a backlog's commits on the server. In the process, both consumers' handlers
share the event loop and the cores: :class:`LaneGate` makes a slow-lane handler wait before it
starts while any fast-lane work is pending, so the service drains the high-priority runs first.

A slow-lane handler that had started already gives way too, at its next run update
(:meth:`LaneGate.checkpoint`, which the event store calls): the lane of the running handler is in
a context variable, so a fast-lane handler, a timer or a command never waits there.

Across processes: the services share two cores with each other and with nats-server, so a
backlog's work in one process slows a high-priority run's hop in another. Every service therefore
subscribes to the fast-lane commits as they are appended (``subjects.FAST_LANE_COMMITS``, a core
subscription: :meth:`LaneGate.saw_fast`) and holds its slow-lane handlers for ``hold_s`` after
each one, so while a high-priority run moves the backlog steps aside everywhere. A fast run that
waits (on a long job, on a person) appends nothing, and the hold lapses after ``hold_s``. Handlers
that free what a fast run may wait for (the dispatcher's results and heartbeats: a finished job's
slot in a limit) are not held (``held=False``); they still give way to this process's fast work.

The wait is bounded (``max_wait``): under a sustained fast-lane load the slow lane still moves,
one handler per ``max_wait`` at worst, and its messages are kept alive by the consumer's progress
acks meanwhile. A lane orders work only: nothing a handler decides depends on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextvars import ContextVar

from interlock.contracts import subjects as s

MAX_SLOW_WAIT_S = 1.0
HOLD_AFTER_FAST_S = 0.05
"""How long a fast-lane commit seen anywhere holds slow-lane work: longer than the gaps between a
moving high-priority run's commits (a few ms per hop), short next to a wait on a job or a person."""

_CURRENT: ContextVar[str | None] = ContextVar("interlock_lane", default=None)
"""The lane of the handler this task runs for (None: no lane, e.g. a timer or a command)."""
_HELD: ContextVar[bool] = ContextVar("interlock_lane_held", default=True)
"""Whether that handler is held while a fast run moves elsewhere (see the module's docstring)."""


class LaneGate:
    """Slow-lane work waits while fast-lane work is pending here, or (held work) while a fast run
    moves anywhere: at most ``max_wait`` seconds each."""

    def __init__(self, max_wait: float = MAX_SLOW_WAIT_S, hold_s: float = HOLD_AFTER_FAST_S) -> None:
        self.max_wait = max_wait
        self.hold_s = hold_s
        self._clock = time.monotonic
        self._fast = 0
        self._clear = asyncio.Event()
        self._clear.set()
        self._held_until = 0.0
        self.stats: Counter[str] = Counter()  # fast, slow, slow_waited, slow_overdue, seen_fast

    def saw_fast(self) -> None:
        """A fast-lane commit was appended (by any service): hold slow work for ``hold_s``."""
        self._held_until = self._clock() + self.hold_s
        self.stats["seen_fast"] += 1

    def _must_wait(self, held: bool) -> bool:
        return bool(self._fast) or (held and self._clock() < self._held_until)

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

    async def slow(self, held: bool = True) -> None:
        """Before a slow-lane handler: wait until no fast-lane work is pending here and (``held``)
        no fast run has moved for ``hold_s``, or ``max_wait`` has passed."""
        self.stats["slow"] += 1
        if not self._must_wait(held):
            return
        self.stats["slow_waited"] += 1
        deadline = self._clock() + self.max_wait
        while self._must_wait(held):
            left = deadline - self._clock()
            if left <= 0:
                self.stats["slow_overdue"] += 1
                return
            if self._fast:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._clear.wait(), left)
            else:  # held: until the last fast commit's hold lapses (a newer one extends it)
                await asyncio.sleep(min(self._held_until - self._clock(), left))

    @contextlib.asynccontextmanager
    async def lane(self, lane: str | None, *, held: bool = True) -> AsyncIterator[None]:
        """Around a handler of work in ``lane`` (None: unknown, handled as slow); ``held=False``:
        slow work that a fast run elsewhere may be waiting for (not held for it)."""
        token = _CURRENT.set(s.FAST_LANE if lane == s.FAST_LANE else s.SLOW_LANE)
        held_token = _HELD.set(held)
        try:
            if lane == s.FAST_LANE:
                async with self.fast():
                    yield
                return
            await self.slow(held)
            yield
        finally:
            _HELD.reset(held_token)
            _CURRENT.reset(token)

    async def checkpoint(self) -> None:
        """Where slow-lane work that started already gives way (before each run update): a
        slow-lane handler waits here as before it started; anything else goes on."""
        if _CURRENT.get() == s.SLOW_LANE and self._must_wait(_HELD.get()):
            self.stats["checkpoint_waited"] += 1
            await self.slow(_HELD.get())


__all__ = ["HOLD_AFTER_FAST_S", "MAX_SLOW_WAIT_S", "LaneGate"]
