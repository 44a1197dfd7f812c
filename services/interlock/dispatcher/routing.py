"""Which agent version a job goes to: a step's ``agent_version`` range and a topic's canary
rollout (bucket ``il_rollouts``). Pure rules first, then the buckets they read.

A job that any worker may take goes to ``il.job.{tenant}.{topic}`` as always. A job routed to a
version goes to that version's subject, ``il.vjob.{tenant}.{version}.{topic}``, which only the
worker SDK's consumer of that version takes. While a rollout exists (active or finished) every
job of its topic is routed: the canary's workers also take unversioned jobs, so a job meant for
the stable version must say so. ``interlock agents rollout-clear`` ends that.

The canary share is decided by the job id's hash, so a rule that runs again after a conflict
routes the same job the same way, and each routing decision is recorded in the step's
StepDispatched (``agent_version``, ``route``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from interlock.contracts import permissions as p
from interlock.contracts import protocol
from interlock.contracts import subjects as s
from interlock.contracts.messages import AgentRegistration, Rollout, RolloutStats
from interlock.runtime.kvkeys import matching_keys

log = logging.getLogger(__name__)

MAX_SAMPLES = 500  # latencies and job ids kept per side of a rollout


@dataclass(frozen=True)
class Route:
    """Where one job goes: ``version`` '' is any worker of the topic."""

    version: str = ""
    route: str = ""  # "", "canary", "stable", "range"


@dataclass(frozen=True)
class NoVersion:
    """No live worker runs a version the job may go to: hold it."""

    message: str


@dataclass(frozen=True)
class Hold:
    """Keep the job back (a StepHeld once per hold) and look again at ``until``."""

    reason: str  # StepHeld.reason
    until: datetime
    message: str = ""
    breaker_opened_at: datetime | None = None


@dataclass(frozen=True)
class FailFast:
    """Fail the step now instead of dispatching it (its breaker is open, ``when_open: fail``)."""

    message: str


Decision = Route | Hold | FailFast
"""What the workload controls decided for one due job (dispatcher.rules.dispatch carries it out)."""

NO_VERSION_RECHECK = timedelta(seconds=2)


def canary_share_point(job_id: str) -> float:
    """Where a job falls in [0, 1): below the rollout's share, it goes to the canary."""
    return int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:8], "big") / 2**64


def matches(version: str, wanted: str | None) -> bool:
    """Does ``version`` satisfy the range ``wanted`` (PEP 440; a version that is not PEP 440
    satisfies no range)?"""
    if not wanted:
        return True
    try:
        return Version(version) in SpecifierSet(wanted)
    except InvalidVersion:
        return False


def _newest(versions: Iterable[str]) -> str:
    def key(v: str) -> tuple[int, Version | str]:
        try:
            return 1, Version(v)
        except InvalidVersion:
            return 0, v
    return max(versions, key=key)


def choose(job_id: str, wanted: str | None, rollout: Rollout | None, live: Iterable[str]) -> Route | NoVersion:
    """The route of one job: by the topic's rollout if there is one (the canary's share by the job
    id's hash), within the step's range ``wanted``; else by the range alone (the newest live
    version in it); else any worker."""
    live = set(live)
    if rollout is not None:
        settled = rollout.routing_version
        if settled is not None:
            first = Route(settled, "stable")
        elif canary_share_point(job_id) < rollout.share:
            first = Route(rollout.canary, "canary")
        else:
            first = Route(rollout.stable, "stable")
        if matches(first.version, wanted):
            return first
        other = rollout.stable if first.version == rollout.canary else rollout.canary
        if settled is None and matches(other, wanted):
            return Route(other, "canary" if other == rollout.canary else "stable")
    if not wanted:
        return Route()
    fitting = [v for v in live if matches(v, wanted)]
    if not fitting:
        return NoVersion(f"no live worker runs an agent version in {wanted!r} "
                         f"(live: {', '.join(sorted(live)) or 'none'})")
    return Route(_newest(fitting), "range")


def record(rollout: Rollout, job_id: str, version: str, ok: bool, latency_ms: float, now: datetime) -> Rollout | None:
    """The rollout after one job's outcome, judged (:func:`judge`); None when the job does not
    count (the rollout ended, another version, counted already)."""
    if rollout.status != "active":
        return None
    side = "canary_stats" if version == rollout.canary else "stable_stats" if version == rollout.stable else None
    if side is None:
        return None
    stats: RolloutStats = getattr(rollout, side)
    if job_id in stats.job_ids:
        return None
    stats = stats.model_copy(update={
        "jobs": stats.jobs + 1, "failures": stats.failures + (0 if ok else 1),
        "latency_ms": [*stats.latency_ms, latency_ms][-MAX_SAMPLES:],
        "job_ids": [*stats.job_ids, job_id][-MAX_SAMPLES:]})
    return judge(rollout.model_copy(update={side: stats}), now)


