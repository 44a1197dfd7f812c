"""Conformance of the wire contract: a worker in a second language (Node.js), written from
contracts/ alone, runs the example workflow end to end on the real stack (nats-server in operator
mode and the five services as processes, no Python worker).

The worker (tests/conformance/node-worker/worker.js) connects with its own .creds file and inbox
prefix, creates and pulls its tenant's topic consumers, heartbeats, registers in the agent
registry, dead-letters what it cannot decode, and reports results. Its npm dependencies are
installed with ``npm ci`` from the committed lock file into a cache outside the repository.
Without node and npm the test says why and skips; under CI=true it fails instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from interlock.client import Client, ClientError
from interlock.contracts import events as ev
from interlock.contracts import headers as h
from interlock.contracts import subjects as s
from interlock.devstack import example_file
from interlock.devstack.stack import Stack
from interlock.devstack.targets import worker_topics
from interlock.runtime.connect import connect

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
WORKER_DIR = Path(__file__).resolve().parent / "node-worker"
CONTRACTS = ROOT / "contracts"
TENANT = "default"
WORKER_NAME = "node-worker"
ECHO_TOPIC = "conformance.echo"  # the worker's one topic beyond the example's: returns its input
LARGE_WORKFLOW = f"""
id: conformance-large
version: "1"
steps:
  echo:
    topic: {ECHO_TOPIC}
    input: "{{{{ input }}}}"
"""


def _need(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        why = f"{tool} is not installed: the Node.js conformance worker cannot run (apt-get install nodejs npm)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI: {why}")
        pytest.skip(why)
    return found


@pytest.fixture(scope="module")
def modules() -> Path:
    """``node_modules`` of the worker, installed by ``npm ci`` from the committed lock file into a
    cache keyed by the lock file's hash (outside the repository; reused by later runs)."""
    node, npm = _need("node"), _need("npm")
    lock = (WORKER_DIR / "package-lock.json").read_bytes()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "interlock" / "node-worker"
    target = base / hashlib.sha256(lock + (WORKER_DIR / "package.json").read_bytes()).hexdigest()[:16]
    if (target / "node_modules" / ".package-lock.json").is_file():
        return target / "node_modules"
    staging = base / f"staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copy(WORKER_DIR / name, staging / name)
    done = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=staging,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "npm_config_update_notifier": "false"})
    if done.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        pytest.fail(f"npm ci failed ({node}):\n{done.stdout}\n{done.stderr}")
    try:
        staging.rename(target)
    except OSError:  # another run installed it meanwhile
        shutil.rmtree(staging, ignore_errors=True)
    return target / "node_modules"


def schema_validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((CONTRACTS / "schemas" / f"{name}.json").read_text())
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture
def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    monkeypatch.chdir(tmp_path)  # the stack writes .interlock/nats.url into the working directory
    stack = Stack(home=tmp_path / "home", port=0, workers=[],
                  env={"INTERLOCK_AUDITOR_DB": str(tmp_path / "auditor.sqlite3")})
    stack.start_nats()
    asyncio.run(stack.provision())
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


