"""Alert rules, evaluated continuously by the auditor over the events it projects.

Pure: :class:`AlertEngine` gets each run's newly projected events (``observe``) and the clock
(``tick``, every couple of seconds) and returns the :class:`Alert` messages to publish, each a
state change (``firing`` or ``resolved``) of one condition:

- ``sla_run`` / ``sla_step``: the workflow's ``sla: {run_ms, steps: {step: ms}}`` was exceeded;
- ``approval_waiting``: an approval request has waited longer than ``approval_wait_s``;
- ``retry_rate``: more than ``retries_per_window`` retries of a topic within ``window_s``;
- ``denial_rate``: over ``denial_ratio`` of a tenant's policy decisions in ``window_s`` were denials
  (at least ``min_decisions`` of them);
- ``dead_letter_growth``: more than ``dead_letters_per_window`` new dead letters within ``window_s``;
- ``latency_drift``: a step of a topic took over ``drift_factor`` times the topic's recent median
  (``drift_samples`` durations, at least ``drift_min_samples``); resolved by the next normal one.
"""

from __future__ import annotations

import statistics
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, Field

from interlock.contracts import events as ev
from interlock.contracts import subjects as s
from interlock.contracts.messages import Alert
from interlock.core.workflow import Workflow

RUN_ENDS = ev.kinds(ev.RunSucceeded, ev.RunFailed, ev.RunDenied, ev.RunCancelled, ev.RunTimedOut)
APPROVAL_ENDS = ev.kinds(ev.ApprovalGranted, ev.ApprovalRejected, ev.ApprovalExpired, ev.ApprovalInvalidated)
MAX_TRACKED_RUNS = 10_000

FIRST_FIX = {
    "sla_run": "interlock run describe {run_id}: which step is slow or waiting (approval, retries, a missing agent)",
    "sla_step": "interlock run timeline {run_id}: the step's attempts, heartbeats and worker; interlock agent list",
    "approval_waiting": "interlock approval list: the request, its role and who holds the role",
    "retry_rate": "interlock run list --status failed and the step's errors: the agent behind {topic} is failing",
    "denial_rate": "interlock policy history / policy explain: a policy change may deny what it should allow",
    "dead_letter_growth": "interlock dlq list: the reasons of the newest dead letters",
    "latency_drift": "interlock agent list {topic}: a slow dependency or an overloaded agent",
}


class AlertRules(BaseModel):
    """Thresholds of the global rules (``INTERLOCK_ALERT_RULES``, JSON, on the auditor)."""

    window_s: float = Field(300.0, gt=0)
    approval_wait_s: float = Field(3600.0, gt=0)
    retries_per_window: int = Field(10, ge=1)
    denial_ratio: float = Field(0.5, gt=0, le=1)
    min_decisions: int = Field(10, ge=1)
    dead_letters_per_window: int = Field(5, ge=1)
    drift_factor: float = Field(3.0, gt=1)
    drift_samples: int = Field(50, ge=5)
    drift_min_samples: int = Field(20, ge=3)


@dataclass
class _Run:
    tenant: str
    workflow: Workflow | None = None
    workflow_id: str | None = None
    started_at: datetime | None = None
    step_started: dict[str, datetime] = field(default_factory=dict)
    topics: dict[str, str] = field(default_factory=dict)
    dispatched: dict[tuple[str, int], datetime] = field(default_factory=dict)
    approvals: dict[str, datetime] = field(default_factory=dict)


def _at(envelope: dict[str, Any]) -> datetime | None:
    try:
        return datetime.fromisoformat(str(envelope.get("at")))
    except ValueError:
        return None


