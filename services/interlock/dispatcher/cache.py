"""The result cache (issue 17): a step's ``cache: {key, ttl}`` reuses an earlier job's output.

Where it sits: the dispatcher consults the cache only for a job it is about to dispatch, i.e. a
step whose allow decision (and approval, where one was required) is already durable in the run's
log. A denied step, or one waiting for a person, never reaches it: policy decides before a
cached output is used. Instead of dispatching, the dispatcher appends ``StepCacheHit`` (the
source run and step) and ``StepSucceeded`` (attempt 0, worker :data:`CACHE_WORKER`) in one
commit; the planner goes on from the StepSucceeded as after any job.

What is reused: the output of a successful job of the **same tenant** whose rendered cache key
and job hash (workflow, version, step, topic and input) are the same, stored within ``ttl``. An
entry's bucket key starts with the tenant (:func:`subjects.cache_entry_key`), and an entry read
back must name the tenant, job hash and key asked for: no lookup can return another tenant's
output. Only the dispatcher (and admin) may read or write the bucket.

Never cached: compensation jobs, retried attempts' reuse (only a first dispatch looks up), and a
key that renders to a sensitive (sealed) value (its ciphertext differs every run, and equal
redactions would make different secrets collide). The cache is an optimisation: a bucket that
cannot be read or written is logged and the job is dispatched as usual.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from interlock.contracts import events as ev
from interlock.contracts import subjects as s
from interlock.contracts.messages import CacheEntry
from interlock.core.codec import canonical_json, sha256_hex
from interlock.core.run import Run, StepState
from interlock.core.sealed import contains_sealed
from interlock.core.steps import base_step_id, template_context
from interlock.core.workflow import Cache, TemplateError, Workflow, render_input

log = logging.getLogger(__name__)

CACHE_WORKER = "cache"  # the StepSucceeded of a cache hit names this as its worker


# -- pure rules ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lookup:
    """A released job the cache may answer: its cache key's digest and its entry's bucket key."""

    step_id: str
    job_hash: str
    cache_key: str
    entry_key: str
    spec: Cache


def _spec(workflow: Workflow, state: StepState) -> Cache | None:
    step = workflow.steps.get(base_step_id(state.step_id))
    if step is None or state.compensation_of is not None or state.step_type != "job":
        return None
    return step.cache


def cache_key(run: Run, workflow: Workflow, state: StepState) -> tuple[Cache, str] | None:
    """The step's ``cache:`` and the digest of its rendered key, or None when the step is not
    cached (no ``cache:``, a compensation job, a key that does not render or holds a sealed value)."""
    spec = _spec(workflow, state)
    if spec is None:
        return None
    base = base_step_id(state.step_id)
    try:
        rendered = render_input(spec.key, template_context(run, {}, run.input), location=f"steps.{base}.cache.key")
    except TemplateError as e:
        log.warning("run %s step %s: cache key not rendered, the job runs uncached: %s", run.run_id, state.step_id, e)
        return None
    if contains_sealed(rendered):
        return None  # see the module docstring: a sensitive key never caches
    return spec, sha256_hex(canonical_json({"workflow_id": workflow.id, "step_id": base, "key": rendered}))


def lookups(run: Run, workflow: Workflow) -> list[Lookup]:
    """The released jobs, not yet dispatched, whose step is cached."""
    found: list[Lookup] = []
    if run.terminal:
        return found
    for state in run.steps.values():
        if state.status != "released" or state.attempt != 0 or state.cache_hit is not None:
            continue
        key = cache_key(run, workflow, state)
        if key is None:
            continue
        spec, digest = key
        entry_key = s.cache_entry_key(run.tenant, sha256_hex(f"{digest}\n{state.job_hash}".encode()))
        found.append(Lookup(state.step_id, state.job_hash, digest, entry_key, spec))
    return found


def usable(entry: CacheEntry, run: Run, lookup: Lookup, now: datetime) -> bool:
    """Whether an entry read back answers this lookup: this tenant's, for this job hash and key, not expired."""
    return (entry.tenant == run.tenant and entry.job_hash == lookup.job_hash and entry.cache_key == lookup.cache_key
            and now < entry.expires_at)


def use(run: Run, lookup: Lookup, entry: CacheEntry) -> None:
    """Record the hit and the step's success with the cached output (one commit)."""
    run.record_cache_hit(ev.StepCacheHit(
        step_id=lookup.step_id, job_hash=lookup.job_hash, cache_key=lookup.cache_key, source_run_id=entry.run_id,
        source_step_id=entry.source_step_id, source_at=entry.stored_at, expires_at=entry.expires_at))
    run.succeed_step(ev.StepSucceeded(step_id=lookup.step_id, attempt=0, output=entry.output,
                                      output_ref=entry.output_ref, worker=CACHE_WORKER))


def entry_for(run: Run, workflow: Workflow, step_id: str, now: datetime) -> tuple[str, CacheEntry] | None:
    """The bucket key and entry to store for a job of ``run`` that just succeeded, or None when
    its step is not cached (or its output came from the cache already)."""
    state = run.steps.get(step_id)
    if state is None or state.status != "succeeded" or state.attempt < 1 or state.cache_hit is not None:
        return None
    key = cache_key(run, workflow, state)
    if key is None:
        return None
    spec, digest = key
    entry = CacheEntry(tenant=run.tenant, workflow_id=run.workflow_id, step_id=base_step_id(step_id),
                       run_id=run.run_id, source_step_id=step_id, job_hash=state.job_hash, cache_key=digest,
                       output=state.output, output_ref=state.output_ref, stored_at=now,
                       expires_at=now + timedelta(milliseconds=spec.ttl_ms))
    return s.cache_entry_key(run.tenant, sha256_hex(f"{digest}\n{state.job_hash}".encode())), entry


# -- the bucket --------------------------------------------------------------------------------
class ResultCache:
    """The dispatcher's reads and writes of bucket ``il_cache``."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self._kv: KeyValue | None = None

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.js.key_value(s.CACHE_BUCKET)
        return self._kv

    async def _get(self, key: str) -> CacheEntry | None:
        try:
            raw = (await (await self._bucket()).get(key)).value or b""
        except KeyNotFoundError:
            return None
        try:
            return CacheEntry.model_validate_json(raw)
        except ValidationError:
            log.warning("result cache entry %s does not decode: ignored", key)
            return None

    async def use_cached(self, run: Run, workflow: Workflow, now: datetime) -> list[str]:
        """Answer the run's cached released jobs from the cache (recording each hit on ``run``);
        return the steps answered. A cache that cannot be read answers nothing."""
        answered: list[str] = []
        for lookup in lookups(run, workflow):
            try:
                entry = await self._get(lookup.entry_key)
            except Exception as e:  # no bucket, a busy server, a refused read: an optimisation never blocks a job
                log.warning("result cache unavailable, dispatching run %s step %s: %s", run.run_id, lookup.step_id,
                            e or type(e).__name__)
                return answered
            if entry is not None and usable(entry, run, lookup, now):
                use(run, lookup, entry)
                answered.append(lookup.step_id)
        return answered

    async def remember(self, run: Run, workflow: Workflow, step_id: str, now: datetime) -> bool:
        """Store the output of ``step_id`` (just succeeded, durable) when its step is cached."""
        found = entry_for(run, workflow, step_id, now)
        if found is None:
            return False
        key, entry = found
        try:
            await (await self._bucket()).put(key, entry.model_dump_json().encode())
        except Exception as e:  # an optimisation: never fail the outcome that is already durable
            log.warning("result cache: run %s step %s not stored: %s", run.run_id, step_id, e or type(e).__name__)
            return False
        return True
