"""Dead letters on a real server: listed with id and status whatever lands on the subject, resolved
and replayed (the original published again under a new message id) without deleting anything, and
every action kept in bucket il_dlq_status."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from interlock.client import Client, DeadLetterEntry, NotFound, Refused
from interlock.contracts import events as ev
from interlock.contracts import headers as h
from interlock.contracts import subjects as s
from interlock.contracts.messages import DeadLetter, Trigger
from interlock.worker import JobContext, Worker
from tests.integration.harness import Harness, unique

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


@pytest.fixture
async def client(provisioned: str, admin_creds: Path) -> AsyncIterator[Client]:
    async with await Client.connect(provisioned, name="dlq-test", creds=admin_creds) as c:
        yield c


async def _entry(client: Client, match: Any, **filters: Any) -> DeadLetterEntry:
    """The dead letter ``match(entry)`` picks, once it is there."""
    for _ in range(150):
        found = [e for e in await client.dead_letter_entries(10_000, **filters) if match(e)]
        if found:
            [entry] = found
            return entry
        await asyncio.sleep(0.1)
    raise AssertionError("no such dead letter appeared")


async def test_a_trigger_dead_lettered_for_a_missing_workflow_is_replayed_once_it_exists(
        harness: Harness, client: Client) -> None:
    wf, topic = unique("late"), unique("t")
    key = uuid.uuid4().hex
    trigger = Trigger(workflow_id=wf, input={"n": 1}, idempotency_key=key)
    # published before the workflow exists: the planner dead-letters it
    await client.js.publish(s.trigger(client.tenant, wf), trigger.model_dump_json().encode(),
                            headers={h.MSG_ID: f"trigger:{client.tenant}:{wf}:{key}"})
    entry = await _entry(client, lambda e: e.letter.subject == s.trigger(client.tenant, wf), service="planner")
    assert entry.readable and entry.status == "open" and entry.record is None
    assert "not found" in entry.letter.reason or wf in entry.letter.reason

    await harness.apply(f"id: {wf}\nversion: 1\nsteps:\n  a: {{type: job, topic: {topic}}}\n")
    worker = Worker(unique("w"))

    @worker.job(topic)
    async def handle(ctx: JobContext) -> Any:
        return ctx.input  # the run's input (the step has no input:)

    await harness.start_worker(worker)
    record = await client.replay_dead_letter(entry.id, note="workflow registered")
    assert record.status == "replayed" and record.seq == entry.id
    [replay] = record.actions
    assert (replay.by, replay.note, replay.subject) == (client.principal, "workflow registered", entry.letter.subject)
    assert replay.msg_id == f"dlq-replay:{entry.id}:1" and replay.stream_seq is not None
    assert (datetime.now(UTC) - replay.at).total_seconds() < 30
    stored = await client.js.get_msg(s.TRIGGERS_STREAM, replay.stream_seq)
    assert stored.data == trigger.model_dump_json().encode()
    assert stored.headers is not None and stored.headers[h.MSG_ID] == replay.msg_id
    assert stored.headers[h.REPLAY_OF] == str(entry.id)

    run_id = await client.start_run(wf, key=key, check=False)  # the id the replayed trigger's run has
    assert await client.wait(run_id, timeout=30) == ev.RunSucceeded.type_name
    [done] = [e for e in await client.events(run_id) if e["type"] == ev.StepSucceeded.type_name]
    assert done["data"]["output"] == {"n": 1}

    # nothing deleted: the dead letter is still listed, now replayed, with its history
    again = await _entry(client, lambda e: e.id == entry.id, status="replayed")
    assert again.letter == entry.letter and again.record == record
    assert entry.id not in {e.id for e in await client.dead_letter_entries(10_000, status="open")}
    # a second replay gets a new message id; both are kept
    second = await client.replay_dead_letter(entry.id)
    assert [a.msg_id for a in second.actions] == [f"dlq-replay:{entry.id}:1", f"dlq-replay:{entry.id}:2"]


async def test_a_foreign_message_is_listed_resolvable_and_never_replayed(harness: Harness, client: Client) -> None:
    foreign = b"\x00 not a dead letter " + uuid.uuid4().hex.encode()
    planner = (await harness.as_service("planner")).jetstream()
    ack = await planner.publish(s.dead_letter("planner"), foreign)
    entry = await _entry(client, lambda e: e.id == ack.seq)
    assert not entry.readable and entry.status == "open"
    assert f"unreadable dead letter (stream seq {ack.seq}" in entry.letter.reason
    with pytest.raises(Refused, match=rf"dead letter {ack.seq} is not a dead letter .*resolve it instead"):
        await client.replay_dead_letter(ack.seq)
    first = await client.resolve_dead_letter(ack.seq, note="a test's stray message")
    second = await client.resolve_dead_letter(ack.seq, note="looked again: still stray")
    assert first.status == second.status == "resolved"
    assert [a.note for a in second.actions] == ["a test's stray message", "looked again: still stray"]
    assert (await _entry(client, lambda e: e.id == ack.seq, status="resolved")).record == second


@pytest.mark.parametrize("kind", ["truncated", "run event"])
async def test_what_cannot_be_published_again_is_refused_with_the_reason(harness: Harness, client: Client,
                                                                         kind: str) -> None:
    run_commit = s.commit_subject(client.tenant, unique("run"), "planner", "flow")
    subject = run_commit if kind == "run event" else s.result(client.tenant, "r1")
    letter = DeadLetter(service="dispatcher", subject=subject, reason=f"test {kind}",
                        data_b64=base64.b64encode(b"{}").decode(), at=datetime.now(UTC),
                        truncated=kind == "truncated", size=5_000_000, sha256="0" * 64)
    dispatcher = (await harness.as_service("dispatcher")).jetstream()
    ack = await dispatcher.publish(s.dead_letter("dispatcher"), letter.model_dump_json().encode())
    why = "keeps only the first" if kind == "truncated" else "not a queue a replay may publish to"
    with pytest.raises(Refused, match=why):
        await client.replay_dead_letter(ack.seq)
    assert (await _entry(client, lambda e: e.id == ack.seq)).status == "open"  # a refusal records nothing


async def test_an_unknown_id_is_not_found(client: Client) -> None:
    last = (await client.js.stream_info(s.DLQ_STREAM)).state.last_seq
    with pytest.raises(NotFound, match=rf"dead letter {last + 1000} not found"):
        await client.resolve_dead_letter(last + 1000, note="x")
