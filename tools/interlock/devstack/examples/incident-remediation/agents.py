"""Example agents for the incident-remediation workflow: deterministic, no external calls.

``apply_patch`` fails on its first attempt to show a retry. Side effects are idempotent per
idempotency key: each is recorded once in the file named by INTERLOCK_SIDE_EFFECTS (if set), and
a repeat under the same key (a retry after a worker died mid-job) does nothing, so drills can
check that nothing happened twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
from typing import Any

from interlock.worker import JobContext, RetryableError, Worker

worker = Worker("incident-agents")


def record_side_effect(ctx: JobContext, what: str) -> bool:
    """Do the effect once per idempotency key; False when an earlier attempt already did it.

    A worker killed after the effect but before its result landed gets the job again (a retry
    under the same key): the key, not the attempt, decides. The lock makes check-and-record
    atomic across worker processes sharing the file.
    """
    path = os.environ.get("INTERLOCK_SIDE_EFFECTS")
    if not path:
        return True
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(0)
            for line in f:
                with contextlib.suppress(ValueError):
                    if json.loads(line).get("key") == ctx.idempotency_key:
                        return False
            f.write(json.dumps({"key": ctx.idempotency_key, "job": ctx.job_id, "what": what}) + "\n")
            f.flush()
            return True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _given(ctx: JobContext) -> dict[str, Any]:
    """The job's input as a mapping (``input: null`` sends nothing)."""
    return ctx.input if isinstance(ctx.input, dict) else {}


def _alert(ctx: JobContext) -> dict[str, Any]:
    """The alert: a step without ``input:`` gets the run's input, ``{"alert": {...}}``."""
    return dict(_given(ctx).get("alert") or {})


@worker.job("incident.detect", version="1", capabilities=["alerts"])
async def detect(ctx: JobContext) -> dict[str, Any]:
    alert = _alert(ctx)
    return {"host": alert.get("host", "web-1"), "service": alert.get("service", "checkout"),
            "symptom": alert.get("symptom", "5xx spike")}


@worker.job("incident.classify", version="1", capabilities=["llm"])
async def classify(ctx: JobContext) -> dict[str, Any]:
    await asyncio.sleep(0.05)  # stands in for a model call
    signal = _given(ctx).get("signal") or _alert(ctx)  # wired `signal:`, else the run's alert
    symptom = str(signal.get("symptom", ""))
    return {"severity": "high" if "5xx" in symptom else "medium", "category": "availability"}


@worker.job("incident.enrich", version="1", capabilities=["cmdb"])
async def enrich(ctx: JobContext) -> dict[str, Any]:
    await asyncio.sleep(0.05)  # stands in for a CMDB lookup, in parallel with classify
    host = _given(ctx).get("host") or _alert(ctx).get("host", "web-1")  # wired `host:`, else the alert's
    return {"host": host, "service": "checkout", "owner": "payments-team", "region": "eu-west-1"}


@worker.job("incident.plan", version="1", capabilities=["llm"])
async def plan(ctx: JobContext) -> dict[str, Any]:
    digest = hashlib.sha256(json.dumps(ctx.input, sort_keys=True).encode()).hexdigest()[:8]
    host = _given(ctx).get("host") or _alert(ctx).get("host", "web-1")  # wired `host:`, else the alert's
    return {"patch_id": f"PATCH-{digest}", "action": "rollback-deploy", "host": host}


@worker.job("incident.apply", version="1", capabilities=["ssh"])
async def apply(ctx: JobContext) -> dict[str, Any]:
    await ctx.heartbeat("connecting")
    if ctx.attempt == 1:
        raise RetryableError("ssh: connection reset by peer (simulated, first attempt only)")
    # a wired `plan:`, else (the run's input only) a patch named after the alert
    patch_id = (_given(ctx).get("plan") or {}).get("patch_id") or f"PATCH-{_alert(ctx).get('id', 'unknown')}"
    record_side_effect(ctx, f"applied {patch_id}")
    return {"applied": patch_id, "attempt": ctx.attempt}


@worker.job("incident.rollback", version="1", capabilities=["ssh"])
async def rollback(ctx: JobContext) -> dict[str, Any]:
    record_side_effect(ctx, f"rolled back {ctx.input['step']}")
    return {"rolled_back": ctx.input["step"]}
