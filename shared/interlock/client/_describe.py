"""One-line event summaries for live output, and the lines the tools print for events.

The summaries live with the auditor's timeline today and are moving to
``interlock.core.timeline``: at the merge, this import is the one place to change.
"""

from __future__ import annotations

from typing import Any

from interlock.core.timeline import describe


def describe_event(envelope: dict[str, Any]) -> str:
    """What an event envelope says, in one line (the timeline's summary)."""
    summary, _ = describe(str(envelope.get("type", "")), envelope.get("data") or {})
    return summary


def progress_line(envelope: dict[str, Any], elapsed: float) -> str:
    """An event as it is appended: seconds since the run started, service, step#attempt, summary."""
    attempt = f"#{envelope['attempt']}" if envelope.get("attempt") else ""
    step = (envelope.get("step_id") or "") + attempt
    return f"  +{elapsed:6.2f}s  {envelope.get('service', ''):<10} {step:<22} {describe_event(envelope)}"


def timeline_line(row: dict[str, Any]) -> str:
    """A row of the auditor's timeline (:meth:`Client.timeline`): seq, time of day, service, step, summary."""
    at = str(row.get("at", ""))[11:23]
    step = (row.get("step_id") or "") + (f"#{row['attempt']}" if row.get("attempt") else "")
    return f"  {row.get('seq', ''):>4}  {at}  {row.get('service', ''):<10} {step:<22} {row.get('summary', '')}"
