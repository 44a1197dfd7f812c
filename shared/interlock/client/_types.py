"""Plain results the client returns besides the contracts' messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from interlock.contracts import events as ev
from interlock.contracts.messages import DeadLetter, DeadLetterStatus
from interlock.core.run import Run
from interlock.core.workflow import Workflow

TERMINAL_EVENTS: frozenset[str] = ev.kinds(ev.RunSucceeded, ev.RunFailed, ev.RunDenied, ev.RunCancelled,
                                            ev.RunTimedOut)
"""Type names of the events that end a run."""


@dataclass(frozen=True)
class PendingApproval:
    """An approval a run is waiting for: what a decision must be bound to."""

    run_id: str
    step_id: str
    job_hash: str
    snapshot_id: str
    approver_role: str | None
    input: Any


@dataclass(frozen=True)
class RerunPlan:
    """What a re-run from ``from_step`` does: runs ``rerun`` again, reuses the rest's outputs."""

    source: Run
    workflow: Workflow
    from_step: str
    rerun: frozenset[str]
    reuse: dict[str, Any]

    def steps(self) -> list[tuple[str, bool]]:
        """(step id, runs again?) for every step, in topological order."""
        return [(sid, sid in self.rerun or sid not in self.reuse) for sid in self.workflow.topological_order()]


@dataclass(frozen=True)
class PolicyRevision:
    """One published policy bundle (``builtin``: nothing was published; the default bundle)."""

    revision: int
    snapshot_id: str
    version: str
    source: str
    published_at: str = ""
    published_by: str = ""
    builtin: bool = False


@dataclass(frozen=True)
class PolicyRuleMatch:
    """Which rules matched for one action of a decision (``policy explain``)."""

    action: str
    decision: str
    matched: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PolicyDecision:
    """The active policy's decision for one job."""

    decision: str
    snapshot_id: str
    rule_ids: list[str]
    reason: str = ""
    approver_role: str | None = None
    approval_expires_ms: int | None = None
    constraints: dict[str, Any] = field(default_factory=dict)
    explain: list[PolicyRuleMatch] = field(default_factory=list)


@dataclass(frozen=True)
class PolicyChange:
    """A recent decision a draft bundle would decide differently."""

    run_id: str
    step_id: str
    was: str
    now: str
    rules: list[str]
    reason: str


@dataclass(frozen=True)
class PolicySimulation:
    """A draft bundle replayed over recent decisions: how many were checked, which would change."""

    checked: int
    changes: list[PolicyChange]


@dataclass(frozen=True)
class DeadLetterEntry:
    """A dead letter as ``interlock dlq`` lists it: its id (its ``IL_DLQ`` stream sequence), the
    letter (an unreadable one for a foreign message), and what was done about it."""

    id: int
    letter: DeadLetter
    readable: bool
    """False: the message on the dead-letter subject was not a DeadLetter (it cannot be replayed)."""
    record: DeadLetterStatus | None = None
    """Every resolve and replay, oldest first; None: nothing done yet (open)."""

    @property
    def status(self) -> str:
        """``open``, ``resolved`` or ``replayed`` (the last action's)."""
        return self.record.status if self.record is not None else "open"
