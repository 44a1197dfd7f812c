"""The gate's waiting jobs as entries of their own (#16): the in-memory queue a dispatcher copy
keeps from the bucket's watch and its own writes, and when it knows every waiter written before
a change (so a copy that freed a slot never misses a job another copy queued just before)."""

from __future__ import annotations

import asyncio

import pytest

from interlock.contracts import subjects as s
from interlock.contracts.messages import GateQueued, GateWaiter
from interlock.dispatcher.slots import WaitIndex

pytestmark = pytest.mark.timeout(10)

LIMIT = s.gate_key("concurrency", "tenant:acme")


def queued(job: str, since: float = 1.0) -> GateQueued:
    return GateQueued(job=job, limit=LIMIT, waiter=GateWaiter(tenant="acme", run_id=job.split(":")[0],
                                                              step_id="work", since=since))


def test_waiter_keys_are_per_job_and_limit_and_never_a_limit_s_key() -> None:
    a, b = s.gate_waiter_key(LIMIT, "r1:work@1"), s.gate_waiter_key(LIMIT, "r1:work@2")
    assert a != b and a.startswith(f"w.{LIMIT}.")
    assert s.is_gate_waiter_key(a) and not s.is_gate_waiter_key(LIMIT)
    assert s.gate_waiter_key(s.gate_key("concurrency", "tenant:other"), "r1:work@1") != a


async def test_the_watch_and_own_writes_build_the_queue_and_a_late_echo_changes_nothing() -> None:
    index = WaitIndex()
    key = s.gate_waiter_key(LIMIT, "r1:work@1")
    index.wrote(key, 5, queued("r1:work@1"))  # this copy queued it
    assert set(index.waiting(LIMIT)) == {"r1:work@1"}
    index.wrote(key, 7, None)  # and took the slot: its entry deleted
    assert index.waiting(LIMIT) == {}
    # the watch delivers both writes later: the put (an older revision) must not bring it back
    index._delivered(key, 5, queued("r1:work@1").model_dump_json().encode(), False)
    assert index.waiting(LIMIT) == {}
    index._delivered(key, 7, None, True)
    assert index.waiting(LIMIT) == {} and index.seen == 7
    # another copy's waiter arrives through the watch only
    other = s.gate_waiter_key(LIMIT, "r2:work@1")
    index._delivered(other, 9, queued("r2:work@1", 2.0).model_dump_json().encode(), False)
    assert index.waiting(LIMIT)["r2:work@1"].since == 2.0
    index._delivered(other, 10, b"not json", False)  # a bad entry is ignored, the queue kept
    assert set(index.waiting(LIMIT)) == {"r2:work@1"}


async def test_every_write_before_a_revision_is_known_only_once_delivered_or_own() -> None:
    index = WaitIndex()
    index._delivered(LIMIT, 3, b"{}", False)
    assert index.complete_below(4)  # nothing between 3 and 4
    index.own(4)  # this copy wrote 4 and 6 (say a waiter and the limit's state); 5 is another copy's
    index.own(6)
    assert not index.complete_below(6)
    assert index.complete_below(5)
    waiting = asyncio.create_task(index.caught_up(6, patience=5.0))
    await asyncio.sleep(0)
    assert not waiting.done()
    index._delivered(s.gate_waiter_key(LIMIT, "r3:work@1"), 5, queued("r3:work@1").model_dump_json().encode(),
                     False)
    assert await waiting is True
    assert "r3:work@1" in index.waiting(LIMIT)
    assert await index.caught_up(9, patience=0.05) is False  # 7 and 8 never come: it gives up


async def test_a_gate_that_cannot_follow_its_queues_yet_still_starts_and_stops() -> None:
    from typing import Any

    from interlock.core.workload import GateLimits
    from interlock.dispatcher.slots import Gatekeeper

    class NoBucket:
        calls = 0

        async def key_value(self, bucket: str) -> Any:
            NoBucket.calls += 1
            raise TimeoutError("no bucket yet")

    keeper = Gatekeeper(NoBucket(), GateLimits())  # type: ignore[arg-type]
    await keeper.start()  # a warning, a retry in the background: the dispatcher still starts
    assert NoBucket.calls == 1 and keeper._retry is not None and not keeper._retry.done()
    await keeper.stop()
    await asyncio.sleep(0)
    assert keeper._retry.cancelled()
