"""``interlock demo``: the incident-remediation example, end to end, on an embedded stack."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from interlock.client import Client, ClientError, progress_line, timeline_line
from interlock.contracts import events as ev
from interlock.core.verify import render_report
from interlock.devstack import example_file
from interlock.devstack.stack import NotReady, Stack

Out = Callable[[str], None]


def _print(text: str = "") -> None:
    print(text, flush=True)


def run_demo(*, auto_approve: bool = False, home: Path | str = Path(".interlock/demo"), timeout: float = 120.0,
             out: Out = _print) -> int:
    """Start a stack under ``home``, run the example workflow once, print its progress, timeline
    and audit check; return the exit code (0: the run succeeded and its log verifies)."""
    home = Path(home)
    stack = Stack(home=home, workers=[f"{example_file('agents.py')}:worker"],
                  env={"INTERLOCK_SIDE_EFFECTS": str(home / "side-effects.jsonl")})
    t0 = time.monotonic()
    try:
        out(f"starting embedded NATS and the five services (logs in {home}/logs) …")
        url = stack.start_nats()
        asyncio.run(stack.provision())
        stack.start()
        out(f"  nats {url} (auth on; admin credential {stack.admin_creds}); processes: {', '.join(stack.procs)}")
        asyncio.run(stack.wait_ready(timeout))  # start-up is not run time
        out(f"  ready in {time.monotonic() - t0:.1f}s: every service and worker consumes")
        code = asyncio.run(_demo(stack.url, stack.admin_creds, auto_approve=auto_approve, timeout=timeout, t0=t0,
                                 out=out))
    except (ClientError, NotReady) as e:
        out(f"demo failed: {e}")
        for name in stack.dead():
            out(f"  {name} is not running; see {home}/logs/{name}.log")
        code = 1
    finally:
        stack.stop()
    return code


async def _demo(url: str, creds: Path, *, auto_approve: bool, timeout: float, t0: float, out: Out) -> int:
    async with await Client.connect(url, name="interlock-demo", creds=creds) as client:
        await client.apply_workflow(example_file("workflow.yaml").read_text(), filename="workflow.yaml")
        alert = {"alert": {"id": f"INC-{int(time.time()) % 100000}", "host": "web-7", "service": "checkout",
                           "symptom": "5xx spike after deploy 2026.11.3"}}
        run_id = await client.start_run("incident-remediation", alert, key=f"demo-{time.time_ns()}",
                                        requested_by="demo")
        run_started = time.monotonic()
        out(f"\nrun {run_id} started; live progress:")

        async def on_event(envelope: dict[str, Any]) -> None:
            out(progress_line(envelope, time.monotonic() - run_started))
            if envelope["type"] != ev.ApprovalRequested.type_name:
                return
            data = envelope["data"]
            if auto_approve:
                await client.approve(run_id, data["step_id"], role=data["approver_role"],
                                     job_hash=data["job_hash"], reason="demo --auto-approve")
            else:
                out(f"\n  >>> waiting for approval. In another terminal run:\n"
                    f"  >>>   .venv/bin/interlock --nats {url} --creds {creds} approval approve "
                    f"{run_id} {data['step_id']} --reason 'looks good'\n")

        final = await client.wait(run_id, timeout=timeout, on_event=on_event)
        wall = time.monotonic() - run_started
        await client.wait_projected(run_id)
        out("\ntimeline (from the auditor's projection):")
        for row in await client.timeline(run_id):
            out(timeline_line(row))
        out("\naudit verification:")
        report = await client.verify(run_id)
        out("  " + render_report(report))
        out(f"\nrun {final.removeprefix('Run').lower()} in {wall:.2f}s (demo total {time.monotonic() - t0:.1f}s)")
        return 0 if final == ev.RunSucceeded.type_name and report.ok else 1
