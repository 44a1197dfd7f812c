"""Circuit breakers and canary rollouts (issue 16), as the client reads and changes them.

Breakers are the dispatchers' (bucket ``il_breakers``): the client only reads them. A rollout
(bucket ``il_rollouts``) is started and aborted here, with compare-and-set, and judged by the
dispatchers, which promote it or roll it back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from interlock.client._errors import NotFound, Refused
from interlock.contracts import permissions as p
from interlock.contracts import protocol
from interlock.contracts import subjects as s
from interlock.contracts.messages import AgentRegistration, BreakerChange, BreakerState, Rollout, RolloutStats
from interlock.runtime.kvkeys import key_history, matching_keys


async def breakers(js: JetStreamContext, tenant: str, topic: str | None) -> list[BreakerState]:
    """The tenant's breakers (one topic's, with ``topic``), by topic."""
    kv = await js.key_value(s.BREAKERS_BUCKET)
    pattern = s.breaker_key(tenant, topic) if topic else p.pattern(s.breaker_key, tenant, p.REST)
    found = []
    for key in await matching_keys(kv, pattern):
        with contextlib.suppress(KeyNotFoundError):
            entry = await kv.get(key)
            if entry.value:
                found.append(BreakerState.model_validate_json(entry.value))
    return found


async def breaker_log(js: JetStreamContext, tenant: str, topic: str) -> list[BreakerChange]:
    """A breaker's state changes, oldest first (the last 64: the bucket's history)."""
    kv = await js.key_value(s.BREAKERS_BUCKET)
    entries = await key_history(kv, s.breaker_log_key(tenant, topic))
    return [BreakerChange.model_validate_json(e.value) for e in entries if e.value]


def live_versions(agents: Iterable[AgentRegistration], topic: str, now: datetime) -> set[str]:
    """Versions of the topic's workers heard from lately."""
    fresh_after = now - timedelta(seconds=protocol.REGISTRY_STALE_AFTER_S)
    return {a.version for a in agents if a.topic == topic and a.last_heartbeat >= fresh_after}


def new_rollout(tenant: str, topic: str, to: str, share: float, live: Iterable[str], *, stable: str | None,
                now: datetime, by: str, window_s: float, min_jobs: int, max_failure_delta: float,
                max_latency_ratio: float) -> Rollout:
    """A rollout of version ``to``; ``stable`` defaults to the one other live version. Raises
    :class:`Refused` naming the problem."""
    if not 0.0 < share <= 1.0:
        raise Refused(f"the canary share must be above 0% and at most 100%, got {share:.0%}")
    if window_s <= 0 or min_jobs < 1 or max_failure_delta < 0 or max_latency_ratio <= 0:
        raise Refused("window, min jobs and latency ratio must be positive, the failure delta not negative")
    live = set(live)
    if to not in live:
        raise Refused(f"no live worker of topic {topic!r} runs version {to!r} "
                      f"(live: {', '.join(sorted(live)) or 'none'}): start one first")
    if stable is None:
        others = sorted(live - {to})
        if len(others) != 1:
            raise Refused(f"cannot tell the stable version of {topic!r}: live versions are "
                          f"{', '.join(sorted(live))}; name it with --from")
        stable = others[0]
    if stable == to:
        raise Refused(f"the canary and the stable version are both {to!r}")
    if s.version_token(stable) == s.version_token(to):
        raise Refused(f"versions {stable!r} and {to!r} share one subject token ({s.version_token(to)!r})")
    return Rollout(tenant=tenant, topic=topic, stable=stable, canary=to, share=share, started_at=now, started_by=by,
                   window_s=window_s, min_jobs=min_jobs, max_failure_delta=max_failure_delta,
                   max_latency_ratio=max_latency_ratio, canary_stats=RolloutStats(version=to),
                   stable_stats=RolloutStats(version=stable))


async def _get(kv: KeyValue, tenant: str, topic: str) -> tuple[Rollout | None, int]:
    try:
        entry = await kv.get(s.rollout_key(tenant, topic))
    except KeyNotFoundError:
        return None, 0
    return (Rollout.model_validate_json(entry.value) if entry.value else None), entry.revision or 0


async def rollouts(js: JetStreamContext, tenant: str, topic: str | None) -> list[Rollout]:
    kv = await js.key_value(s.ROLLOUTS_BUCKET)
    if topic:
        rollout, _ = await _get(kv, tenant, topic)
        return [rollout] if rollout else []
    found = []
    for key in await matching_keys(kv, p.pattern(s.rollout_key, tenant, p.REST)):
        with contextlib.suppress(KeyNotFoundError):
            entry = await kv.get(key)
            if entry.value:
                found.append(Rollout.model_validate_json(entry.value))
    return found


async def start(js: JetStreamContext, rollout: Rollout) -> Rollout:
    """Put a new rollout, unless one of the topic is active (a finished one is replaced)."""
    kv = await js.key_value(s.ROLLOUTS_BUCKET)
    current, revision = await _get(kv, rollout.tenant, rollout.topic)
    if current is not None and current.status == "active":
        raise Refused(f"topic {rollout.topic!r} already has an active rollout of version {current.canary!r} "
                      f"(abort it first: interlock agents rollout-abort {rollout.topic})")
    try:
        await kv.update(s.rollout_key(rollout.tenant, rollout.topic), rollout.model_dump_json().encode(),
                        last=revision)
    except KeyWrongLastSequenceError:
        raise Refused(f"the rollout of topic {rollout.topic!r} changed meanwhile: try again") from None
    return rollout


async def abort(js: JetStreamContext, tenant: str, topic: str, *, by: str, reason: str) -> Rollout:
    """End an active rollout: every job goes to the stable version again."""
    kv = await js.key_value(s.ROLLOUTS_BUCKET)
    for _ in range(10):
        current, revision = await _get(kv, tenant, topic)
        if current is None:
            raise NotFound(f"topic {topic!r} has no rollout")
        if current.status != "active":
            raise Refused(f"the rollout of {topic!r} is already {current.status.replace('_', ' ')}")
        after = current.model_copy(update={"status": "aborted", "decided_at": datetime.now(UTC), "decided_by": by,
                                           "reason": reason or "aborted by an operator"})
        with contextlib.suppress(KeyWrongLastSequenceError):
            await kv.update(s.rollout_key(tenant, topic), after.model_dump_json().encode(), last=revision)
            return after
    raise Refused(f"the rollout of topic {topic!r} keeps changing: try again")


async def clear(js: JetStreamContext, tenant: str, topic: str) -> Rollout:
    """Remove a finished rollout: the topic's jobs go to any worker again."""
    kv = await js.key_value(s.ROLLOUTS_BUCKET)
    current, revision = await _get(kv, tenant, topic)
    if current is None:
        raise NotFound(f"topic {topic!r} has no rollout")
    if current.status == "active":
        raise Refused(f"the rollout of {topic!r} is still active: abort it first")
    await kv.delete(s.rollout_key(tenant, topic), last=revision)
    return current
