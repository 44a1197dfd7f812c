"""``interlock demo``: the incident-remediation example, end to end, on an embedded stack."""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from interlock.contracts import subjects as s
from interlock.contracts.messages import ApprovalDecision, CommandReply, QueryReply, RunQuery
from interlock.core.eventstore import EventStore
from interlock.core.verify import render_report, verify_run
from interlock.runtime.connect import connect
from interlock.stack import Stack

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "incident-remediation"
TENANT = "default"


def run_demo(args: argparse.Namespace) -> int:
    from interlock.cli import CliError, out

    home = Path(args.home)
    stack = Stack(home=home, workers=[f"{EXAMPLE / 'agents.py'}:worker"],
                  env={"INTERLOCK_SIDE_EFFECTS": str(home / "side-effects.jsonl")})
    t0 = time.monotonic()
    try:
        out(f"starting embedded NATS and the five services (logs in {home}/logs) …")
        url = stack.start_nats()
        asyncio.run(stack.provision())
        stack.start()
        out(f"  nats {url}; processes: {', '.join(stack.procs)}")
        code = asyncio.run(_demo(args, stack, t0))
    except CliError as e:
        out(f"demo failed: {e}")
        for name in stack.dead():
            out(f"  {name} is not running; see {home}/logs/{name}.log")
        code = 1
    finally:
        stack.stop()
    return code


async def _demo(args: argparse.Namespace, stack: Stack, t0: float) -> int:
    from interlock.cli import CliError, _apply, _request, out, print_timeline, trigger_run, watch_run

    nc = await connect(stack.url, name="interlock-demo")
    try:
        if await _apply(nc, str(EXAMPLE / "workflow.yaml")) != 0:
            raise CliError("the example workflow is invalid")
        alert = {"alert": {"id": f"INC-{int(time.time()) % 100000}", "host": "web-7", "service": "checkout",
                           "symptom": "5xx spike after deploy 2026.11.3"}}
        run_id = await trigger_run(nc, "incident-remediation", alert, key=f"demo-{time.time_ns()}", tenant=TENANT,
                                   requested_by="demo")
        run_started = time.monotonic()
        out(f"\nrun {run_id} started; live progress:")

        async def on_event(envelope: dict[str, Any]) -> None:
            if envelope["type"] != "ApprovalRequested":
                return
            data = envelope["data"]
            if args.auto_approve:
                decision = ApprovalDecision(run_id=run_id, tenant=TENANT, step_id=data["step_id"],
                                            job_hash=data["job_hash"], approver="demo-operator",
                                            role=data["approver_role"], reason="demo --auto-approve")
                reply = await _request(nc, s.CMD_APPROVE, decision, CommandReply, "approval")
                if not reply.ok:
                    raise CliError(f"approval refused: {reply.error}")
            else:
                out(f"\n  >>> waiting for approval. In another terminal run:\n"
                    f"  >>>   .venv/bin/interlock approve {run_id} {data['step_id']} --reason 'looks good'\n")

        final = await watch_run(nc, TENANT, run_id, timeout=args.timeout, on_event=on_event)
        wall = time.monotonic() - run_started
        # the auditor projects asynchronously: wait until it has the run's final state
        for _ in range(100):
            reply = await _request(nc, s.Q_STATUS, RunQuery(run_id=run_id, tenant=TENANT), QueryReply, "auditor")
            status = ((reply.result or {}).get("run") or {}).get("status") if reply.ok else None
            if status not in (None, "running", "compensating"):
                break
            await asyncio.sleep(0.1)
        out("\ntimeline (from the auditor's projection):")
        await print_timeline(nc, TENANT, run_id)
        out("\naudit verification:")
        report = await verify_run(EventStore(nc, nc.jetstream(), service="demo"), TENANT, run_id)
        out("  " + render_report(report))
        out(f"\nrun {final.removeprefix('Run').lower()} in {wall:.2f}s (demo total {time.monotonic() - t0:.1f}s)")
        return 0 if final == "RunSucceeded" and report.ok else 1
    finally:
        await nc.close()
