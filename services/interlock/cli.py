"""The ``interlock`` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client as NATS
from pydantic import BaseModel

from interlock.auditor.projection import describe
from interlock.contracts import subjects as s
from interlock.contracts.messages import (
    AgentRegistration,
    ApprovalDecision,
    CancelRequest,
    CommandReply,
    DeadLetter,
    QueryReply,
    RunQuery,
    RunsQuery,
    Trigger,
)
from interlock.core.eventstore import EventStore, RunNotFound
from interlock.core.ids import run_id_for
from interlock.core.natsserver import DEFAULT_STORE_DIR, EmbeddedNats, NatsServerError
from interlock.core.topology import provision
from interlock.core.workflow import WorkflowInvalid, load_workflow
from interlock.runtime.connect import connect, resolve_url
from interlock.runtime.publish import publish
from interlock.runtime.registry import VersionConflict, WorkflowNotFound, WorkflowRegistry

DEFAULT_TENANT = os.environ.get("INTERLOCK_TENANT", "default")
EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "incident-remediation"


class CliError(Exception):
    """A problem to report in one line, with exit code 1."""


def out(text: str = "") -> None:
    print(text, flush=True)


# -- helpers ---------------------------------------------------------------------------------
async def _nc(args: argparse.Namespace) -> NATS:
    url = resolve_url(getattr(args, "nats", None))
    try:
        return await connect(url, name="interlock-cli", patient=False)
    except (OSError, nats.errors.NoServersError) as e:
        raise CliError(f"cannot reach NATS at {url} ({e}); start the stack with `interlock up` "
                       f"or set INTERLOCK_NATS_URL") from None


async def _request(nc: NATS, subject: str, message: BaseModel, reply_type: type[BaseModel], what: str,
                   timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            msg = await nc.request(subject, message.model_dump_json().encode(), timeout=timeout)
            return reply_type.model_validate_json(msg.data)
        except nats.errors.NoRespondersError:
            if time.monotonic() > deadline:
                raise CliError(f"no {what} service is running (nobody answers on {subject})") from None
            await asyncio.sleep(0.2)
        except nats.errors.TimeoutError:
            raise CliError(f"the {what} service did not answer within {timeout}s") from None


def _parse_input(raw: str | None) -> Any:
    if raw is None:
        return {}
    text = Path(raw[1:]).read_text() if raw.startswith("@") else raw
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = raw if raw.startswith("@") else "--input"
        raise CliError(f"{where}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None


def _table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    if not rows:
        out("(none)")
        return
    widths = {c: min(60, max(len(c), *(len(str(r.get(c, ""))) for r in rows))) for c in columns}
    out("  ".join(c.upper().ljust(widths[c]) for c in columns))
    for r in rows:
        out("  ".join(str(r.get(c, "") if r.get(c) is not None else "")[:60].ljust(widths[c]) for c in columns))


# -- commands --------------------------------------------------------------------------------
def cmd_validate(args: argparse.Namespace) -> int:
    failed = 0
    for file in args.files:
        path = Path(file)
        if not path.exists():
            out(f"{file}: no such file")
            failed += 1
            continue
        try:
            wf = load_workflow(path)
        except WorkflowInvalid as e:
            out(str(e))
            failed += 1
            continue
        out(f"{file}: ok — workflow {wf.id} v{wf.version}, {len(wf.steps)} steps, hash {wf.content_hash[:12]}")
    return 1 if failed else 0


def cmd_nats(args: argparse.Namespace) -> int:
    server = EmbeddedNats(store_dir=Path(args.store_dir), port=args.port)
    try:
        url = server.start()
    except NatsServerError as e:
        raise CliError(str(e)) from None
    out(f"nats-server (JetStream) listening on {url}, store {args.store_dir}")

    async def provision_and_wait() -> None:
        nc = await nats.connect(url)
        for line in await provision(nc.jetstream()):
            out(f"  {line}")
        await nc.close()
        out("Ctrl-C to stop")
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()

    try:
        asyncio.run(provision_and_wait())
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        out("nats-server stopped")
    return 0


SERVICE_CLASSES = {
    "planner": "interlock.planner.service:PlannerService",
    "policy": "interlock.policy.service:PolicyService",
    "approval": "interlock.approval.service:ApprovalService",
    "dispatcher": "interlock.dispatcher.service:DispatcherService",
    "auditor": "interlock.auditor.service:AuditorService",
}


def _service(name: str) -> Any:
    if name not in SERVICE_CLASSES:
        raise CliError(f"unknown service {name!r}; one of {', '.join(SERVICE_CLASSES)}")
    module, _, cls = SERVICE_CLASSES[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


def cmd_serve(args: argparse.Namespace) -> int:
    if args.nats:
        os.environ["INTERLOCK_NATS_URL"] = args.nats
    service = _service(args.name)
    asyncio.run(service.run_forever())
    return 0


def load_target(target: str) -> Any:
    """``module:object`` or ``path/to/file.py:object``."""
    module_name, _, attr = target.partition(":")
    attr = attr or "worker"
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.exists():
            raise CliError(f"{module_name}: no such file")
        spec = importlib.util.spec_from_file_location(path.stem.replace("-", "_"), path)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise CliError(f"cannot import {module_name}: {e}") from None
    if not hasattr(module, attr):
        raise CliError(f"{module_name} has no attribute {attr!r}")
    return getattr(module, attr)


def cmd_worker(args: argparse.Namespace) -> int:
    from interlock.worker import Worker

    worker = load_target(args.target)
    if not isinstance(worker, Worker):
        raise CliError(f"{args.target} is not an interlock.worker.Worker")
    if args.nats:
        worker.nats_url = args.nats

    async def main() -> None:
        loop = asyncio.get_running_loop()
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, worker._stop.set)
        await worker.run()

    asyncio.run(main())
    return 0


async def _apply(nc: NATS, file: str) -> int:
    path = Path(file)
    if not path.exists():
        raise CliError(f"{file}: no such file")
    await provision(nc.jetstream())
    registry = WorkflowRegistry(nc.jetstream())
    try:
        wf, created = await registry.apply(path.read_text(), filename=file)
    except WorkflowInvalid as e:
        out(str(e))
        return 1
    except VersionConflict as e:
        raise CliError(str(e)) from None
    state = "registered" if created else "unchanged"
    out(f"workflow {wf.id} v{wf.version} {state} (hash {wf.content_hash[:12]}); trigger subject {s.trigger(wf.id)}")
    return 0


async def cmd_workflows(args: argparse.Namespace, nc: NATS) -> int:
    if args.action == "apply":
        return await _apply(nc, args.file)
    registry = WorkflowRegistry(nc.jetstream())
    _table([{"workflow": wf, "version": v} for wf, v in await registry.list()], ["workflow", "version"])
    return 0


async def trigger_run(nc: NATS, workflow_id: str, run_input: Any, *, key: str, tenant: str,
                      version: str | None = None, requested_by: str = "", rerun_of: str | None = None,
                      reuse: dict[str, Any] | None = None) -> str:
    trigger = Trigger(workflow_id=workflow_id, workflow_version=version, input=run_input, idempotency_key=key,
                      tenant=tenant, requested_by=requested_by, rerun_of=rerun_of, reuse_outputs=reuse or {})
    await publish(nc.jetstream(), s.trigger(workflow_id), trigger.model_dump_json().encode(),
                  headers={"Nats-Msg-Id": f"trigger:{tenant}:{workflow_id}:{key}"})
    return str(run_id_for(tenant, workflow_id, key))


TERMINAL_EVENTS = {"RunSucceeded", "RunFailed", "RunDenied", "RunCancelled", "RunTimedOut"}


async def watch_run(nc: NATS, tenant: str, run_id: str, *, timeout: float | None = None,
                    on_event: Callable[[dict[str, Any]], Awaitable[None]] | None = None, quiet: bool = False
                    ) -> str:
    """Print a run's events as they are appended, until it ends; return its final event type."""
    js = nc.jetstream()
    sub = await js.subscribe(s.run_events(tenant, run_id), ordered_consumer=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    t0 = time.monotonic()
    try:
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise CliError(f"run {run_id} did not finish within {timeout}s")
            try:
                msg = await sub.next_msg(timeout=min(remaining or 1.0, 1.0))
            except nats.errors.TimeoutError:
                continue
            for envelope in json.loads(msg.data)["events"]:
                if envelope["type"] == "StepHeartbeat":
                    continue
                if not quiet:
                    summary, _ = describe(envelope["type"], envelope.get("data") or {})
                    attempt = f"#{envelope['attempt']}" if envelope.get("attempt") else ""
                    step = (envelope.get("step_id") or "") + attempt
                    out(f"  +{time.monotonic() - t0:6.2f}s  {envelope['service']:<10} {step:<22} {summary}")
                if on_event is not None:
                    await on_event(envelope)
                if envelope["type"] in TERMINAL_EVENTS:
                    return str(envelope["type"])
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def cmd_run(args: argparse.Namespace, nc: NATS) -> int:
    key = args.idempotency_key or f"cli-{time.time_ns()}"
    run_input = _parse_input(args.input)
    registry = WorkflowRegistry(nc.jetstream())
    try:
        await registry.get(args.workflow, args.version)
    except WorkflowNotFound as e:
        raise CliError(str(e)) from None
    run_id = await trigger_run(nc, args.workflow, run_input, key=key, tenant=args.tenant, version=args.version,
                               requested_by=os.environ.get("USER", "cli"))
    out(f"run {run_id} (workflow {args.workflow}, idempotency key {key})")
    if not args.wait:
        return 0
    final = await watch_run(nc, args.tenant, run_id, timeout=args.timeout)
    return 0 if final == "RunSucceeded" else 1


async def _load(nc: NATS, tenant: str, run_id: str) -> Any:
    store = EventStore(nc, nc.jetstream(), service="cli")
    try:
        return (await store.load(tenant, run_id)).run
    except RunNotFound as e:
        raise CliError(str(e)) from None


async def cmd_decide(args: argparse.Namespace, nc: NATS, grant: bool) -> int:
    run = await _load(nc, args.tenant, args.run)
    step = run.steps.get(args.step)
    if step is None or step.approval is None or step.approval.status != "requested":
        pending = [sid for sid, st in run.steps.items() if st.approval and st.approval.status == "requested"]
        raise CliError(f"step {args.step!r} of run {args.run} has no pending approval"
                       + (f"; pending: {', '.join(pending)}" if pending else ""))
    request = step.approval
    out(f"approval request: run {args.run} step {args.step}")
    out(f"  job hash {request.job_hash}, policy snapshot {request.snapshot_id}, role {request.approver_role}")
    if step.input is not None:
        out(f"  job input {json.dumps(step.input)[:400]}")
    decision = ApprovalDecision(run_id=args.run, tenant=args.tenant, step_id=args.step,
                                job_hash=args.job_hash or request.job_hash, approver=args.by,
                                role=args.role or request.approver_role, reason=args.reason or "")
    subject = s.CMD_APPROVE if grant else s.CMD_REJECT
    reply = await _request(nc, subject, decision, CommandReply, "approval")
    if not reply.ok:
        raise CliError(f"refused: {reply.error}")
    out(f"{'approved' if grant else 'rejected'} by {args.by}")
    return 0


async def cmd_cancel(args: argparse.Namespace, nc: NATS) -> int:
    reply = await _request(nc, s.CMD_CANCEL, CancelRequest(run_id=args.run, tenant=args.tenant,
                                                           by=os.environ.get("USER", "cli"), reason=args.reason or ""),
                           CommandReply, "planner")
    if not reply.ok:
        raise CliError(f"refused: {reply.error}")
    out(f"run {args.run} cancelled")
    return 0


async def _query(nc: NATS, subject: str, message: BaseModel) -> Any:
    reply = await _request(nc, subject, message, QueryReply, "auditor")
    if not reply.ok:
        raise CliError(reply.error or "query failed")
    return reply.result


async def cmd_runs(args: argparse.Namespace, nc: NATS) -> int:
    rows = await _query(nc, s.Q_RUNS, RunsQuery(tenant=args.tenant, status=args.status, workflow_id=args.workflow,
                                                limit=args.limit))
    _table(rows, ["run_id", "workflow_id", "workflow_version", "status", "started_at", "ended_at"])
    return 0


async def cmd_status(args: argparse.Namespace, nc: NATS) -> int:
    result = await _query(nc, s.Q_STATUS, RunQuery(run_id=args.run, tenant=args.tenant))
    if args.json:
        out(json.dumps(result, indent=2, default=str))
        return 0
    run = result.get("run", result)
    out(f"run {run.get('run_id')}  {run.get('workflow_id')} v{run.get('workflow_version')}  {run.get('status')}"
        + (f" — {run['reason']}" if run.get("reason") else ""))
    _table(result.get("steps", []), ["step_id", "status", "attempt", "decision", "approval_status", "error"])
    return 0


async def print_timeline(nc: NATS, tenant: str, run_id: str) -> None:
    rows = await _query(nc, s.Q_TIMELINE, RunQuery(run_id=run_id, tenant=tenant))
    for row in rows:
        at = str(row.get("at", ""))[11:23]
        step = row.get("step_id") or ""
        attempt = f"#{row['attempt']}" if row.get("attempt") else ""
        out(f"  {row.get('seq', ''):>4}  {at}  {row.get('service', ''):<10} {(step + attempt):<22} "
            f"{row.get('summary', '')}")


async def cmd_timeline(args: argparse.Namespace, nc: NATS) -> int:
    await print_timeline(nc, args.tenant, args.run)
    return 0


async def cmd_approvals(args: argparse.Namespace, nc: NATS) -> int:
    rows = await _query(nc, s.Q_APPROVALS, RunsQuery(tenant=args.tenant))
    _table(rows, ["run_id", "step_id", "approver_role", "job_hash", "requested_at", "expires_at"])
    return 0


async def cmd_agents(args: argparse.Namespace, nc: NATS) -> int:
    kv = await nc.jetstream().key_value(s.AGENTS_BUCKET)
    rows = []
    with contextlib.suppress(Exception):
        for key in await kv.keys():
            entry = await kv.get(key)
            reg = AgentRegistration.model_validate_json(entry.value or b"{}")
            rows.append(reg.model_dump(mode="json"))
    rows.sort(key=lambda r: (r["topic"], r["worker_id"]))
    for r in rows:
        r["capabilities"] = ",".join(r["capabilities"])
    _table(rows, ["topic", "version", "capabilities", "worker_id", "host", "last_heartbeat"])
    return 0


async def cmd_verify(args: argparse.Namespace, nc: NATS) -> int:
    from interlock.core.verify import render_report, verify_run

    store = EventStore(nc, nc.jetstream(), service="cli")
    report = await verify_run(store, args.tenant, args.run)
    out(render_report(report))
    return 0 if report.ok else 1


async def cmd_rebuild(args: argparse.Namespace, nc: NATS) -> int:
    from interlock.auditor.projection import Projection

    projection = Projection(args.db)
    await projection.open()
    store = EventStore(nc, nc.jetstream(), service="auditor")
    stats = await projection.rebuild(store, progress=lambda st: out(f"  replayed {st.events} events"))
    await projection.close()
    out(f"projection {args.db} rebuilt: {stats}")
    return 0


async def cmd_dlq(args: argparse.Namespace, nc: NATS) -> int:
    js = nc.jetstream()
    sub = await js.subscribe(s.DLQ_ALL, ordered_consumer=True)
    rows: list[dict[str, Any]] = []
    try:
        while len(rows) < args.limit:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except nats.errors.TimeoutError:
                break
            letter = DeadLetter.model_validate_json(msg.data)
            rows.append({"at": letter.at.isoformat()[:23], "service": letter.service, "subject": letter.subject,
                         "reason": letter.reason})
    finally:
        await sub.unsubscribe()
    _table(rows, ["at", "service", "subject", "reason"])
    return 0


async def cmd_rerun(args: argparse.Namespace, nc: NATS) -> int:
    old = await _load(nc, args.tenant, args.run)
    registry = WorkflowRegistry(nc.jetstream())
    wf = await registry.get(old.workflow_id, old.workflow_version)
    if args.from_step not in wf.steps:
        raise CliError(f"workflow {wf.id} has no step {args.from_step!r}; steps: {', '.join(wf.steps)}")
    rerun = {args.from_step} | set(wf.downstream(args.from_step))
    reuse = {sid: st.output for sid, st in old.steps.items()
             if sid in wf.steps and sid not in rerun and st.status == "succeeded" and st.output_ref is None}
    out(f"re-run of {args.run} from step {args.from_step}:")
    for sid in wf.topological_order():
        out(f"  {sid:<24} {'run again' if sid in rerun or sid not in reuse else 'reuse output'}")
    if args.dry_run:
        out("(dry run: nothing started)")
        return 0
    key = f"rerun:{args.run}:{args.from_step}:{time.time_ns()}"
    run_id = await trigger_run(nc, wf.id, old.input, key=key, tenant=args.tenant, version=wf.version,
                               requested_by=os.environ.get("USER", "cli"), rerun_of=args.run, reuse=reuse)
    out(f"run {run_id} started (re-run of {args.run})")
    if args.wait:
        final = await watch_run(nc, args.tenant, run_id, timeout=args.timeout)
        return 0 if final == "RunSucceeded" else 1
    return 0


async def cmd_policy(args: argparse.Namespace, nc: NATS) -> int:
    from interlock.core.topology import provision as provision_all
    from interlock.policy.bundles import BundleStore
    from interlock.policy.cedar import DEFAULT_BUNDLE, CedarPolicy, PolicyBundle, PolicyError
    from interlock.policy.tools import request_for, simulate

    await provision_all(nc.jetstream())
    store = BundleStore(nc.jetstream())
    who = os.environ.get("USER", "cli")
    try:
        if args.action == "publish":
            record = await store.publish(Path(args.file).read_text(), version=args.version, by=who)
            out(f"policy bundle {record.bundle.snapshot_id} is active (revision {record.revision})")
            return 0
        if args.action == "rollback":
            record = await store.rollback(to_version=args.to, by=who)
            out(f"rolled back: policy bundle {record.bundle.snapshot_id} is active (revision {record.revision})")
            return 0
        if args.action == "show":
            active = await store.active()
            bundle = active.bundle if active else DEFAULT_BUNDLE
            out(f"# snapshot {bundle.snapshot_id}" + ("" if active else " (built-in default: nothing published)"))
            out(bundle.source)
            return 0
        if args.action == "history":
            _table([{"revision": r.revision, "snapshot": r.bundle.snapshot_id, "published_at": r.published_at,
                     "by": r.published_by} for r in await store.history()],
                   ["revision", "snapshot", "published_at", "by"])
            return 0
        active = await store.active()
        engine = CedarPolicy(active.bundle if active else DEFAULT_BUNDLE)
        if args.action == "simulate":
            draft = CedarPolicy(PolicyBundle.of("draft", Path(args.draft).read_text()))
            registry = WorkflowRegistry(nc.jetstream())
            workflows = {}
            for wf_id, version in await registry.list():
                workflows[(wf_id, version)] = await registry.get(wf_id, version)
            checked, changes = await simulate(nc, draft, workflows, args.limit)
            out(f"re-decided {checked} recent jobs with {args.draft}: {len(changes)} would change")
            _table([{"run": c.decision.run_id[:8], "step": c.decision.step_id, "was": c.decision.decision,
                     "now": c.new_decision, "rules": ",".join(c.new_rules), "reason": c.reason} for c in changes],
                   ["run", "step", "was", "now", "rules", "reason"])
            return 0
        registry = WorkflowRegistry(nc.jetstream())
        try:
            workflow = await registry.get(args.workflow, args.version)
        except WorkflowNotFound as e:
            raise CliError(str(e)) from None
        if args.step not in workflow.steps:
            raise CliError(f"workflow {workflow.id} has no step {args.step!r}")
        request = request_for(workflow, args.step, tenant=args.tenant, job_input=_parse_input(args.input))
        outcome = engine.decide(request)
        out(f"{outcome.decision} under {outcome.snapshot_id} (rules {', '.join(outcome.rule_ids) or '-'})"
            + (f": {outcome.reason}" if outcome.reason else ""))
        if outcome.approver_role:
            out(f"  approver role {outcome.approver_role}, expires in {outcome.approval_expires_ms or '-'} ms")
        if outcome.constraints:
            out(f"  constraints {json.dumps(outcome.constraints)}")
        if args.action == "explain":
            for step in engine.explain(request):
                out(f"  {step.action}: {step.decision}; matched {', '.join(step.matched) or 'nothing'}"
                    + (f"; errors {'; '.join(step.errors)}" if step.errors else ""))
        return 0
    except (PolicyError, ValueError, OSError) as e:
        raise CliError(str(e)) from None


async def cmd_approvers(args: argparse.Namespace, nc: NATS) -> int:
    from interlock.approval.directory import ApproverDirectory

    await provision(nc.jetstream())
    directory = ApproverDirectory(nc.jetstream())
    if args.action == "grant":
        roles = await directory.grant(args.name, args.roles)
        out(f"{args.name} holds {', '.join(sorted(roles))}")
    elif args.action == "revoke":
        roles = await directory.revoke(args.name, args.roles)
        out(f"{args.name} holds {', '.join(sorted(roles)) or 'no role'}")
    else:
        _table([{"approver": k, "roles": ", ".join(v)} for k, v in (await directory.list()).items()],
               ["approver", "roles"])
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from interlock.devstack.stack import Stack

    stack = Stack(home=Path(args.home), nats_url=os.environ.get("INTERLOCK_NATS_URL"), workers=args.worker or [])
    try:
        url = stack.start_nats()
        asyncio.run(stack.provision())
        stack.start()
        out(f"Interlock is up on {url}: {', '.join(stack.procs)} (logs in {args.home}/logs). Ctrl-C stops it.")
        while True:
            time.sleep(1)
            for name in stack.dead():
                out(f"{name} exited; restarting it")
                stack.restart(name)
    except KeyboardInterrupt:
        out("stopping…")
    finally:
        stack.stop()
    out("stopped")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from interlock.devstack.demo import run_demo

    return run_demo(auto_approve=args.auto_approve, home=Path(args.home), timeout=args.timeout)


# -- argument parsing ------------------------------------------------------------------------
ASYNC_COMMANDS: dict[str, Callable[..., Awaitable[int]]] = {
    "workflows": cmd_workflows, "run": cmd_run, "cancel": cmd_cancel, "runs": cmd_runs, "status": cmd_status,
    "timeline": cmd_timeline, "approvals": cmd_approvals, "agents": cmd_agents, "dlq": cmd_dlq,
    "rerun": cmd_rerun, "policy": cmd_policy, "approvers": cmd_approvers,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="interlock", description="Durable, auditable orchestration of agent workflows.")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, help_text: str, *, tenant: bool = False, nats_flag: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if nats_flag:
            sp.add_argument("--nats", help="NATS URL (default: INTERLOCK_NATS_URL, the running stack, or :4222)")
        if tenant:
            sp.add_argument("--tenant", default=DEFAULT_TENANT, help="tenant (default %(default)s)")
        return sp

    sp = cmd("validate", "check workflow files and report every problem", nats_flag=False)
    sp.add_argument("files", nargs="+", metavar="FILE")
    sp = cmd("nats", "run the embedded NATS server (JetStream) and provision streams", nats_flag=False)
    sp.add_argument("--store-dir", default=str(DEFAULT_STORE_DIR))
    sp.add_argument("--port", type=int, default=4222)
    sp = cmd("serve", "run one service")
    sp.add_argument("name", choices=list(SERVICE_CLASSES))
    sp = cmd("up", "run NATS (unless INTERLOCK_NATS_URL is set) and all five services", nats_flag=False)
    sp.add_argument("--home", default=".interlock", help="state and logs directory")
    sp.add_argument("--worker", action="append", metavar="MODULE:OBJECT", help="also run these workers")
    sp = cmd("worker", "run agent handlers: MODULE:OBJECT or path/to/file.py:OBJECT")
    sp.add_argument("target")
    sp = cmd("workflows", "register or list workflow versions")
    wsub = sp.add_subparsers(dest="action", required=True)
    ap = wsub.add_parser("apply", help="register a workflow version from a YAML file")
    ap.add_argument("file")
    wsub.add_parser("list", help="list registered workflow versions")
    sp = cmd("run", "start a run", tenant=True)
    sp.add_argument("workflow")
    sp.add_argument("--input", help="JSON, or @file")
    sp.add_argument("--version", help="workflow version (default: latest)")
    sp.add_argument("--idempotency-key", help="the same key never starts two runs")
    sp.add_argument("--wait", action="store_true", help="show progress until the run ends")
    sp.add_argument("--timeout", type=float, default=None, help="with --wait: give up after SECONDS")
    for name, help_text in (("approve", "approve a pending approval"), ("reject", "reject a pending approval")):
        sp = cmd(name, help_text, tenant=True)
        sp.add_argument("run")
        sp.add_argument("step")
        sp.add_argument("--by", default=os.environ.get("USER", "operator"), help="who decides")
        sp.add_argument("--role", help="the approver role you act in (default: the role asked for)")
        sp.add_argument("--reason", required=name == "reject")
        sp.add_argument("--job-hash", help="approve this job hash (default: the pending request's)")
    sp = cmd("cancel", "cancel a run", tenant=True)
    sp.add_argument("run")
    sp.add_argument("--reason")
    sp = cmd("rerun", "start a new run reusing outputs of steps not downstream of --from-step", tenant=True)
    sp.add_argument("run")
    sp.add_argument("--from-step", required=True)
    sp.add_argument("--dry-run", action="store_true")
    sp.add_argument("--wait", action="store_true")
    sp.add_argument("--timeout", type=float, default=None)
    sp = cmd("runs", "list runs", tenant=True)
    sp.add_argument("--status")
    sp.add_argument("--workflow")
    sp.add_argument("--limit", type=int, default=50)
    sp = cmd("status", "a run and the state of each step", tenant=True)
    sp.add_argument("run")
    sp.add_argument("--json", action="store_true")
    sp = cmd("timeline", "a run's events in order", tenant=True)
    sp.add_argument("run")
    cmd("approvals", "pending approvals, oldest first", tenant=True)
    cmd("agents", "registered agent workers")
    sp = cmd("dlq", "dead letters")
    sp.add_argument("--limit", type=int, default=100)
    sp = cmd("audit", "verify hash chains or rebuild the auditor projection")
    asub = sp.add_subparsers(dest="action", required=True)
    vp = asub.add_parser("verify", help="verify a run's hash chain")
    vp.add_argument("run")
    vp.add_argument("--tenant", default=DEFAULT_TENANT)
    rp = asub.add_parser("rebuild", help="rebuild the auditor projection by replaying the streams")
    rp.add_argument("--db", default=os.environ.get("INTERLOCK_AUDITOR_DB", ".interlock/auditor.sqlite3"))
    sp = cmd("approvers", "who may approve, in which roles (enforced once anyone is registered)")
    asub2 = sp.add_subparsers(dest="action", required=True)
    gp = asub2.add_parser("grant", help="give an approver roles")
    gp.add_argument("name")
    gp.add_argument("roles", nargs="+")
    gp = asub2.add_parser("revoke", help="take roles away (all of them if none are named)")
    gp.add_argument("name")
    gp.add_argument("roles", nargs="*")
    asub2.add_parser("list", help="list approvers")
    sp = cmd("policy", "publish, roll back, inspect and test policy bundles (Cedar)")
    psub = sp.add_subparsers(dest="action", required=True)
    pp = psub.add_parser("publish", help="make a Cedar bundle the active policy")
    pp.add_argument("file")
    pp.add_argument("--version", help="bundle version (default: previous + 1)")
    pp = psub.add_parser("rollback", help="make the previous (or --to VERSION) bundle active again")
    pp.add_argument("--to", help="version to return to")
    psub.add_parser("show", help="print the active bundle")
    psub.add_parser("history", help="list published bundles")
    for action, help_text in (("eval", "decide one job"), ("explain", "decide one job and show which rules matched")):
        pp = psub.add_parser(action, help=help_text)
        pp.add_argument("workflow")
        pp.add_argument("step")
        pp.add_argument("--input", help="the job's resolved input: JSON or @file")
        pp.add_argument("--version", help="workflow version (default: latest)")
        pp.add_argument("--tenant", default=DEFAULT_TENANT)
    pp = psub.add_parser("simulate", help="re-decide recent jobs with a draft bundle; list what would change")
    pp.add_argument("draft")
    pp.add_argument("--limit", type=int, default=500)
    from interlock.devstack.drill import add_drill_parser

    add_drill_parser(sub)
    sp = cmd("demo", "run the incident-remediation example end to end on an embedded stack", nats_flag=False)
    sp.add_argument("--auto-approve", action="store_true", help="approve the approval gate automatically")
    sp.add_argument("--home", default=".interlock/demo", help="state and logs directory")
    sp.add_argument("--timeout", type=float, default=120.0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose or args.command == "serve" else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faststream").setLevel(logging.WARNING)
    try:
        if args.command == "validate":
            return cmd_validate(args)
        if args.command == "nats":
            return cmd_nats(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "worker":
            return cmd_worker(args)
        if args.command == "up":
            return cmd_up(args)
        if args.command == "demo":
            return cmd_demo(args)
        if args.command == "drill":
            from interlock.devstack.drill import cmd_drill

            return cmd_drill(args)

        async def dispatch() -> int:
            nc = await _nc(args)
            try:
                if args.command in ("approve", "reject"):
                    return await cmd_decide(args, nc, grant=args.command == "approve")
                if args.command == "audit":
                    return await (cmd_verify(args, nc) if args.action == "verify" else cmd_rebuild(args, nc))
                return await ASYNC_COMMANDS[args.command](args, nc)
            finally:
                await nc.close()

        return asyncio.run(dispatch())
    except CliError as e:
        print(f"interlock: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
