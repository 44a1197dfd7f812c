"""Identifiers that must come out the same wherever they are computed."""

from __future__ import annotations

from interlock.contracts.protocol import RUN_ID_NAMESPACE, run_id_for

# Run ids are uuid5(namespace, tenant/workflow/idempotency key), so the same trigger always names
# the same run and can never start a second one; part of the wire contract (clients compute it).
RUN_NAMESPACE = RUN_ID_NAMESPACE

__all__ = ["RUN_NAMESPACE", "job_id", "parse_job_id", "run_id_for"]


def job_id(run_id: str, step_id: str, attempt: int) -> str:
    return f"{run_id}:{step_id}@{attempt}"


def parse_job_id(value: str) -> tuple[str, str, int]:
    """``run_id:step_id@attempt`` -> (run_id, step_id, attempt); ValueError if malformed."""
    run_id, sep, rest = value.partition(":")
    step_id, at, attempt = rest.rpartition("@")
    if not sep or not at or not run_id or not step_id or not attempt.isdigit():
        raise ValueError(f"job id {value!r} is not run_id:step_id@attempt")
    return run_id, step_id, int(attempt)
