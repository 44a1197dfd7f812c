"""Agents for the sensitive-data test: they check that they receive the clear values (given to them
in the environment, never in a payload) and return a token and a session that must leave sealed."""

from __future__ import annotations

import os

from interlock.core.sealed import contains_sealed
from interlock.worker import FatalError, JobContext, Worker

worker = Worker("secret-agents")


def _expect(name: str) -> str:
    return os.environ[name]


@worker.job("secret.fetch")
async def fetch(ctx: JobContext) -> dict[str, object]:
    expected = {"api_key": _expect("E2E_API_KEY"), "password": _expect("E2E_PASSWORD"), "user": "alice"}
    if ctx.input != expected:
        # never put the values into the error: the test scans every log for them
        raise FatalError(f"fetch did not receive the clear input (keys {sorted(ctx.input or {})})")
    if not contains_sealed(ctx.job.input):
        raise FatalError("the job on the bus held the sensitive values in clear")
    return {"token": _expect("E2E_TOKEN"), "session": _expect("E2E_SESSION"), "count": 3}


@worker.job("secret.use")
async def use(ctx: JobContext) -> dict[str, object]:
    if ctx.input != {"session": _expect("E2E_SESSION"), "token": _expect("E2E_TOKEN"), "count": 3}:
        raise FatalError(f"use did not receive the clear output of fetch (keys {sorted(ctx.input or {})})")
    return {"ok": True}
