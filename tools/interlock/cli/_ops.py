"""Operations: ``interlock agent list``, ``interlock dlq list|resolve|replay`` and the process commands
``up``, ``serve``, ``worker``, ``nats``, ``demo`` and ``drill``."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import logging
import signal
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from interlock.cli._common import ListGroup, connected, fail, globals_of, with_globals
from interlock.cli._output import Column, Format, OutputOption, columns, echo, emit_doc, emit_rows
from interlock.client import Client, ClientError, ClientSettings, DeadLetterEntry
from interlock.contracts.messages import DeadLetterStatus
from interlock.core.natsserver import DEFAULT_STORE_DIR

agents = typer.Typer(cls=ListGroup, help="The agent registry (which workers serve which topics) and canary rollouts.")
dlq = typer.Typer(cls=ListGroup, help="Dead letters: messages a service could not process, with the reason.")


@agents.command("list")
@with_globals
def list_agents(ctx: typer.Context, output: OutputOption = Format.table) -> None:
    """Registered agent workers by topic, with each topic's queue depth (QUEUED: jobs published and
    not yet finished; a topic with queued jobs and no worker is listed too)."""
    async def rows(client: Client) -> list[dict[str, Any]]:
        agents, depth = await asyncio.gather(client.agents(), client.queue_depth())
        out = [{**a.model_dump(mode="json"), "queued": depth.get(a.topic, 0)} for a in agents]
        served = {a.topic for a in agents}
        out += [{"topic": topic, "queued": n, "worker_id": "(none)"}
                for topic, n in depth.items() if topic not in served]
        return sorted(out, key=lambda r: (r["topic"], r.get("worker_id") or ""))

    emit_rows(connected(ctx, rows), output,
              columns("topic", "queued", "version", "capabilities", "worker_id", "host", "last_heartbeat"))


DlqStatus = Literal["open", "resolved", "replayed"]
DLQ_COLUMNS = columns("id", "status", Column("at", show=lambda at: str(at or "")[:23]), "service", "subject", "reason")


def _dlq_row(entry: DeadLetterEntry) -> dict[str, Any]:
    """One dead letter as a row: the letter's fields, its id and status, and every action on it."""
    return {"id": entry.id, "status": entry.status, **entry.letter.model_dump(mode="json"),
            "readable": entry.readable,
            "actions": [a.model_dump(mode="json") for a in (entry.record.actions if entry.record else [])]}


@dlq.command("list")
@with_globals
def list_dead_letters(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option("--limit", min=1, help="at most this many, oldest first")] = 100,
    status: Annotated[DlqStatus | None, typer.Option("--status", help="only open, resolved or replayed ones")] = None,
    service: Annotated[str | None, typer.Option("--service", help="only those of this service (or worker)")] = None,
    output: OutputOption = Format.table,
) -> None:
    """Dead letters, oldest first, with their id and status (open, resolved, replayed)."""
    entries = connected(ctx, lambda client: client.dead_letter_entries(limit, status=status, service=service))
    emit_rows([_dlq_row(e) for e in entries], output, DLQ_COLUMNS)


IdArgument = Annotated[int, typer.Argument(metavar="ID", min=1, help="the dead letter's id (as `interlock dlq` lists)")]


def _said(record: DeadLetterStatus, output: Format) -> None:
    last = record.actions[-1]
    if output is not Format.table:
        emit_doc(record, output, lambda _: None)
    elif last.action == "replayed":
        echo(f"dead letter {record.seq} replayed to {last.subject} (message id {last.msg_id}, stream seq "
             f"{last.stream_seq}) by {last.by}")
    else:
        echo(f"dead letter {record.seq} resolved by {last.by}: {last.note}")


@dlq.command("resolve")
@with_globals
def resolve_dead_letter(
    ctx: typer.Context,
    seq: IdArgument,
    note: Annotated[str, typer.Option("--note", help="how it was dealt with (kept with the dead letter)")],
    output: OutputOption = Format.table,
) -> None:
    """Mark a dead letter resolved, with a note; it stays listed (history is never deleted)."""
    if not note.strip():
        fail("--note must say how the dead letter was dealt with")
    _said(connected(ctx, lambda client: client.resolve_dead_letter(seq, note=note)), output)


