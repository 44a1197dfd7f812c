"""Signed commits and approvals on the real services: forged, foreign, unentitled and garbage
commits change nothing, are dead-lettered and reported by verify; approvals need the approver's
own key; a run's log verifies offline, and so says a second verifier that shares no code."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from interlock.cli import app
from interlock.client import Client
from interlock.contracts import events as ev
from interlock.contracts import headers as h
from interlock.contracts import subjects as s
from interlock.contracts.authorship import canonical, commit_statement
from interlock.core import codec
from interlock.identity import Signer
from interlock.identity._keys import KeyKind, NKey
from interlock.worker import JobContext, Worker
from tests.integration.harness import Harness, types, unique

pytestmark = pytest.mark.integration

VERIFIER = Path(__file__).resolve().parents[1] / "conformance" / "independent_verifier.py"


def gated(wf: str, topic: str) -> str:
    return f"""
id: {wf}
version: 1
steps:
  gate: {{type: approval, approvers: finance}}
  pay: {{topic: {topic}, depends_on: [gate]}}
"""


async def started_at_gate(harness: Harness, calls: list[str]) -> str:
    wf, topic = unique("sig"), unique("t")
    await harness.apply(gated(wf, topic))
    worker = Worker(unique("sig"))

    @worker.job(topic)
    async def pay(ctx: JobContext) -> dict[str, str]:
        calls.append(ctx.job.step_id)
        return {"paid": "yes"}

    await harness.start_worker(worker)
    run_id = await harness.trigger(wf)
    await harness.wait_for(run_id, lambda evs: "ApprovalRequested" in types(evs))
    await harness.settled()
    return run_id


def forged_grant(run_id: str, tenant: str, last: dict[str, Any], job_hash: str) -> list[dict[str, Any]]:
    """ApprovalGranted + StepSucceeded of the gate, hash-chained correctly onto ``last``."""
    out: list[dict[str, Any]] = []
    prev, seq = last["hash"], last["seq"]
    for data in (ev.ApprovalGranted(step_id="gate", job_hash=job_hash, approver="mallory", role="finance"),
                 ev.StepSucceeded(step_id="gate", attempt=0, output={"approved_by": "mallory"})):
        seq += 1
        body = data.model_dump(mode="json")
        envelope = {"run_id": run_id, "tenant": tenant, "seq": seq, "type": data.type_name,
                    "at": datetime.now(UTC).isoformat(), "service": "approval", "step_id": "gate",
                    "attempt": body.get("attempt"), "data": body, "prev_hash": prev}
        envelope["hash"] = codec.event_hash(envelope)
        out.append(envelope)
        prev = envelope["hash"]
    return out


async def publish_raw(harness: Harness, run_id: str, payload: bytes, headers: dict[str, str] | None = None) -> int:
    """Append bytes to the run's log with a service's connection (the server lets it), routed as
    the approval service's (so the planner, policy and dispatcher all get it)."""
    writer = await harness.as_service("dispatcher")
    ack = await writer.jetstream().publish(s.commit_subject(harness.tenant, run_id, "approval", "flow"), payload,
                                           headers=headers)
    return int(ack.seq)


def signed_with(key: Signer | None, subject: str, envelopes: list[dict[str, Any]]) -> dict[str, str] | None:
    if key is None:
        return None
    return {h.SIGNER: key.key_id, h.SIGNATURE: key.sign_b64(canonical(commit_statement(subject, envelopes)))}


FORGERS: dict[str, Callable[[Harness], Signer | None]] = {
    "unsigned": lambda harness: None,
    "unknown_key": lambda harness: Signer(NKey.generate(KeyKind.USER)),  # a foreign key
    # a real service key, but the planner may not write approval events
    "not_entitled": lambda harness: Signer.from_creds(harness.principals.service("planner")),  # type: ignore[union-attr]
}


