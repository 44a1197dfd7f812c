"""One-line event summaries for live output.

The summaries live with the auditor's timeline today and are moving to
``interlock.core.timeline``: at the merge, this import is the one place to change.
"""

from __future__ import annotations

from typing import Any

from interlock.auditor.projection import describe


def describe_event(envelope: dict[str, Any]) -> str:
    """What an event envelope says, in one line (the timeline's summary)."""
    summary, _ = describe(str(envelope.get("type", "")), envelope.get("data") or {})
    return summary