@dlq.command("replay")
@with_globals
def replay_dead_letter(
    ctx: typer.Context,
    seq: IdArgument,
    note: Annotated[str, typer.Option("--note", help="why it is replayed (kept with the dead letter)")] = "",
    output: OutputOption = Format.table,
) -> None:
    """Publish a dead letter's original again to its subject, with a new message id; records who and when."""
    _said(connected(ctx, lambda client: client.replay_dead_letter(seq, note=note)), output)


# -- processes ---------------------------------------------------------------------------------
ServiceName = Literal["planner", "policy", "approval", "dispatcher", "auditor", "api"]
SERVICE_CLASSES: dict[str, str] = {
    "planner": "interlock.planner.service:PlannerService",
    "policy": "interlock.policy.service:PolicyService",
    "approval": "interlock.approval.service:ApprovalService",
    "dispatcher": "interlock.dispatcher.service:DispatcherService",
    "auditor": "interlock.auditor.service:AuditorService",
    "api": "interlock.api.server:ApiService",
}


def serve(ctx: typer.Context,
          name: Annotated[ServiceName, typer.Argument(metavar="NAME", help="the service to run")]) -> None:
    """Run one service in this process until interrupted (run more copies to scale it out)."""
    from interlock.runtime import telemetry
    from interlock.runtime.settings import ServiceSettings

    options = globals_of(ctx)
    options.export_tls()  # TLS: --tls-* for ServiceSettings
    module, _, cls = SERVICE_CLASSES[name].partition(":")
    service_class = getattr(importlib.import_module(module), cls)
    given: dict[str, Any] = {k: v for k, v in (("nats_url", options.nats), ("creds", options.creds)) if v}
    settings = ServiceSettings(**given)
    # a service's log is its INFO lines, as text or JSON (INTERLOCK_LOG_FORMAT); traces and metrics per OTEL_*
    telemetry.setup(name, settings, instance=settings.instance)
    logging.getLogger("faststream").setLevel(logging.WARNING)
    try:
        asyncio.run(service_class(settings).run_forever())
    finally:
        telemetry.shutdown()


def load_target(target: str) -> Any:
    """``module:object`` or ``path/to/file.py:object`` (object defaults to ``worker``)."""
    from interlock.devstack.targets import TargetError
    from interlock.devstack.targets import load_target as load

    try:
        return load(target)
    except TargetError as e:
        fail(str(e))