@pytest.mark.parametrize("forgery", list(FORGERS))
async def test_a_forged_grant_with_a_correct_chain_changes_nothing(harness: Harness, forgery: str) -> None:
    calls: list[str] = []
    run_id = await started_at_gate(harness, calls)
    events = await harness.events(run_id)
    request = next(e for e in events if e["type"] == "ApprovalRequested")
    forged = forged_grant(run_id, harness.tenant, events[-1], request["data"]["job_hash"])
    subject = s.run_events(harness.tenant, run_id)
    dlq_before = (await harness.nc.jetstream().stream_info(s.DLQ_STREAM)).state.last_seq
    payload = codec.encode_commit(run_id, harness.tenant, forged)
    forged_seq = await publish_raw(harness, run_id, payload, signed_with(FORGERS[forgery](harness), subject, forged))
    await harness.settled()

    # no effect: the gate still waits, nothing was dispatched, the worker was never called
    state = await harness.run_state(run_id)
    assert state.steps["gate"].status == "awaiting_approval" and "pay" not in state.steps and calls == []
    assert "StepDispatched" not in types(await harness.events(run_id))
    # dead-lettered with the reason, by the services that consume commits
    letters = await harness.dead_letters("dispatcher", b"mallory", want=1, after_seq=dlq_before)
    assert letters and forgery in letters[0].reason and f"stream seq {forged_seq}" in letters[0].reason
    # verify reports it, with its sequence numbers
    client = await Client.connect(harness.url, creds=harness.principals.admin(), tenant=harness.tenant)  # type: ignore[union-attr]
    try:
        report = await client.verify(run_id)
        assert [(p.kind, p.stream_seq, p.seq) for p in report.problems] == [(forgery, forged_seq, forged[0]["seq"])]
        # the real approval still goes through, and the run ends with the forged commit skipped
        assert (await harness.decide(run_id, "gate", approver="fin-alice")).ok
        final = await harness.wait_end(run_id)
        assert types(final)[-1] == "RunSucceeded" and calls == ["pay"]
        granted = [e for e in final if e["type"] == "ApprovalGranted"]
        assert [e["data"]["approver"] for e in granted] == ["mallory", "fin-alice"]  # both stored, one applied
        after = await client.verify(run_id)
        assert [(p.kind, p.stream_seq) for p in after.problems] == [(forgery, forged_seq)]
    finally:
        await client.close()


async def test_a_service_key_may_write_only_its_own_event_types(harness: Harness) -> None:
    """The dispatcher's own key, signing a PolicyDecided (the policy service's): refused."""
    calls: list[str] = []
    run_id = await started_at_gate(harness, calls)
    events = await harness.events(run_id)
    last = events[-1]
    data = ev.PolicyDecided(step_id="pay", decision="allow", snapshot_id="x", job_hash="0" * 64)
    envelope = {"run_id": run_id, "tenant": harness.tenant, "seq": last["seq"] + 1, "type": data.type_name,
                "at": datetime.now(UTC).isoformat(), "service": "dispatcher", "step_id": "pay", "attempt": None,
                "data": data.model_dump(mode="json"), "prev_hash": last["hash"]}
    envelope["hash"] = codec.event_hash(envelope)
    subject = s.run_events(harness.tenant, run_id)
    dispatcher = Signer.from_creds(harness.principals.service("dispatcher"))  # type: ignore[union-attr]
    seq = await publish_raw(harness, run_id, codec.encode_commit(run_id, harness.tenant, [envelope]),
                            signed_with(dispatcher, subject, [envelope]))
    await harness.settled()
    assert "pay" not in (await harness.run_state(run_id)).steps
    client = await Client.connect(harness.url, creds=harness.principals.admin(), tenant=harness.tenant)  # type: ignore[union-attr]
    try:
        report = await client.verify(run_id)
        assert [(p.kind, p.stream_seq) for p in report.problems] == [("not_entitled", seq)]
        assert "may not write PolicyDecided" in report.problems[0].message
    finally:
        await client.close()


async def test_an_approval_needs_the_approvers_own_key(harness: Harness) -> None:
    calls: list[str] = []
    run_id = await started_at_gate(harness, calls)
    await harness.as_principal("fin-bob")  # bob exists, with his own key
    bob = Signer.from_creds(harness.principals.person("admin", harness.tenant, name="fin-bob"))  # type: ignore[union-attr]
    service_key = Signer.from_creds(harness.principals.service("approval"))  # type: ignore[union-attr]

    unsigned = await harness.decide(run_id, "gate", approver="fin-alice", sign=False)
    assert not unsigned.ok and "not signed" in (unsigned.error or "")
    # alice's decision signed with bob's key (or signed as bob): not alice's
    as_bob = await harness.decide(run_id, "gate", approver="fin-alice", signer=bob)
    assert not as_bob.ok and "not_entitled" in (as_bob.error or "")
    # not even a service can approve on a person's behalf
    by_service = await harness.decide(run_id, "gate", approver="fin-alice", signer=service_key)
    assert not by_service.ok and "signature refused" in (by_service.error or "")
    # a statement that says something else than the decision
    other_hash = await harness.decide(run_id, "gate", approver="fin-alice", statement={"job_hash": "f" * 64})
    assert not other_hash.ok and "job_hash" in (other_hash.error or "")
    await harness.settled()
    state = await harness.run_state(run_id)
    assert state.steps["gate"].status == "awaiting_approval" and calls == []
    refused = [e for e in await harness.events(run_id) if e["type"] == "ApprovalRefused"]
    assert len(refused) == 4

    assert (await harness.decide(run_id, "gate", approver="fin-alice", reason="ok")).ok
    final = await harness.wait_end(run_id)
    granted = next(e for e in final if e["type"] == "ApprovalGranted")
    signed = granted["data"]["signed"]
    assert signed["statement"]["principal"] == "fin-alice" and signed["statement"]["reason"] == "ok"
    client = await Client.connect(harness.url, creds=harness.principals.admin(), tenant=harness.tenant)  # type: ignore[union-attr]
    try:
        assert (await client.verify(run_id)).ok
    finally:
        await client.close()