class NodeWorker:
    def __init__(self, modules: Path, stack: Stack, creds: Path, log_path: Path, effects: Path) -> None:
        self.log_path = log_path
        env = {**os.environ, "NODE_PATH": str(modules), "INTERLOCK_NATS_URL": stack.url, "INTERLOCK_CREDS": str(creds),
               "INTERLOCK_TENANT": TENANT, "INTERLOCK_WORKER_NAME": WORKER_NAME,
               "INTERLOCK_CONTRACTS": str(CONTRACTS), "INTERLOCK_SIDE_EFFECTS": str(effects)}
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen([shutil.which("node") or "node", str(WORKER_DIR / "worker.js")], env=env,
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log().splitlines():
                if line.startswith("READY "):
                    return line.split()[1]
            if self.proc.poll() is not None:
                pytest.fail(f"the Node worker exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.1)
        pytest.fail(f"the Node worker was not ready within {timeout:g}s:\n{self.log()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return -9
        return self.proc.returncode


def test_node_worker_runs_the_example_end_to_end(modules: Path, stack: Stack, tmp_path: Path) -> None:
    topics = [*worker_topics(f"{example_file('agents.py')}:worker"), ECHO_TOPIC]
    # a worker credential of its tenant and the example's topics, as `interlock creds issue` gives one
    creds = stack.identity.get_or_issue("worker", TENANT, topics, name=WORKER_NAME)
    effects = tmp_path / "effects.jsonl"
    worker = NodeWorker(modules, stack, creds, tmp_path / "node-worker.log", effects)
    try:
        worker_id = worker.wait_ready()
        protocol = json.loads((CONTRACTS / "asyncapi.json").read_text())["x-interlock-protocol"]
        run_id = asyncio.run(_scenario(stack, worker_id, set(topics), protocol, worker))
        # the CLI's `audit verify` on the run the Node worker did
        verify = subprocess.run([sys.executable, "-m", "interlock.cli", "--nats", stack.url, "--creds",
                                 str(stack.admin_creds), "audit", "verify", run_id],
                                capture_output=True, text=True, timeout=60)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert worker.stop() == 0, f"the Node worker did not shut down cleanly:\n{worker.log()}"
        assert asyncio.run(_registered(stack)) == [], "a clean shutdown deletes the worker's registry entries"
    finally:
        worker.stop()
    applied = [json.loads(line) for line in effects.read_text().splitlines()]
    assert [e["what"].split()[0] for e in applied] == ["applied"], applied


async def _registered(stack: Stack) -> list[tuple[str, str]]:
    async with await Client.connect(stack.url, creds=stack.admin_creds, tenant=TENANT, name="conformance") as client:
        return [(r.topic, r.worker_id) for r in await client.agents()]


async def _scenario(stack: Stack, worker_id: str, topics: set[str], protocol: dict[str, Any],
                    worker: NodeWorker) -> str:
    async with await Client.connect(stack.url, creds=stack.admin_creds, tenant=TENANT, name="conformance") as client:
        # registered for every topic of the example, with its own worker id
        registered = await client.agents()
        assert {r.topic for r in registered} == topics and {r.worker_id for r in registered} == {worker_id}

        await client.apply_workflow(example_file("workflow.yaml").read_text(), filename="workflow.yaml")
        key = f"conformance-{uuid.uuid4().hex}"
        alert = {"alert": {"id": "INC-1", "host": "web-7", "service": "checkout", "symptom": "5xx spike"}}
        run_id = await client.start_run("incident-remediation", alert, key=key, requested_by="conformance")
        # the documented derivation gives the run id of one's own trigger
        naming = protocol["run_id"]
        name = naming["name"].format(tenant=TENANT, workflow_id="incident-remediation", idempotency_key=key)
        assert run_id == str(uuid.uuid5(uuid.UUID(naming["uuid5_namespace"]), name))

        async def approve(envelope: dict[str, Any]) -> None:
            if envelope["type"] == ev.ApprovalRequested.type_name:
                data = envelope["data"]
                # the pending approval as the approvals query lists it (the projection follows the log)
                deadline = time.monotonic() + 15
                while not (pending := [a for a in await client.approvals() if a["run_id"] == run_id]):
                    assert time.monotonic() < deadline, "the approvals query never listed the pending approval"
                    await asyncio.sleep(0.1)
                schema_validator("ApprovalsReply").validate({"ok": True, "result": pending})
                assert pending[0]["job_hash"] == data["job_hash"]
                reply = await client.approve(run_id, data["step_id"], role=data["approver_role"],
                                             job_hash=data["job_hash"], reason="conformance")
                assert reply.ok, reply.error

        final = await client.wait(run_id, timeout=120, on_event=approve)
        events = await client.events(run_id)
        assert final == ev.RunSucceeded.type_name, (f"{[e['type'] for e in events]}\nworker log:\n{worker.log()}")
        by_type: dict[str, list[dict[str, Any]]] = {}
        for e in events:
            by_type.setdefault(e["type"], []).append(e)
        succeeded = {e["data"]["step_id"]: e["data"] for e in by_type[ev.StepSucceeded.type_name]}
        job_steps = {"detect", "classify", "enrich", "patch_plan", "apply_patch"}
        assert job_steps <= set(succeeded)
        assert {succeeded[step]["worker"] for step in job_steps} == {worker_id}, "results name the worker id"
        assert succeeded["classify"]["output"]["severity"] == "high"
        # apply fails its first attempt (retryable) and succeeds on the second
        failed = by_type[ev.StepFailed.type_name]
        assert [(f["data"]["step_id"], f["data"]["attempt"], f["data"]["final"]) for f in failed] == [
            ("apply_patch", 1, False)]
        assert succeeded["apply_patch"]["attempt"] == 2

        # the queries' results match their generated schemas
        await client.wait_projected(run_id)
        status = await client.status(run_id)
        replies: dict[str, Any] = {"RunsReply": await client.runs(), "StatusReply": status,
                                   "TimelineReply": await client.timeline(run_id),
                                   "ApprovalsReply": await client.approvals()}
        for reply_type, result in replies.items():
            schema_validator(reply_type).validate({"ok": True, "result": result})
        assert status["status"] == "succeeded" and status["chain_ok"]
        history = {st["step_id"]: st["history"] for st in status["steps"]}
        assert {a["worker"] for a in history["apply_patch"]} == {worker_id}

        report = await client.verify(run_id)
        assert report.ok, report.problems
        await _heartbeat_check(client, run_id, worker_id, by_type)
        await _dead_letter_check(stack, client, worker)
        await _large_payload_check(client, protocol["inline_limit_bytes"], worker)
        return run_id


async def _heartbeat_check(client: Client, run_id: str, worker_id: str,
                           by_type: dict[str, list[dict[str, Any]]]) -> None:
    """Every dispatched attempt got heartbeats (JetStream, no msg id), the first one at its start."""
    sub = await client.js.subscribe(s.heartbeat(TENANT, run_id), ordered_consumer=True)
    beats: list[dict[str, Any]] = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except TimeoutError:
                break
            assert h.MSG_ID not in (msg.headers or {}), "heartbeats carry no msg id"
            beats.append(json.loads(msg.data))
    finally:
        await sub.unsubscribe()
    validator = schema_validator("Heartbeat")
    for beat in beats:
        validator.validate(beat)
    dispatched = {e["data"]["job_id"] for e in by_type[ev.StepDispatched.type_name]}
    assert {b["job_id"] for b in beats if b["progress"] == "started"} == dispatched
    assert {b["worker"] for b in beats} == {worker_id}
    assert any(b["progress"] == "connecting" for b in beats), "a handler's own progress beat arrives"


async def _large_payload_check(client: Client, inline_limit: int, worker: NodeWorker) -> None:
    """An input over the inline limit reaches the worker as input_ref, and its output over the limit
    comes back as output_ref (stored under its sha256), which the dispatcher resolves."""
    await client.apply_workflow(LARGE_WORKFLOW, filename="large.yaml")
    blob = "x" * (inline_limit + 1000)
    run_id = await client.start_run("conformance-large", {"blob": blob}, key=uuid.uuid4().hex)
    try:
        final = await client.wait(run_id, timeout=60)
    except ClientError as e:
        events = await client.events(run_id)
        pytest.fail(f"{e}: {[(x['type'], x['data']) for x in events]}\nworker log:\n{worker.log()}")
    events = await client.events(run_id)
    assert final == ev.RunSucceeded.type_name, f"{[e['type'] for e in events]}\nworker log:\n{worker.log()}"
    dispatched = next(e for e in events if e["type"] == ev.StepDispatched.type_name)
    assert dispatched["data"]["step_id"] == "echo"
    done = next(e["data"] for e in events if e["type"] == ev.StepSucceeded.type_name)
    ref = done["output_ref"]
    assert ref is not None and done["output"] is None, "a large output travels as output_ref"
    store = await client.js.object_store(ref["object_store"])
    data = (await store.get(ref["key"])).data or b""
    assert hashlib.sha256(data).hexdigest() == ref["sha256"] == ref["key"] and len(data) == ref["size"]
    assert json.loads(data) == {"echo": {"blob": blob}}


async def _dead_letter_check(stack: Stack, client: Client, worker: NodeWorker) -> None:
    """A job that does not decode is dead-lettered by the worker (DeadLetter schema, hash of the
    original) and acked, not redelivered."""
    garbage = b"\xff not a job " + uuid.uuid4().bytes.hex().encode()
    nc = await connect(stack.url, creds=stack.creds["dispatcher"], patient=False)  # who publishes jobs
    try:
        await nc.jetstream().publish(s.job(TENANT, "incident.detect"), garbage)
    finally:
        await nc.close()
    digest = hashlib.sha256(garbage).hexdigest()
    validator = schema_validator("DeadLetter")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        letters = [d for d in await client.dead_letters(limit=1000) if d.sha256 == digest]
        if letters:
            letter = letters[0]
            validator.validate(letter.model_dump(mode="json"))
            assert (letter.service, letter.subject, letter.size) == ("worker", s.job(TENANT, "incident.detect"),
                                                                       len(garbage))
            assert letter.data_b64 and not letter.truncated
            return
        await asyncio.sleep(0.3)
    pytest.fail(f"the Node worker did not dead-letter an undecodable job:\n{worker.log()}")
