"""Timeline text (``interlock.core.timeline``): a summary for every event type, never an error."""

from __future__ import annotations

import subprocess
import sys

from interlock.contracts import events as ev
from interlock.core.timeline import UNKNOWN_TYPE_SUMMARY, describe


def test_every_event_type_has_a_summary() -> None:
    for type_name in ev.EVENT_TYPES:
        summary, details = describe(type_name, {})
        assert summary and summary != UNKNOWN_TYPE_SUMMARY and isinstance(details, dict)
    assert describe("Nope", {"x": 1}) == (UNKNOWN_TYPE_SUMMARY, {})
    assert describe(ev.RetryScheduled.type_name, {"attempt": 3, "delay_ms": 1500})[0] == \
        "retry 3 scheduled in 1500 ms"
    assert describe(ev.StepFailed.type_name, {"attempt": 1, "final": True, "error": {"message": "x"}})[0] == \
        "failed attempt 1: x (final)"
    assert describe(ev.ApprovalExpired.type_name, {"job_hash": "1a2b3c4d5e"})[0] == "approval expired (hash 1a2b3c…)"
    refused = {"principal": "mallory", "decision": "reject", "reason": "'mallory' lacks role 'sre'",
               "job_hash": "1a2b3c4d5e", "role": "sre", "required_role": "sre"}
    assert describe(ev.ApprovalRefused.type_name, refused) == (
        "rejection by mallory refused: 'mallory' lacks role 'sre' (hash 1a2b3c…); the request stays pending",
        {"principal": "mallory", "role": "sre", "job_hash": "1a2b3c4d5e", "required_role": "sre"})


def test_odd_data_reads_as_placeholders() -> None:
    assert describe(ev.StepDispatched.type_name, {"attempt": True, "job_id": None})[0] == "dispatched attempt 0 (job ?)"
    assert describe(ev.RunTimedOut.type_name, {"timeout_ms": 2**70})[0] == "run timed out after 0 ms"
    assert describe(ev.CompensationStarted.type_name, {"steps": "a,b", "failed_step": 7})[0] == \
        "compensation started after 7 failed: nothing"


def test_the_timeline_needs_no_service() -> None:
    # the CLI and the client describe events without importing the auditor (or any service)
    code = ("import sys, interlock.core.timeline; "
            "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('interlock.')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['contracts', 'core']"