def worker(ctx: typer.Context, target: Annotated[str, typer.Argument(
        metavar="TARGET", help="MODULE:OBJECT or path/to/file.py:OBJECT (OBJECT defaults to worker)")]) -> None:
    """Run agent handlers: an interlock.worker.Worker, until SIGINT or SIGTERM."""
    from interlock.worker import Worker

    loaded = load_target(target)
    if not isinstance(loaded, Worker):
        fail(f"{target} is not an interlock.worker.Worker")
    if globals_of(ctx).nats:
        loaded.nats_url = globals_of(ctx).nats
    if globals_of(ctx).creds:
        loaded.creds = globals_of(ctx).creds
    if globals_of(ctx).tenant:  # else the Worker's own, else INTERLOCK_TENANT
        loaded.tenant = globals_of(ctx).tenant
    globals_of(ctx).export_tls()  # TLS: --tls-* for WorkerSettings
    from interlock.runtime import telemetry
    from interlock.runtime.settings import WorkerSettings

    settings = loaded.settings or WorkerSettings()
    telemetry.setup("worker", settings, instance=loaded.name, level=logging.INFO if globals_of(ctx).verbose
                    else logging.WARNING)

    async def run() -> None:
        task = asyncio.ensure_future(loaded.run())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)  # Worker.run stops cleanly when cancelled
        with contextlib.suppress(asyncio.CancelledError):
            await task

    try:
        asyncio.run(run())
    finally:
        telemetry.shutdown()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def stop_on_signals() -> None:
    """SIGTERM (``kill PID``, ``docker stop``, systemd) and SIGHUP (the terminal closed) stop a
    process command as Ctrl-C does, and so does SIGINT when a shell started it in the background
    with SIGINT ignored: the child processes are never left running."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def ignore_stop_signals() -> None:
    """While stopping: a second signal must not interrupt the stop and leave children behind."""
    for sig in (*STOP_SIGNALS, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def nats(
    store_dir: Annotated[Path, typer.Option("--store-dir", help="JetStream store directory")] = DEFAULT_STORE_DIR,
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="client port (0: any free one)")] = 4222,
) -> None:
    """Run the embedded NATS server (JetStream, operator mode: credentials required) and provision
    Interlock's streams, until Ctrl-C. The identity home is the store directory's sibling ``identity``."""
    from interlock.core.natsserver import EmbeddedNats, NatsServerError
    from interlock.core.topology import provision
    from interlock.identity import IdentityHome
    from interlock.runtime.connect import connect

    identity = IdentityHome(store_dir.parent / "identity")
    admin = identity.get_or_issue("admin", "default", name="admin")
    server = EmbeddedNats(store_dir=store_dir, port=port, config=identity.server_config())
    stop_on_signals()
    try:
        url = server.start()
    except NatsServerError as e:
        fail(str(e))
    echo(f"nats-server (JetStream) listening on {url}, store {store_dir}; admin credential {admin}")

    async def provision_and_wait() -> None:
        nc = await connect(url, creds=admin, name="interlock-nats-provision", patient=False)
        for line in await provision(nc.jetstream()):
            echo(f"  {line}")
        echo(f"  keyring: {await identity.publish_keyring(nc.jetstream())} key(s) published")
        await nc.close()
        echo("Ctrl-C to stop")
        await asyncio.Event().wait()

    try:
        asyncio.run(provision_and_wait())
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        echo("nats-server stopped")


HomeOption = Annotated[Path, typer.Option("--home", help="state and logs directory")]


def up(
    ctx: typer.Context,
    home: HomeOption = Path(".interlock"),
    workers: Annotated[list[str] | None, typer.Option(
        "--worker", metavar="MODULE:OBJECT", help="also run this worker (repeatable)")] = None,
    max_restarts: Annotated[int, typer.Option(
        "--max-restarts", min=0, help="restarts in a row of a child that keeps exiting before giving up on it")] = 5,
    restart_backoff: Annotated[float, typer.Option(
        "--restart-backoff", metavar="SECONDS", min=0.01,
        help="wait before the first restart of a child; doubles with each exit in a row (at most 30 s)")] = 0.5,
    ready_timeout: Annotated[float, typer.Option(
        "--ready-timeout", metavar="SECONDS", min=1, help="give up unless all services consume by then")] = 120.0,
    api_port: Annotated[int, typer.Option(
        "--api-port", min=-1, max=65535, help="the HTTP API's port (0: any free one; -1: no HTTP API)")] = 8081,
) -> None:
    """Run NATS, the five services and the HTTP API, each as its own process; Ctrl-C, SIGTERM or SIGHUP stops them all.

    NATS is embedded unless --nats or INTERLOCK_NATS_URL names a server. Prints "ready" once every
    service (and worker) consumes. A child that exits is restarted with exponential backoff, and
    given up on after --max-restarts exits in a row. Everything the stack writes (NATS store,
    identity, logs, the auditor's projection, the URL file) is under --home.
    The first start creates an admin API key and prints it (once; it is kept in HOME/api-admin.key, 0600).
    """
    from interlock.devstack.stack import NotReady, RestartPolicy, Stack

    globals_of(ctx).export_tls()  # TLS: --tls-* for the processes the stack starts
    try:
        url = ClientSettings.load(nats_url=globals_of(ctx).nats).nats_url
    except ClientError as e:
        fail(str(e))
    stack = Stack(home=home, nats_url=url, workers=workers or [], api_port=None if api_port < 0 else api_port,
                  restart_policy=RestartPolicy(initial=restart_backoff, limit=max_restarts))
    stop_on_signals()
    code = 0
    try:
        url = stack.start_nats()
        asyncio.run(stack.provision())
        stack.start()
        echo(f"starting on {url}: {', '.join(stack.procs)} (logs in {home}/logs) …")
        try:
            for note in asyncio.run(stack.wait_ready(ready_timeout, supervise=echo)):
                echo(f"note: {note}")
        except NotReady as e:
            echo(f"interlock up: {e}")
            code = 1
            raise KeyboardInterrupt from None
        found = "" if home == Path(".interlock") else f" (other commands: INTERLOCK_HOME={home})"
        echo(f"ready: Interlock is up on {url}{found}. Ctrl-C stops it.")
        echo(f"Admin credential: {stack.admin_creds} (the CLI's default here; anonymous connections are "
             f"refused). Issue others with `interlock creds issue`.")
        if stack.api_url is not None:
            key, key_file = asyncio.run(stack.first_api_key())
            try:
                asyncio.run(stack.wait_api(timeout=180))
            except TimeoutError as e:
                echo(f"warning: {e}")
            echo(f"HTTP API: {stack.api_url}/api/v1 (docs {stack.api_url}/docs, console {stack.api_url}/)")
            if key is not None:
                echo(f"Admin API key (shown once; kept in {key_file}, mode 0600): {key}")
            else:
                echo(f"Admin API key: in {key_file} (export INTERLOCK_API_KEY=$(cat {key_file}))")
        while True:
            time.sleep(0.2)
            for line in stack.supervise():
                echo(line)
            if stack.procs and all(proc.given_up for proc in stack.procs.values()):
                echo("every process was given up on; stopping")
                code = 1
                break
    except KeyboardInterrupt:
        echo("stopping…")
    finally:
        ignore_stop_signals()
        stack.stop()
    echo("stopped")
    raise typer.Exit(code)


def demo(
    auto_approve: Annotated[bool, typer.Option(
        "--auto-approve", help="approve the approval gate automatically (else: wait for you to approve it)")] = False,
    home: HomeOption = Path(".interlock/demo"),
    timeout: Annotated[float, typer.Option("--timeout", metavar="SECONDS", min=0,
                                           help="give up if the run has not ended by then")] = 120.0,
) -> None:
    """Run the incident-remediation example end to end on an embedded stack.

    Prints each event as it is appended, then the auditor's timeline and the hash-chain check.
    """
    from interlock.devstack.demo import run_demo

    raise typer.Exit(run_demo(auto_approve=auto_approve, home=home, timeout=timeout))


def drill(
    ctx: typer.Context,
    runs: Annotated[int, typer.Option("--runs", min=1, help="runs to submit")] = 200,
    kills: Annotated[int, typer.Option("--kills", min=0, help="SIGKILLs to deal out")] = 20,
    cluster: Annotated[bool, typer.Option(
        "--cluster", help="run a 3-node JetStream cluster with R3 streams and kill NATS nodes too "
                          "(the IL_EVENTS stream leader at least once)")] = False,
    seed: Annotated[int | None, typer.Option("--seed", help="random seed, to repeat a drill (default: random)")] = None,
    timeout: Annotated[float, typer.Option(
        "--timeout", metavar="SECONDS", min=0,
        help="give up on runs not ended this many seconds after the workload started")] = 600.0,
    home: Annotated[Path | None, typer.Option(
        "--home", help="state and logs directory (default: a new temporary one)")] = None,
    nats_url: Annotated[str | None, typer.Option(
        "--nats", metavar="URL",
        help="target a stack that is already running (comma-separated URLs for a cluster): the drill then starts "
             "its own two example-agent workers there and kills only those; it never kills services or NATS nodes "
             "it did not start")] = None,
    copies: Annotated[int, typer.Option(
        "--copies", min=1, help="processes per run-path service (planner, policy, approval, dispatcher): a kill "
                                "takes one copy while the others carry on; with 1 a killed service's work waits "
                                "for its restart")] = 2,
) -> None:
    """Chaos drill: SIGKILL services, workers (and cluster nodes) under load; check nothing is lost.

    Exits non-zero on any violation.
    """
    from interlock.devstack.drill import drill_command

    raise typer.Exit(drill_command(runs=runs, kills=kills, cluster=cluster, seed=seed, timeout=timeout, home=home,
                                   nats_url=nats_url or globals_of(ctx).nats, copies=copies))
