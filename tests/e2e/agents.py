"""Agents for the end-to-end tests: each job takes a little while, so kills land mid-run."""

from __future__ import annotations

import asyncio
import json
import os

from interlock.worker import JobContext, Worker

worker = Worker("e2e-agents")


def record(ctx: JobContext) -> None:
    path = os.environ.get("INTERLOCK_SIDE_EFFECTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"key": ctx.idempotency_key, "job": ctx.job_id}) + "\n")


@worker.job("e2e.step")
async def step(ctx: JobContext) -> dict[str, int]:
    await asyncio.sleep(float(os.environ.get("E2E_STEP_SECONDS", "0.3")))
    record(ctx)
    return {"n": int(ctx.input.get("n", 0)) + 1}
