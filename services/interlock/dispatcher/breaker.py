"""Circuit breakers per tenant and job topic: pure rules over a :class:`BreakerState`, and the
KV bucket that holds them (``il_breakers``), changed with compare-and-set so any number of
dispatcher copies share one breaker.

A breaker counts the outcomes of the jobs of steps that declare ``breaker:`` (the step's spec
judges each outcome). It opens after ``failures`` consecutive failures (timeouts included) or
when ``rate`` of at least ``min_calls`` outcomes inside ``window`` failed. While open, those
steps' jobs are held (``when_open: wait``) or fail at once (``fail``). After ``cooldown`` the
first job that comes is the probe (half-open): its success closes the breaker, its failure opens
it again. Every state change also goes to the breaker's log key (its history is the log).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from interlock.contracts import subjects as s
from interlock.contracts.messages import BreakerChange, BreakerOutcome, BreakerState
from interlock.core.workflow import BreakerSpec

log = logging.getLogger(__name__)

MAX_RECENT = 200  # outcomes kept per breaker (the window's, and the job ids that make counting idempotent)
RECHECK_MIN = timedelta(milliseconds=250)
RECHECK_MAX = timedelta(seconds=5)

Action = Literal["dispatch", "hold", "fail"]


@dataclass(frozen=True)
class Admission:
    """What to do with one job of a step behind a breaker. ``claim``: a new state to write
    (compare-and-set) before the job goes: it becomes the half-open probe."""

    action: Action
    reason: Literal["", "breaker_open", "breaker_probing"] = ""
    until: datetime | None = None
    claim: BreakerState | None = None
    message: str = ""
    opened_at: datetime | None = None  # the opening that holds the job (one StepHeld per opening)


def recheck_after(spec: BreakerSpec) -> timedelta:
    """How soon a held job looks again while a probe is out (its outcome may close the breaker)."""
    return min(max(timedelta(milliseconds=spec.cooldown) / 4, RECHECK_MIN), RECHECK_MAX)


def admit(state: BreakerState | None, spec: BreakerSpec, job_id: str, now: datetime) -> Admission:
    """May ``job_id`` go now? Closed: yes. Open within its cooldown: no, until it ends. Open past
    it, or half-open with a probe out longer than ``probe_timeout``: yes, as the probe. Half-open
    with a probe out: no (the probe itself: yes, again)."""
    refuse: Action = "fail" if spec.when_open == "fail" else "hold"
    if state is None or state.state == "closed":
        return Admission("dispatch")
    if state.state == "open":
        retry_at = state.retry_at or now
        if now < retry_at:
            return Admission(refuse, "breaker_open", retry_at, opened_at=state.opened_at,
                             message=f"breaker open since {_when(state.opened_at)}: {state.reason}")
        return Admission("dispatch", claim=_probe(state, job_id, now, "cooldown over: one probe job goes"))
    if state.probe_job == job_id:
        return Admission("dispatch")
    started = state.probe_started_at or now
    if now - started >= timedelta(milliseconds=spec.probe_timeout):
        return Admission("dispatch", claim=_probe(state, job_id, now, f"probe {state.probe_job} had no outcome "
                                                                       f"within {spec.probe_timeout} ms"))
    return Admission(refuse, "breaker_probing", now + recheck_after(spec), opened_at=state.opened_at,
                     message=f"breaker half-open: waiting for probe job {state.probe_job}")


def _when(at: datetime | None) -> str:
    return at.isoformat(timespec="seconds") if at else "?"


def _probe(state: BreakerState, job_id: str, now: datetime, reason: str) -> BreakerState:
    return _changed(state, "half_open", now, reason, probe_job=job_id, probe_started_at=now)


def _changed(state: BreakerState, to: str, now: datetime, reason: str, **fields: object) -> BreakerState:
    return state.model_copy(update={"state": to, "changed_at": now, "reason": reason,
                                    "transitions": state.transitions + 1, **fields})


def record(state: BreakerState | None, spec: BreakerSpec, tenant: str, topic: str, job_id: str, ok: bool,
           now: datetime) -> BreakerState | None:
    """The breaker after the outcome of ``job_id``; None when that outcome was counted already
    (a redelivered result, a timeout and then the late result)."""
    state = state or BreakerState(tenant=tenant, topic=topic)
    if any(o.job_id == job_id for o in state.recent):
        return None
    window = timedelta(milliseconds=spec.window)
    recent = [o for o in state.recent if now - o.at <= window][-(MAX_RECENT - 1):]
    recent.append(BreakerOutcome(job_id=job_id, ok=ok, at=now))
    consecutive = 0 if ok else state.consecutive_failures + 1
    counted = state.model_copy(update={"recent": recent, "consecutive_failures": consecutive})
    cooldown = timedelta(milliseconds=spec.cooldown)
    if state.state == "half_open":
        if job_id != state.probe_job:
            return counted  # a job dispatched before the breaker opened: counted, decides nothing
        if ok:
            return _changed(counted, "closed", now, f"probe job {job_id} succeeded", probe_job=None,
                            probe_started_at=None, retry_at=None, consecutive_failures=0,
                            recent=[recent[-1]])
        return _changed(counted, "open", now, f"probe job {job_id} failed", opened_at=now, retry_at=now + cooldown,
                        probe_job=None, probe_started_at=None)
    if state.state == "open":
        return counted
    failures = sum(1 for o in recent if not o.ok)
    if spec.failures is not None and consecutive >= spec.failures:
        why = f"{consecutive} consecutive failures (limit {spec.failures})"
    elif spec.rate is not None and len(recent) >= spec.min_calls and failures / len(recent) >= spec.rate:
        why = (f"{failures} of {len(recent)} outcomes in {spec.window} ms failed "
               f"({failures / len(recent):.0%}, limit {spec.rate:.0%})")
    else:
        return counted
    return _changed(counted, "open", now, why, opened_at=now, retry_at=now + cooldown)


def change_of(before: BreakerState | None, after: BreakerState, by: str) -> BreakerChange | None:
    """The log entry of a state change (None when the state stayed)."""
    previous = before.state if before is not None else "closed"
    if after.transitions == (before.transitions if before is not None else 0):
        return None
    return BreakerChange(tenant=after.tenant, topic=after.topic, seq=after.transitions, from_state=previous,
                         to_state=after.state, at=after.changed_at or datetime.min, reason=after.reason, by=by)


# -- the bucket --------------------------------------------------------------------------------
class Breakers:
    """The breakers in ``il_breakers``: read fresh (a dispatcher copy must not let a job through
    a breaker another copy opened), changed with compare-and-set."""

    def __init__(self, js: JetStreamContext, instance: str) -> None:
        self.js = js
        self.instance = instance
        self._kv: KeyValue | None = None

    async def kv(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.js.key_value(s.BREAKERS_BUCKET)
        return self._kv

    async def get(self, tenant: str, topic: str) -> tuple[BreakerState | None, int]:
        """The breaker and its revision (0: none yet)."""
        kv = await self.kv()
        try:
            entry = await kv.get(s.breaker_key(tenant, topic))
        except KeyNotFoundError:
            return None, 0
        if not entry.value:
            return None, entry.revision or 0
        return BreakerState.model_validate_json(entry.value), entry.revision or 0

    async def put(self, before: BreakerState | None, revision: int, after: BreakerState) -> bool:
        """Write ``after`` if the breaker is still at ``revision``; False when another copy changed
        it first (read it again and decide again). A state change also goes to the log."""
        kv = await self.kv()
        key = s.breaker_key(after.tenant, after.topic)
        change = change_of(before, after, self.instance)
        if change is not None:
            after = after.model_copy(update={"last_change": change})
        try:
            if revision:
                await kv.update(key, after.model_dump_json().encode(), last=revision)
            else:
                await kv.create(key, after.model_dump_json().encode())
        except KeyWrongLastSequenceError:
            return False
        if change is not None:
            log.info("breaker %s/%s: %s -> %s (%s)", after.tenant, after.topic, change.from_state, change.to_state,
                     change.reason)
            with contextlib.suppress(Exception):  # the state is durable; the log is its history
                await kv.put(s.breaker_log_key(after.tenant, after.topic), change.model_dump_json().encode())
        return True

    async def record(self, spec: BreakerSpec, tenant: str, topic: str, job_id: str, ok: bool,
                     now: datetime) -> BreakerState | None:
        """Count one outcome (retried on a concurrent change); the breaker after it."""
        for _ in range(20):
            before, revision = await self.get(tenant, topic)
            after = record(before, spec, tenant, topic, job_id, ok, now)
            if after is None:
                return before
            if await self.put(before, revision, after):
                return after
            await asyncio.sleep(0)
        log.warning("breaker %s/%s: gave up counting job %s after 20 concurrent changes", tenant, topic, job_id)
        return None

    async def admit(self, spec: BreakerSpec, tenant: str, topic: str, job_id: str, now: datetime) -> Admission:
        """:func:`admit` against the bucket: a probe claim is written before the job may go (the
        copy whose claim lands first sends the probe; the others hold)."""
        for _ in range(20):
            state, revision = await self.get(tenant, topic)
            admission = admit(state, spec, job_id, now)
            if admission.claim is None or await self.put(state, revision, admission.claim):
                return admission
        return Admission("hold", "breaker_probing", now + recheck_after(spec), message="breaker changing")
