"""Alerts on the real services: an SLA breach is published on the alerts subject (firing while
late, resolved when the run ends) and listed by the client."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from interlock.auditor.service import AuditorService
from interlock.client import Client
from interlock.worker import JobContext, Worker
from tests.integration.harness import Harness, types, unique

pytestmark = pytest.mark.integration


async def until(check: Any, timeout: float = 20.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


async def test_an_sla_breach_fires_while_the_run_is_late_and_resolves_when_it_ends(
        harness: Harness, auditor: AuditorService, provisioned: str, admin_creds: Path) -> None:
    wf, topic = unique("sla"), unique("t")
    await harness.apply(f"""
id: {wf}
version: 1
sla: {{run_ms: 500, steps: {{slow: 300}}}}
steps:
  slow: {{topic: {topic}}}
""")
    release = asyncio.Event()
    worker = Worker(unique("slow"))

    @worker.job(topic)
    async def slow(ctx: JobContext) -> dict[str, Any]:
        await asyncio.wait_for(release.wait(), timeout=30)
        return {}

    await harness.start_worker(worker)
    async with await Client.connect(provisioned, name="alerts-test", creds=admin_creds) as client:
        run_id = await harness.trigger(wf, {})

        async def firing() -> list[Any]:
            return [a for a in await client.alerts() if a.run_id == run_id]

        alerts = await until(firing)
        assert {a.rule for a in alerts} <= {"sla_run", "sla_step"} and all(a.state == "firing" for a in alerts)
        step_alert = next(a for a in await until(lambda: _both(client, run_id)) if a.rule == "sla_step")
        assert (step_alert.step_id, step_alert.topic, step_alert.workflow_id) == ("slow", topic, wf)
        assert step_alert.context["sla_ms"] == 300 and "over its SLA of 300 ms" in step_alert.summary
        assert step_alert.first_fix.startswith(f"interlock run timeline {run_id}")

        release.set()
        assert types(await harness.wait_end(run_id))[-1] == "RunSucceeded"

        async def resolved() -> list[Any]:
            mine = [a for a in await client.alerts(include_resolved=True) if a.run_id == run_id]
            return mine if len(mine) == 2 and all(a.state == "resolved" for a in mine) else []

        done = await until(resolved)
        assert {a.rule for a in done} == {"sla_run", "sla_step"}
        assert [a for a in await client.alerts() if a.run_id == run_id] == [], "nothing of the run still fires"


async def _both(client: Client, run_id: str) -> list[Any]:
    mine = [a for a in await client.alerts() if a.run_id == run_id]
    return mine if {a.rule for a in mine} == {"sla_run", "sla_step"} else []
