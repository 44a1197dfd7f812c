"""Agents for the telemetry tests: one that succeeds, one that fails its first attempt."""

from __future__ import annotations

from typing import Any

from interlock.worker import JobContext, Worker

worker = Worker("telemetry-agents")


@worker.job("tel.ok")
async def ok(ctx: JobContext) -> dict[str, Any]:
    return {"step": ctx.job.step_id}


@worker.job("tel.flaky")
async def flaky(ctx: JobContext) -> dict[str, Any]:
    if ctx.job.attempt == 1:
        raise RuntimeError("first attempt fails, on purpose")
    return {"attempt": ctx.job.attempt}