def judge(rollout: Rollout, now: datetime) -> Rollout:
    """Roll back as soon as ``min_jobs`` canary jobs fail clearly more often, or run clearly
    slower, than the stable version's; promote once the window has passed without that."""
    if rollout.status != "active":
        return rollout
    canary, stable = rollout.canary_stats, rollout.stable_stats
    if canary.jobs < rollout.min_jobs:
        return rollout
    reasons = []
    if canary.failure_rate > stable.failure_rate + rollout.max_failure_delta:
        reasons.append(f"canary failure rate {canary.failure_rate:.0%} over stable {stable.failure_rate:.0%} "
                       f"+ {rollout.max_failure_delta:.0%}")
    if canary.latency_ms and stable.latency_ms:
        c50, s50 = statistics.median(canary.latency_ms), statistics.median(stable.latency_ms)
        if c50 > s50 * rollout.max_latency_ratio:
            reasons.append(f"canary median latency {c50:.0f} ms over stable {s50:.0f} ms "
                           f"x {rollout.max_latency_ratio:g}")
    if reasons:
        return rollout.model_copy(update={"status": "rolled_back", "decided_at": now, "decided_by": "dispatcher",
                                          "reason": "; ".join(reasons)})
    if now - rollout.started_at >= timedelta(seconds=rollout.window_s):
        return rollout.model_copy(update={
            "status": "promoted", "decided_at": now, "decided_by": "dispatcher",
            "reason": f"{canary.jobs} canary jobs, failure rate {canary.failure_rate:.0%} (stable "
                      f"{stable.failure_rate:.0%}), within the thresholds for {rollout.window_s:g} s"})
    return rollout


# -- the buckets -------------------------------------------------------------------------------
class Rollouts:
    """Rollouts (``il_rollouts``) and the live agent versions (``il_agents``) of each tenant's
    topics. A topic without an active rollout is looked up at most once a second (a rollout
    started takes up to a second to be seen); an active one on every job. Outcomes are counted
    with compare-and-set against the bucket itself."""

    TTL_S = 1.0

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self._rollouts_kv: KeyValue | None = None
        self._agents_kv: KeyValue | None = None
        self._rollouts: dict[str, tuple[float, Rollout | None, int]] = {}
        self._live: dict[str, tuple[float, set[str]]] = {}
        self._warned = False

    async def _kv(self) -> KeyValue:
        if self._rollouts_kv is None:
            self._rollouts_kv = await self.js.key_value(s.ROLLOUTS_BUCKET)
        return self._rollouts_kv

    async def read(self, tenant: str, topic: str) -> tuple[Rollout | None, int]:
        """The rollout and its revision, from the bucket (none while the bucket is missing: an
        installation not provisioned since rollouts exist dispatches as before)."""
        key = s.rollout_key(tenant, topic)
        try:
            kv = await self._kv()
            entry = await kv.get(key)
        except BucketNotFoundError:
            if not self._warned:
                log.warning("bucket %s is missing (run `interlock provision`): no canary rollouts", s.ROLLOUTS_BUCKET)
                self._warned = True
            rollout, revision = None, 0
        except KeyNotFoundError:
            rollout, revision = None, 0
        else:
            rollout = Rollout.model_validate_json(entry.value) if entry.value else None
            revision = entry.revision or 0
        self._rollouts[key] = (time.monotonic(), rollout, revision)
        return rollout, revision

    async def get(self, tenant: str, topic: str) -> Rollout | None:
        """The topic's rollout: read fresh while one is active (another copy may have just rolled it
        back or promoted it), else at most once a second (no rollout, or a finished one)."""
        cached = self._rollouts.get(s.rollout_key(tenant, topic))
        if cached is not None and time.monotonic() - cached[0] < self.TTL_S and (
                cached[1] is None or cached[1].status != "active"):
            return cached[1]
        return (await self.read(tenant, topic))[0]

    async def live_versions(self, tenant: str, topic: str) -> set[str]:
        """Versions of the workers registered for the topic and heard from lately."""
        key = f"{tenant}.{topic}"
        cached = self._live.get(key)
        if cached is not None and time.monotonic() - cached[0] < self.TTL_S:
            return cached[1]
        if self._agents_kv is None:
            self._agents_kv = await self.js.key_value(s.AGENTS_BUCKET)
        versions: set[str] = set()
        keys = await matching_keys(self._agents_kv, p.pattern(s.agent_key, tenant, topic, p.ANY))
        fresh_after = datetime.now(UTC) - timedelta(seconds=protocol.REGISTRY_STALE_AFTER_S)
        for k in keys:
            try:
                entry = await self._agents_kv.get(k)
                reg = AgentRegistration.model_validate_json(entry.value or b"{}")
            except Exception:  # deleted meanwhile, or not a registration
                continue
            if reg.topic == topic and reg.last_heartbeat >= fresh_after:
                versions.add(reg.version)
        self._live[key] = (time.monotonic(), versions)
        return versions

    async def record(self, tenant: str, topic: str, job_id: str, version: str, ok: bool, latency_ms: float,
                     now: datetime) -> Rollout | None:
        """Count one routed job's outcome in the topic's active rollout (retried on a concurrent
        change); the rollout after it, or None when it did not count."""
        cached = self._rollouts.get(s.rollout_key(tenant, topic))
        if cached is not None and time.monotonic() - cached[0] < self.TTL_S and (
                cached[1] is None or cached[1].status != "active"):
            return None
        for _ in range(20):
            rollout, revision = await self.read(tenant, topic)
            if rollout is None:
                return None
            after = record(rollout, job_id, version, ok, latency_ms, now)
            if after is None:
                return None
            kv = await self._kv()
            try:
                new_revision = await kv.update(s.rollout_key(tenant, topic), after.model_dump_json().encode(),
                                               last=revision)
            except KeyWrongLastSequenceError:
                await asyncio.sleep(0)
                continue
            self._rollouts[s.rollout_key(tenant, topic)] = (time.monotonic(), after, new_revision)
            if after.status != rollout.status:
                log.info("rollout %s/%s of %s: %s (%s)", tenant, topic, after.canary, after.status, after.reason)
            return after
        return None