async def test_garbage_on_a_run_subject_never_wedges_the_run(harness: Harness) -> None:
    calls: list[str] = []
    approved = await started_at_gate(harness, calls)
    cancelled = await started_at_gate(harness, calls)
    garbage = {run_id: await publish_raw(harness, run_id, b"\x00\xffnot a commit") for run_id in (approved, cancelled)}
    await harness.settled()
    # the run can still be approved, and the other cancelled
    assert (await harness.decide(approved, "gate", approver="fin-alice")).ok
    assert types(await harness.wait_end(approved))[-1] == "RunSucceeded"
    client = await Client.connect(harness.url, creds=harness.principals.admin(), tenant=harness.tenant)  # type: ignore[union-attr]
    try:
        assert (await client.cancel(cancelled, reason="garbage test")).ok
        assert types(await harness.wait_end(cancelled))[-1] == "RunCancelled"
        for run_id, seq in garbage.items():
            report = await client.verify(run_id)  # never crashes on bad bytes
            assert [(p.kind, p.stream_seq) for p in report.problems] == [("undecodable", seq)]
        # readers of the raw log skip it too (the client's replay, the CLI's describe)
        assert (await client.load_run(approved)).status == "succeeded"
    finally:
        await client.close()


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


async def test_export_and_verify_offline_and_independently(harness: Harness, tmp_path: Path) -> None:
    calls: list[str] = []
    run_id = await started_at_gate(harness, calls)
    assert (await harness.decide(run_id, "gate", approver="fin-alice")).ok
    await harness.wait_end(run_id)
    admin = str(harness.principals.admin())  # type: ignore[union-attr]
    common = ["--nats", harness.url, "--creds", admin, "--tenant", harness.tenant]

    run: Callable[..., Awaitable[Any]] = _in_thread
    exported = await run(cli, "audit", "export", run_id, *common)
    assert exported.exit_code == 0, exported.output
    keyring = await run(cli, "audit", "keyring", *common)
    assert keyring.exit_code == 0, keyring.output
    log_file, keys_file = tmp_path / "run.jsonl", tmp_path / "keyring.json"
    log_file.write_text(exported.output)
    keys_file.write_text(keyring.output)
    lines = exported.output.splitlines()

    # with no server at all
    good = cli("audit", "verify", "--offline", str(log_file), "--keys", str(keys_file))
    assert good.exit_code == 0, good.output
    assert "chain intact" in good.output and "checked against the keyring" in good.output
    assert independent(log_file, keys_file) == (0, ["ok"])
    source = VERIFIER.read_text()
    assert "import interlock" not in source and "from interlock" not in source

    # tampered copies: both verifiers fail, at the same stream seq
    def tampered(name: str, new_lines: list[str]) -> Path:
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(new_lines) + "\n")
        return path

    def edit(index: int, change: Callable[[dict[str, Any]], Any]) -> list[str]:
        out = list(lines)
        doc = json.loads(out[index])
        commit = json.loads(base64.b64decode(doc["data_b64"]))
        change(commit)
        doc["data_b64"] = base64.b64encode(json.dumps(commit).encode()).decode()
        out[index] = json.dumps(doc)
        return out

    target = 3  # the third stored commit
    target_seq = json.loads(lines[target])["stream_seq"]
    cases = {
        # an edited event, its hash left as it was
        "edited": edit(target, lambda c: c["events"][0].__setitem__("service", "mallory")),
        # an edited event with its hash recomputed: the signature no longer covers it
        "rehashed": edit(target, lambda c: (c["events"][-1].__setitem__("at", "2020-01-01T00:00:00+00:00"),
                                            c["events"][-1].__setitem__("hash", codec.event_hash(c["events"][-1])))),
        # a commit dropped: the next one does not continue the run
        "dropped": lines[:target] + lines[target + 1:],
        # a signature removed
        "unsigned": [*lines[:target], json.dumps({**json.loads(lines[target]), "headers": {}}), *lines[target + 1:]],
    }
    for name, new_lines in cases.items():
        path = tampered(name, new_lines)
        result = cli("audit", "verify", "--offline", str(path), "--keys", str(keys_file), "-o", "json")
        assert result.exit_code == 1, (name, result.output)
        report = json.loads(result.output)
        ours = {p["stream_seq"] for p in report["problems"]}
        code, out = independent(path, keys_file)
        theirs = {int(line.split(",")[0].removeprefix("stream seq ")) for line in out}
        expected = json.loads(new_lines[target])["stream_seq"] if name == "dropped" else target_seq
        assert code == 1 and expected in ours and ours == theirs, (name, report["problems"], out)


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    import asyncio

    return await asyncio.to_thread(fn, *args)


def independent(log_file: Path, keys_file: Path) -> tuple[int, list[str]]:
    """Run the second verifier in its own interpreter (it imports nothing from Interlock)."""
    done = subprocess.run([sys.executable, "-I", str(VERIFIER), str(log_file), str(keys_file)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert not done.stderr, done.stderr
    return done.returncode, done.stdout.splitlines()