class AlertEngine:
    """The state of every rule; returns the alerts whose state changed."""

    def __init__(self, rules: AlertRules | None = None, *, max_runs: int = MAX_TRACKED_RUNS) -> None:
        self.rules = rules or AlertRules()
        self._runs: OrderedDict[str, _Run] = OrderedDict()
        self._max_runs = max_runs
        self.firing: dict[str, Alert] = {}
        self._retries: dict[tuple[str, str], deque[datetime]] = {}
        self._decisions: dict[str, deque[tuple[datetime, bool]]] = {}
        self._dead_letters: deque[tuple[datetime, int]] = deque()
        self._durations: dict[str, deque[float]] = {}

    # -- state changes --------------------------------------------------------------------------
    def _fire(self, alert_id: str, rule: str, tenant: str, now: datetime, summary: str, context: dict[str, Any],
              **where: Any) -> list[Alert]:
        if alert_id in self.firing:
            return []
        fix = FIRST_FIX[rule].format(run_id=where.get("run_id") or "RUN", topic=where.get("topic") or "TOPIC")
        alert = Alert(alert_id=alert_id, rule=rule, state="firing", tenant=tenant, summary=summary, context=context,
                      first_fix=fix, at=now, **where)
        self.firing[alert_id] = alert
        return [alert]

    def _resolve(self, alert_id: str, now: datetime, summary: str | None = None) -> list[Alert]:
        alert = self.firing.pop(alert_id, None)
        if alert is None:
            return []
        return [alert.model_copy(update={"state": "resolved", "at": now, "summary": summary or alert.summary})]

    # -- runs -----------------------------------------------------------------------------------
    def _run(self, tenant: str, run_id: str) -> _Run:
        run = self._runs.get(run_id)
        if run is None:
            run = self._runs[run_id] = _Run(tenant)
            while len(self._runs) > self._max_runs:
                self._runs.popitem(last=False)
        return run

    def knows_workflow(self, run_id: str) -> bool:
        run = self._runs.get(run_id)
        return run is not None and run.workflow is not None

    def set_workflow(self, run_id: str, workflow: Workflow) -> None:
        """The run's definition (its SLA), looked up by the service when the run starts."""
        if run_id in self._runs:
            self._runs[run_id].workflow = workflow

    def observe(self, tenant: str, run_id: str, envelopes: Sequence[dict[str, Any]]) -> list[Alert]:
        run = self._run(tenant, run_id)
        out: list[Alert] = []
        for envelope in envelopes:
            at = _at(envelope)
            if at is not None:
                out += self._one(run, run_id, envelope, at)
        return out

    def _one(self, run: _Run, run_id: str, envelope: dict[str, Any], at: datetime) -> list[Alert]:
        kind = envelope.get("type")
        raw = envelope.get("data")
        data: dict[str, Any] = raw if isinstance(raw, dict) else {}
        step = str(envelope.get("step_id") or data.get("step_id") or "")
        if kind == ev.RunStarted.type_name:
            run.started_at, run.workflow_id = at, str(data.get("workflow_id") or "") or None
            return []
        if kind in RUN_ENDS:
            out = self._check_run_sla(run, run_id, at, ended=True)
            for step_id in list(run.step_started):
                out += self._check_step_sla(run, run_id, step_id, at, ended=True)
            for step_id in list(run.approvals):
                out += self._resolve(f"approval_waiting:{run_id}:{step_id}", at, "the run ended")
            self._runs.pop(run_id, None)
            return out
        if kind == ev.StepReady.type_name:
            run.topics[step] = str(data.get("topic") or "")
            return []
        if kind == ev.StepDispatched.type_name:
            attempt = int(data.get("attempt") or 1)
            run.dispatched[(step, attempt)] = at
            run.step_started.setdefault(step, at)
            run.topics[step] = str(data.get("topic") or run.topics.get(step, ""))
            return []
        if kind == ev.StepSucceeded.type_name or (kind == ev.StepFailed.type_name and data.get("final")):
            out = self._check_step_sla(run, run_id, step, at, ended=True)
            return out + self._latency(run, run_id, step, int(data.get("attempt") or 0), at)
        if kind == ev.StepFailed.type_name:
            return self._latency(run, run_id, step, int(data.get("attempt") or 0), at)
        if kind == ev.RetryScheduled.type_name:
            return self._retry(run, run_id, run.topics.get(step, ""), at)
        if kind == ev.PolicyDecided.type_name:
            return self._decision(run.tenant, data.get("decision") == "deny", at)
        if kind == ev.ApprovalRequested.type_name:
            run.approvals[step] = at
            return []
        if kind in APPROVAL_ENDS:
            run.approvals.pop(step, None)
            return self._resolve(f"approval_waiting:{run_id}:{step}", at, f"decided: {kind}")
        return []

    def _check_run_sla(self, run: _Run, run_id: str, now: datetime, *, ended: bool = False) -> list[Alert]:
        limit = run.workflow.sla.run_ms if run.workflow and run.workflow.sla else None
        alert_id = f"sla_run:{run_id}"
        if limit is None or run.started_at is None:
            return []
        took_ms = (now - run.started_at).total_seconds() * 1000
        out = []
        if took_ms > limit:
            verb = "took" if ended else "has been running for"
            out += self._fire(alert_id, "sla_run", run.tenant, now, f"run {verb} {took_ms:.0f} ms, over its SLA of "
                              f"{limit} ms", {"elapsed_ms": round(took_ms), "sla_ms": limit}, run_id=run_id,
                              workflow_id=run.workflow_id)
        if ended:
            out += self._resolve(alert_id, now, f"run ended after {took_ms:.0f} ms (SLA {limit} ms)")
        return out

    def _check_step_sla(self, run: _Run, run_id: str, step: str, now: datetime, *, ended: bool = False
                        ) -> list[Alert]:
        limits = run.workflow.sla.steps if run.workflow and run.workflow.sla else {}
        started = run.step_started.get(step)
        if step not in limits or started is None:
            return []
        limit, alert_id = limits[step], f"sla_step:{run_id}:{step}"
        took_ms = (now - started).total_seconds() * 1000
        out = []
        if took_ms > limit:
            verb = "took" if ended else "has been running for"
            out += self._fire(alert_id, "sla_step", run.tenant, now, f"step {step} {verb} {took_ms:.0f} ms, over its "
                              f"SLA of {limit} ms", {"elapsed_ms": round(took_ms), "sla_ms": limit}, run_id=run_id,
                              workflow_id=run.workflow_id, step_id=step, topic=run.topics.get(step) or None)
        if ended:
            run.step_started.pop(step, None)
            out += self._resolve(alert_id, now, f"step {step} ended after {took_ms:.0f} ms (SLA {limit} ms)")
        return out

    # -- rates ----------------------------------------------------------------------------------
    def _window(self, now: datetime) -> datetime:
        return now - timedelta(seconds=self.rules.window_s)

    def _retry(self, run: _Run, run_id: str, topic: str, now: datetime) -> list[Alert]:
        seen = self._retries.setdefault((run.tenant, topic), deque())
        seen.append(now)
        return self._retry_state(run.tenant, topic, now)

    def _retry_state(self, tenant: str, topic: str, now: datetime) -> list[Alert]:
        seen = self._retries.get((tenant, topic), deque())
        while seen and seen[0] < self._window(now):
            seen.popleft()
        alert_id, limit = f"retry_rate:{tenant}:{topic}", self.rules.retries_per_window
        if len(seen) > limit:
            return self._fire(alert_id, "retry_rate", tenant, now, f"{len(seen)} retries of {topic} in "
                              f"{self.rules.window_s:.0f} s (limit {limit})",
                              {"retries": len(seen), "window_s": self.rules.window_s, "limit": limit}, topic=topic)
        return self._resolve(alert_id, now, f"retries of {topic} back to {len(seen)} in the window")

    def _decision(self, tenant: str, denied: bool, now: datetime) -> list[Alert]:
        self._decisions.setdefault(tenant, deque()).append((now, denied))
        return self._denial_state(tenant, now)

    def _denial_state(self, tenant: str, now: datetime) -> list[Alert]:
        seen = self._decisions.get(tenant, deque())
        while seen and seen[0][0] < self._window(now):
            seen.popleft()
        denials = sum(1 for _, d in seen if d)
        alert_id = f"denial_rate:{tenant}"
        if len(seen) >= self.rules.min_decisions and denials / len(seen) > self.rules.denial_ratio:
            return self._fire(alert_id, "denial_rate", tenant, now, f"{denials} of {len(seen)} policy decisions "
                              f"denied in {self.rules.window_s:.0f} s", {"denials": denials, "decisions": len(seen),
                                                                           "ratio": self.rules.denial_ratio})
        return self._resolve(alert_id, now, f"denials back to {denials} of {len(seen)}")

    def dead_letters(self, total: int, now: datetime) -> list[Alert]:
        """The dead-letter stream's message count now (the service polls it)."""
        self._dead_letters.append((now, total))
        while len(self._dead_letters) > 1 and self._dead_letters[1][0] <= self._window(now):
            self._dead_letters.popleft()
        grown = total - self._dead_letters[0][1]
        alert_id, limit = "dead_letter_growth", self.rules.dead_letters_per_window
        if grown > limit:
            return self._fire(alert_id, "dead_letter_growth", s.SYSTEM_TENANT, now, f"{grown} new dead letters in "
                              f"{self.rules.window_s:.0f} s (limit {limit})", {"new": grown, "total": total})
        return self._resolve(alert_id, now, f"{grown} new dead letters in the window")

    def _latency(self, run: _Run, run_id: str, step: str, attempt: int, now: datetime) -> list[Alert]:
        started = run.dispatched.pop((step, attempt), None)
        topic = run.topics.get(step, "")
        if started is None or not topic:
            return []
        took = (now - started).total_seconds()
        recent = self._durations.setdefault(topic, deque(maxlen=self.rules.drift_samples))
        out: list[Alert] = []
        alert_id = f"latency_drift:{run.tenant}:{topic}"
        if len(recent) >= self.rules.drift_min_samples:
            baseline = statistics.median(recent)
            if baseline > 0 and took > self.rules.drift_factor * baseline:
                out = self._fire(alert_id, "latency_drift", run.tenant, now, f"{topic} took {took * 1000:.0f} ms, "
                                 f"{took / baseline:.1f}x its recent median of {baseline * 1000:.0f} ms",
                                 {"took_s": round(took, 4), "median_s": round(baseline, 4), "samples": len(recent)},
                                 topic=topic, run_id=run_id, step_id=step)
            else:
                out = self._resolve(alert_id, now, f"{topic} back to {took * 1000:.0f} ms")
        recent.append(took)
        return out

    # -- the clock ------------------------------------------------------------------------------
    def tick(self, now: datetime) -> list[Alert]:
        """Time-based conditions: runs and steps past their SLA, approvals waiting, rates decaying."""
        out: list[Alert] = []
        wait = timedelta(seconds=self.rules.approval_wait_s)
        for run_id, run in list(self._runs.items()):
            out += self._check_run_sla(run, run_id, now)
            for step in list(run.step_started):
                out += self._check_step_sla(run, run_id, step, now)
            for step, asked in run.approvals.items():
                if now - asked > wait:
                    out += self._fire(f"approval_waiting:{run_id}:{step}", "approval_waiting", run.tenant, now,
                                      f"approval of {step} has waited {(now - asked).total_seconds():.0f} s "
                                      f"(limit {self.rules.approval_wait_s:.0f} s)",
                                      {"waited_s": round((now - asked).total_seconds())}, run_id=run_id,
                                      workflow_id=run.workflow_id, step_id=step)
        for tenant, topic in list(self._retries):
            out += self._retry_state(tenant, topic, now)
        for tenant in list(self._decisions):
            out += self._denial_state(tenant, now)
        return out
