"""Compare two runs step by step, and group failed runs by where they broke.

Pure functions of run logs (lists of event envelopes, as :meth:`Client.events` returns them) and
of projection rows: ``interlock run diff``, ``interlock run failures`` and their API routes are
thin layers over them.

Sensitive values never appear in clear: the log holds them sealed, and every value shown here is
redacted (an envelope, or a value under a sensitive key name that somehow reached the log in
clear, reads as ``[sensitive]``). Two sealed values are compared by their redacted form, so
sensitive values are *not compared* (their ciphertexts always differ): a difference that is only
inside a sealed value is not reported, and the step says so in ``sensitive``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from interlock.contracts import events as ev
from interlock.core.codec import apply_envelope, event_from_envelope
from interlock.core.run import Run, StepState
from interlock.core.sealed import REDACTED, SEALED, SensitiveRules, contains_sealed, redact
from interlock.core.steps import base_step_id
from interlock.core.workflow import duration_ms

COMPARED = ("status", "attempts", "input", "output", "error", "decision", "rules", "approval", "cache")
"""The step fields a divergence is looked for in, in the order they are reported. Durations
are shown but never count as a divergence (two runs never take exactly as long)."""

RUN_COMPARED = ("workflow_version", "input", "status", "reason")

_MASK_RULES = SensitiveRules()  # the default sensitive key names, for values that reached the log in clear


def shown(value: Any, root: str = "value") -> Any:
    """``value`` as people may see it: sealed values and values under sensitive key names redacted."""
    masked = _MASK_RULES.seal_tree(value, root, lambda _clear: {SEALED: {}}) if value is not None else None
    return redact(masked)


def replay(envelopes: Sequence[Mapping[str, Any]]) -> Run:
    """The run that replaying ``envelopes`` (a whole log, in order) gives."""
    if not envelopes or envelopes[0].get("type") != ev.RunStarted.type_name:
        raise ValueError("a run log starts with RunStarted")
    run: Run = event_from_envelope(dict(envelopes[0])).mutate(None)
    for envelope in envelopes[1:]:
        if envelope.get("type") in ev.EVENT_TYPES:  # a type this version does not know changes nothing here
            apply_envelope(run, dict(envelope))
    return run


@dataclass
class StepView:
    """What the diff shows of one step of one run."""

    step_id: str
    status: str
    attempts: int
    input: Any
    output: Any
    error: str | None
    decision: str | None
    rules: list[str]
    snapshot_id: str | None
    approval: str | None
    cache: str | None  # "run RUN step STEP" when the output came from the result cache
    job_hash: str
    started_at: str | None
    ended_at: str | None
    duration_ms: int | None
    sensitive: bool = False

    def compared(self, name: str) -> Any:
        return getattr(self, name)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in (
            "status", "attempts", "input", "output", "error", "decision", "rules", "snapshot_id", "approval",
            "cache", "job_hash", "started_at", "ended_at", "duration_ms", "sensitive")}


def _approval_text(state: StepState) -> str | None:
    approval = state.approval
    if approval is None:
        return None
    who = f" by {approval.approver}" if approval.approver else ""
    return f"{approval.status}{who} ({approval.approver_role})"


def _error_text(state: StepState) -> str | None:
    if state.error is None or state.status == "succeeded":
        return None
    kind = f"[{state.error.kind}] " if state.error.kind else ""
    return kind + state.error.message


def _ms(start: str | None, end: str | None) -> int | None:
    if not start or not end:
        return None
    return int((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds() * 1000)


def _times(envelopes: Iterable[Mapping[str, Any]]) -> dict[str, tuple[str | None, str | None]]:
    """Step id -> (first event's time, last event's time)."""
    out: dict[str, tuple[str | None, str | None]] = {}
    for envelope in envelopes:
        sid = envelope.get("step_id")
        if not sid:
            continue
        at = str(envelope.get("at") or "") or None
        first = out.get(sid, (at, at))[0]
        out[sid] = (first, at)
    return out


def _payload(value: Any, ref: Any, root: str) -> Any:
    if ref is not None:  # a large payload: its digest identifies it
        return {"$ref": getattr(ref, "sha256", None) or str(ref)}
    return shown(value, root)


def step_views(envelopes: Sequence[Mapping[str, Any]]) -> tuple[Run, dict[str, StepView]]:
    """The run and a view of each of its steps, in the order they were made ready."""
    run = replay(envelopes)
    times = _times(envelopes)
    views: dict[str, StepView] = {}
    for sid, state in run.steps.items():
        started, last = times.get(sid, (None, None))
        ended = last if state.terminal else None
        decision = state.decision
        hit = state.cache_hit
        views[sid] = StepView(
            step_id=sid, status=state.status, attempts=state.attempt,
            input=_payload(state.input, state.input_ref, f"steps.{base_step_id(sid)}.input"),
            output=_payload(state.output, state.output_ref, f"steps.{base_step_id(sid)}.output"),
            error=_error_text(state), decision=decision.decision if decision else None,
            rules=list(decision.rule_ids) if decision else [], snapshot_id=decision.snapshot_id if decision else None,
            approval=_approval_text(state),
            cache=f"run {hit.source_run_id} step {hit.source_step_id}" if hit is not None else None,
            job_hash=state.job_hash, started_at=started, ended_at=ended, duration_ms=_ms(started, ended),
            sensitive=contains_sealed(state.input) or contains_sealed(state.output),
        )
    return run, views


@dataclass
class StepDiff:
    step_id: str
    a: StepView | None
    b: StepView | None
    differs: list[str] = field(default_factory=list)
    first_divergence: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"step_id": self.step_id, "a": self.a.as_dict() if self.a else None,
                "b": self.b.as_dict() if self.b else None, "differs": self.differs,
                "first_divergence": self.first_divergence}


@dataclass
class RunDiff:
    """Two runs aligned step by step; ``first_divergence`` is the first step (in the order the
    steps were made ready) that differs, or None when every step agrees."""

    a: dict[str, Any]
    b: dict[str, Any]
    run_differs: list[str]
    steps: list[StepDiff]

    @property
    def first_divergence(self) -> StepDiff | None:
        return next((d for d in self.steps if d.first_divergence), None)

    def as_dict(self) -> dict[str, Any]:
        first = self.first_divergence
        return {"a": self.a, "b": self.b, "run_differs": self.run_differs,
                "first_divergence": {"step_id": first.step_id, "fields": first.differs} if first else None,
                "steps": [d.as_dict() for d in self.steps]}


def _run_summary(run: Run, envelopes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    started = str(envelopes[0].get("at") or "") or None
    ended = run.ended_at.isoformat() if run.ended_at else None
    return {"run_id": run.run_id, "workflow_id": run.workflow_id, "workflow_version": run.workflow_version,
            "status": run.status, "reason": run.reason, "input": _payload(run.input, run.input_ref, "input"),
            "started_at": started, "ended_at": ended, "duration_ms": _ms(started, ended)}


def _aligned(a: Sequence[str], b: Sequence[str]) -> list[str]:
    """Step ids of both runs: A's order, each of B's own steps after the step it follows in B."""
    order = list(a)
    for i, sid in enumerate(b):
        if sid in order:
            continue
        before = next((order.index(prev) for prev in reversed(b[:i]) if prev in order), -1)
        order.insert(before + 1, sid)
    return order


def diff_runs(envelopes_a: Sequence[Mapping[str, Any]], envelopes_b: Sequence[Mapping[str, Any]]) -> RunDiff:
    """Compare two runs (their whole logs) step by step; see :data:`COMPARED`."""
    run_a, views_a = step_views(envelopes_a)
    run_b, views_b = step_views(envelopes_b)
    summary_a, summary_b = _run_summary(run_a, envelopes_a), _run_summary(run_b, envelopes_b)
    run_differs = [name for name in RUN_COMPARED if summary_a[name] != summary_b[name]]
    if run_a.workflow_id != run_b.workflow_id:
        run_differs.insert(0, "workflow_id")
    diffs: list[StepDiff] = []
    for sid in _aligned(list(views_a), list(views_b)):
        a, b = views_a.get(sid), views_b.get(sid)
        if a is None or b is None:
            differs = ["missing in " + ("a" if a is None else "b")]
        else:
            differs = [name for name in COMPARED if a.compared(name) != b.compared(name)]
        diffs.append(StepDiff(sid, a, b, differs))
    first = next((d for d in diffs if d.differs), None)
    if first is not None:
        first.first_divergence = True
    return RunDiff(summary_a, summary_b, run_differs, diffs)


# -- failures ----------------------------------------------------------------------------------
def since_time(raw: str, now: datetime) -> datetime:
    """``--since`` / ``?since=``: a duration back from ``now`` (``7d``, ``12h``, ``30m``) or an ISO
    8601 time (UTC when it names no offset). Raises ValueError naming what is wrong."""
    try:
        return now - timedelta(milliseconds=duration_ms(raw))
    except ValueError:
        pass
    try:
        at = datetime.fromisoformat(raw)
    except ValueError:
        raise ValueError(f"{raw!r} is neither a duration (7d, 12h, 30m) nor an ISO 8601 time") from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


@dataclass
class FailureGroup:
    """Failed runs that broke at the same step with the same error."""

    step_id: str
    error: str
    runs: int
    first_at: str | None
    last_at: str | None
    run_ids: list[str]  # the latest ones first, at most :data:`RUN_IDS_SHOWN`

    def as_dict(self) -> dict[str, Any]:
        return {"step_id": self.step_id, "error": self.error, "runs": self.runs, "first_at": self.first_at,
                "last_at": self.last_at, "run_ids": self.run_ids}


RUN_IDS_SHOWN = 5
NO_STEP = "(run)"  # a run that failed with no failed step (a budget, a timeout of the whole run)


def group_failures(rows: Iterable[Mapping[str, Any]]) -> list[FailureGroup]:
    """Group failed runs by the step and error where they broke, most frequent first.

    ``rows``: one per failed run, with ``run_id``, ``started_at`` and the ``step_id`` and ``error``
    of the step it broke at (its first failed step; None: the run's own ``reason`` is the error).
    """
    groups: dict[tuple[str, str], FailureGroup] = {}
    for row in sorted(rows, key=lambda r: str(r.get("started_at") or ""), reverse=True):
        step = str(row.get("step_id") or NO_STEP)
        error = str(row.get("error") or row.get("reason") or "") or "(no error recorded)"
        if REDACTED in error:  # never group on, or show, anything sensitive
            error = REDACTED
        group = groups.get((step, error))
        at = str(row.get("started_at") or "") or None
        if group is None:
            group = groups[(step, error)] = FailureGroup(step, error, 0, at, at, [])
        group.runs += 1
        group.first_at = at or group.first_at
        if len(group.run_ids) < RUN_IDS_SHOWN:
            group.run_ids.append(str(row.get("run_id")))
    return sorted(groups.values(), key=lambda g: (-g.runs, g.step_id, g.error))
