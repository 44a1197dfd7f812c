"""Identifiers that must come out the same wherever they are computed."""

from __future__ import annotations

import uuid

# Fixed namespace: run ids are uuid5(namespace, tenant/workflow/idempotency key), so the same
# trigger always names the same run and can never start a second one.
RUN_NAMESPACE = uuid.UUID("6f1c2a8e-0d4b-5b7e-9a51-3c2d7e8f9a10")


def run_id_for(tenant: str, workflow_id: str, idempotency_key: str) -> uuid.UUID:
    return uuid.uuid5(RUN_NAMESPACE, f"{tenant}/{workflow_id}/{idempotency_key}")


def job_id(run_id: str, step_id: str, attempt: int) -> str:
    return f"{run_id}:{step_id}@{attempt}"


def parse_job_id(value: str) -> tuple[str, str, int]:
    """``run_id:step_id@attempt`` -> (run_id, step_id, attempt); ValueError if malformed."""
    run_id, sep, rest = value.partition(":")
    step_id, at, attempt = rest.rpartition("@")
    if not sep or not at or not run_id or not step_id or not attempt.isdigit():
        raise ValueError(f"job id {value!r} is not run_id:step_id@attempt")
    return run_id, step_id, int(attempt)
