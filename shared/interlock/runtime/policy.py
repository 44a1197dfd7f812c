"""Policy bundles in JetStream: the ``active`` key of the policies bucket, with its history.

Publishing compiles the bundle first, so a bundle that does not parse never becomes active.
Services watch the key and switch to a new bundle without a restart; every decision names the
snapshot (``version@sha256``) it was made under. :func:`simulate` re-decides recent jobs from the
event log under a draft bundle (``interlock policy simulate``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from interlock.contracts import events as ev
from interlock.contracts import subjects as s
from interlock.core.policy.cedar import DEFAULT_BUNDLE, CedarPolicy, PolicyBundle
from interlock.core.policy.requests import request_for
from interlock.core.workflow import Workflow
from interlock.runtime.kvkeys import key_history

log = logging.getLogger(__name__)
ACTIVE = "active"


@dataclass(frozen=True)
class BundleRecord:
    bundle: PolicyBundle
    published_at: str
    published_by: str
    revision: int = 0

    def to_json(self) -> bytes:
        return json.dumps({"version": self.bundle.version, "source": self.bundle.source,
                           "sha256": self.bundle.sha256, "published_at": self.published_at,
                           "published_by": self.published_by}).encode()

    @staticmethod
    def from_json(data: bytes, revision: int = 0) -> BundleRecord:
        raw = json.loads(data)
        return BundleRecord(PolicyBundle(raw["version"], raw["source"], raw["sha256"]), raw.get("published_at", ""),
                            raw.get("published_by", ""), revision)


class BundleStore:
    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self._kv: KeyValue | None = None

    async def kv(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.js.key_value(s.POLICIES_BUCKET)
        return self._kv

    async def active(self) -> BundleRecord | None:
        kv = await self.kv()
        try:
            entry = await kv.get(ACTIVE)
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        return BundleRecord.from_json(entry.value, entry.revision or 0)

    async def publish(self, source: str, *, version: str | None = None, by: str = "") -> BundleRecord:
        current = await self.active()
        if version is None:
            previous = current.bundle.version if current else "0"
            version = str(int(previous) + 1) if previous.isdigit() else f"{previous}.1"
        bundle = PolicyBundle.of(version, source)
        CedarPolicy(bundle)  # raises PolicyError if it does not parse
        record = BundleRecord(bundle, datetime.now(UTC).isoformat(), by)
        revision = await (await self.kv()).put(ACTIVE, record.to_json())
        return BundleRecord(bundle, record.published_at, by, revision)

    async def history(self) -> list[BundleRecord]:
        entries = await key_history(await self.kv(), ACTIVE)
        return [BundleRecord.from_json(e.value, e.revision or 0) for e in entries if e.value]

    async def rollback(self, *, to_version: str | None = None, by: str = "") -> BundleRecord:
        """Make an earlier bundle active again (a new revision with the old content)."""
        history = await self.history()
        if len(history) < 2 and to_version is None:
            raise ValueError("there is no earlier policy bundle to roll back to")
        current = history[-1] if history else None
        if to_version is None:
            target = next((r for r in reversed(history[:-1])
                           if current is None or r.bundle.sha256 != current.bundle.sha256), None)
        else:
            target = next((r for r in reversed(history) if r.bundle.version == to_version), None)
        if target is None:
            raise ValueError(f"no policy bundle version {to_version!r} in the history")
        record = BundleRecord(target.bundle, datetime.now(UTC).isoformat(), by)
        revision = await (await self.kv()).put(ACTIVE, record.to_json())
        return BundleRecord(target.bundle, record.published_at, by, revision)


class LivePolicy:
    """The active bundle, compiled, kept current by a KV watch (hot reload without restarts)."""

    def __init__(self, store: BundleStore) -> None:
        self.store = store
        self.engine = CedarPolicy(DEFAULT_BUNDLE)
        self._task: asyncio.Task[None] | None = None
        self.listeners: list[Callable[[CedarPolicy], None]] = []

    @property
    def snapshot_id(self) -> str:
        return self.engine.snapshot_id

    async def start(self) -> None:
        record = await self.store.active()
        if record is not None:
            self._switch(record)
        kv = await self.store.kv()
        watcher = await kv.watch(ACTIVE, include_history=False)
        self._task = asyncio.create_task(self._watch(watcher))

    def _switch(self, record: BundleRecord) -> None:
        if record.bundle.sha256 == self.engine.bundle.sha256 and record.bundle.version == self.engine.bundle.version:
            return
        try:
            self.engine = CedarPolicy(record.bundle)
        except Exception as e:
            log.error("policy bundle %s rejected, keeping %s: %s", record.bundle.version, self.snapshot_id, e)
            return
        log.info("policy bundle now %s", self.snapshot_id)
        for listener in self.listeners:
            listener(self.engine)

    async def _watch(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is not None and entry.value:
                with contextlib.suppress(Exception):
                    self._switch(BundleRecord.from_json(entry.value, entry.revision or 0))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


@dataclass
class RecordedDecision:
    run_id: str
    tenant: str
    workflow_id: str
    workflow_version: str
    step_id: str
    step_type: str
    topic: str | None
    input: Any
    job_hash: str
    decision: str
    snapshot_id: str
    rule_ids: list[str]
    at: datetime


async def recent_decisions(nc: NATS, limit: int = 500) -> list[RecordedDecision]:
    """The last ``limit`` policy decisions in the event log, with the jobs they were about."""
    js = nc.jetstream()
    info = await js.stream_info(s.EVENTS_STREAM)
    last = info.state.last_seq
    # the jobs' StepReady events come shortly before their decisions: read a generous window
    window = max(1000, limit * 4)
    start = max(1, last - window + 1)
    sub = await js.subscribe(s.EVENTS_ALL, ordered_consumer=True,
                             config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start))
    ready: dict[tuple[str, str], dict[str, Any]] = {}
    started: dict[str, dict[str, Any]] = {}
    out: list[RecordedDecision] = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except nats.errors.TimeoutError:
                break
            try:
                envelopes = json.loads(msg.data)["events"]
            except (ValueError, KeyError, TypeError):
                continue  # bytes that are no commit (refused by every reader): nothing was decided in them
            for e in envelopes:
                data = e["data"]
                if e["type"] == ev.RunStarted.type_name:
                    started[e["run_id"]] = data
                elif e["type"] == ev.StepReady.type_name:
                    ready[(e["run_id"], data["step_id"])] = data
                elif e["type"] == ev.PolicyDecided.type_name:
                    job = ready.get((e["run_id"], data["step_id"]))
                    run = started.get(e["run_id"])
                    if job is None or run is None:
                        continue  # the job's StepReady is before the window
                    out.append(RecordedDecision(
                        run_id=e["run_id"], tenant=e["tenant"], workflow_id=run["workflow_id"],
                        workflow_version=run["workflow_version"], step_id=data["step_id"],
                        step_type=job.get("step_type", "job"), topic=job.get("topic"), input=job.get("input"),
                        job_hash=data["job_hash"], decision=data["decision"], snapshot_id=data["snapshot_id"],
                        rule_ids=list(data.get("rule_ids") or []), at=datetime.fromisoformat(e["at"])))
            if msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return out[-limit:]


@dataclass
class Change:
    decision: RecordedDecision
    new_decision: str
    new_rules: list[str]
    reason: str


async def simulate(nc: NATS, draft: CedarPolicy, workflows: dict[tuple[str, str], Workflow],
                   limit: int = 500) -> tuple[int, list[Change]]:
    """Re-decide recent jobs with a draft bundle; return (jobs checked, decisions that would change)."""
    decisions = await recent_decisions(nc, limit)
    changes = []
    for d in decisions:
        workflow = workflows.get((d.workflow_id, d.workflow_version))
        if workflow is None:
            continue
        request = request_for(workflow, d.step_id, tenant=d.tenant, job_input=d.input, job_hash=d.job_hash,
                              now=d.at, topic=d.topic, step_type=d.step_type)
        outcome = draft.decide(request)
        if outcome.decision != d.decision:
            changes.append(Change(d, outcome.decision, outcome.rule_ids, outcome.reason))
    return len(decisions), changes
