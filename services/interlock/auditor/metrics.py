"""Metrics derived from the log: what the auditor observes as it projects each new event.

The auditor sees every commit exactly once per copy, in order, so counts taken here are the
log's own (runs started and ended, step durations, scheduling delays, retries, timeouts, policy
decisions, pending approvals), whichever service copy appended them. :class:`LogMetrics` is
pure: it turns envelopes into :class:`Observation` values; the service records them on the
OpenTelemetry instruments of :mod:`interlock.runtime.metrics`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from interlock.contracts import events as ev
from interlock.runtime import metrics as m

Instrument = Literal["runs_started", "runs_ended", "step_duration", "scheduling_delay", "retries", "timeouts",
                     "policy_decisions", "approval_requested", "approval_decided", "llm_tokens", "llm_cost"]

RUN_END_STATUS = {ev.RunSucceeded.type_name: "succeeded", ev.RunFailed.type_name: "failed",
                  ev.RunDenied.type_name: "denied", ev.RunCancelled.type_name: "cancelled",
                  ev.RunTimedOut.type_name: "timed_out"}
APPROVAL_ENDS = ev.kinds(ev.ApprovalGranted, ev.ApprovalRejected, ev.ApprovalExpired, ev.ApprovalInvalidated)
MAX_TRACKED_RUNS = 10_000  # runs whose workflow and step times are remembered (oldest forgotten first)


@dataclass(frozen=True)
class Observation:
    instrument: Instrument
    value: float
    labels: dict[str, str]


@dataclass
class _RunState:
    tenant: str
    workflow: str = "unknown"
    topics: dict[str, str] = field(default_factory=dict)
    ready_at: dict[str, datetime] = field(default_factory=dict)
    dispatched_at: dict[tuple[str, int], datetime] = field(default_factory=dict)


def _at(envelope: dict[str, Any]) -> datetime | None:
    value = envelope.get("at")
    if isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return None


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return max(0.0, (end - start).total_seconds())


class LogMetrics:
    """Per-run memory (workflow, topics, step times) and the observations each event yields."""

    def __init__(self, max_runs: int = MAX_TRACKED_RUNS) -> None:
        self._runs: OrderedDict[str, _RunState] = OrderedDict()
        self._max_runs = max_runs
        self._awaiting: dict[tuple[str, str], tuple[str, datetime]] = {}  # (run, step) -> (tenant, asked at)

    def _run(self, tenant: str, run_id: str) -> _RunState:
        state = self._runs.get(run_id)
        if state is None:
            state = self._runs[run_id] = _RunState(tenant)
            while len(self._runs) > self._max_runs:
                self._runs.popitem(last=False)
        else:
            self._runs.move_to_end(run_id)
        return state

    def pending_approvals(self) -> dict[str, tuple[int, datetime]]:
        """Per tenant: approvals still waiting, and when the oldest was requested."""
        out: dict[str, tuple[int, datetime]] = {}
        for tenant, asked in self._awaiting.values():
            count, oldest = out.get(tenant, (0, asked))
            out[tenant] = (count + 1, min(oldest, asked))
        return out

    def observe(self, tenant: str, run_id: str, envelopes: Sequence[dict[str, Any]]) -> list[Observation]:
        """What the newly projected ``envelopes`` of one run add to the metrics."""
        run = self._run(tenant, run_id)
        out: list[Observation] = []
        for envelope in envelopes:
            out.extend(self._one(run, run_id, envelope))
        return out

    def _one(self, run: _RunState, run_id: str, envelope: dict[str, Any]) -> list[Observation]:
        kind = envelope.get("type")
        raw = envelope.get("data")
        data: dict[str, Any] = raw if isinstance(raw, dict) else {}
        at = _at(envelope)
        step = str(envelope.get("step_id") or data.get("step_id") or "")
        base = {"tenant": run.tenant, "workflow": run.workflow}
        if kind == ev.RunStarted.type_name:
            run.workflow = str(data.get("workflow_id") or "unknown")
            return [Observation("runs_started", 1, {"tenant": run.tenant, "workflow": run.workflow})]
        if kind in RUN_END_STATUS:
            self._runs.pop(run_id, None)
            for key in [k for k in self._awaiting if k[0] == run_id]:
                del self._awaiting[key]
            return [Observation("runs_ended", 1, {**base, "status": RUN_END_STATUS[str(kind)]})]
        if kind == ev.StepReady.type_name:
            run.topics[step] = str(data.get("topic") or data.get("step_type") or "")
            if at is not None:
                run.ready_at[step] = at
            return []
        topic = run.topics.get(step, "")
        if kind == ev.PolicyDecided.type_name:
            rules = data.get("rule_ids") or [""]
            return [Observation("policy_decisions", 1, {**base, "outcome": str(data.get("decision")),
                                                        "rule": str(rule)}) for rule in rules]
        if kind == ev.StepDispatched.type_name:
            attempt = int(data.get("attempt") or 1)
            run.topics[step] = str(data.get("topic") or topic)
            if at is not None:
                run.dispatched_at[(step, attempt)] = at
            delay = _seconds(run.ready_at.pop(step, None), at) if attempt == 1 else None
            labels = {**base, "topic": run.topics[step]}
            return [] if delay is None else [Observation("scheduling_delay", delay, labels)]
        if kind in ev.kinds(ev.StepSucceeded, ev.StepFailed):
            attempt = int(data.get("attempt") or 0)
            status = "succeeded" if kind == ev.StepSucceeded.type_name else "failed"
            took = _seconds(run.dispatched_at.pop((step, attempt), None), at)
            out = [] if took is None else [Observation("step_duration", took, {**base, "topic": topic,
                                                                                "status": status})]
            return out + _usage(data, {**base, "topic": topic})
        if kind == ev.RetryScheduled.type_name:
            return [Observation("retries", 1, {**base, "topic": topic})]
        if kind == ev.StepTimedOut.type_name:
            return [Observation("timeouts", 1, {**base, "topic": topic, "reason": str(data.get("reason"))})]
        if kind == ev.ApprovalRequested.type_name and at is not None:
            self._awaiting[(run_id, step)] = (run.tenant, at)
            return [Observation("approval_requested", 1, base)]
        if kind in APPROVAL_ENDS:
            asked = self._awaiting.pop((run_id, step), None)
            waited = _seconds(asked[1] if asked else None, at)
            outcome = str(kind).removeprefix("Approval").lower()
            return [Observation("approval_decided", waited or 0.0, {**base, "outcome": outcome})]
        return []


def _usage(data: dict[str, Any], labels: dict[str, str]) -> list[Observation]:
    """Tokens (by direction) and cost of an outcome's model calls, by model."""
    out = []
    for call in data.get("usage") or []:
        if not isinstance(call, dict):
            continue
        model = {**labels, "model": str(call.get("model") or "unknown")}
        for direction in ("input", "output"):
            tokens = call.get(f"{direction}_tokens")
            if isinstance(tokens, int) and tokens > 0:
                out.append(Observation("llm_tokens", tokens, {**model, "direction": direction}))
        cost = call.get("cost_usd")
        if isinstance(cost, int | float) and cost > 0:
            out.append(Observation("llm_cost", float(cost), model))
    return out


def record(observation: Observation) -> None:
    """Put one observation on its OpenTelemetry instrument."""
    o = observation
    if o.instrument in ("step_duration", "scheduling_delay", "approval_decided"):
        histogram = {"step_duration": m.step_duration, "scheduling_delay": m.scheduling_delay,
                     "approval_decided": m.approval_wait}[o.instrument]
        histogram.record(o.value, o.labels)
        return
    counter = {"runs_started": m.runs_started, "runs_ended": m.runs_ended, "retries": m.retries,
               "timeouts": m.timeouts, "policy_decisions": m.policy_decisions,
               "approval_requested": m.approvals_requested, "llm_tokens": m.llm_tokens,
               "llm_cost": m.llm_cost}[o.instrument]
    counter.add(o.value, o.labels)


def publish_gauges(metrics_of_log: LogMetrics, now: datetime) -> None:
    """Pending approvals and the oldest one's age, per tenant, for the next scrape."""
    pending = metrics_of_log.pending_approvals()
    m.gauges.approvals_pending = {tenant: count for tenant, (count, _) in pending.items()}
    m.gauges.oldest_approval_age = {tenant: max(0.0, (now - oldest).total_seconds())
                                    for tenant, (_, oldest) in pending.items()}
