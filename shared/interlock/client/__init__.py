"""``interlock.client``: one async client for everything a tool does with a running Interlock.

Used by the CLI, the dev stack's demo and drill, the benchmarks and the coming HTTP API::

    async with await Client.connect() as client:
        run_id = await client.start_run("incident-remediation", {"alert": {...}})
        final = await client.wait(run_id, timeout=60)

Every failure is a :class:`ClientError` (``Unavailable``, ``Refused``, ``NotFound``) whose
str() is one line; an invalid workflow raises :class:`WorkflowInvalid` listing every problem.
"""

from __future__ import annotations

from interlock.client._client import Client
from interlock.client._describe import describe_event, progress_line, timeline_line
from interlock.client._errors import ClientError, NotFound, Refused, Unavailable
from interlock.client._settings import ClientSettings
from interlock.client._types import (
    TERMINAL_EVENTS,
    DeadLetterEntry,
    PendingApproval,
    PolicyChange,
    PolicyDecision,
    PolicyRevision,
    PolicyRuleMatch,
    PolicySimulation,
    RerunPlan,
)
from interlock.core.workflow import WorkflowInvalid

__all__ = [
    "TERMINAL_EVENTS",
    "Client",
    "ClientError",
    "ClientSettings",
    "DeadLetterEntry",
    "NotFound",
    "PendingApproval",
    "PolicyChange",
    "PolicyDecision",
    "PolicyRevision",
    "PolicyRuleMatch",
    "PolicySimulation",
    "Refused",
    "RerunPlan",
    "Unavailable",
    "WorkflowInvalid",
    "describe_event",
    "progress_line",
    "timeline_line",
]
