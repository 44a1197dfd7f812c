"""Sealed heads against a real nats-server in operator mode, each test on a server of its own (they
delete and re-create IL_EVENTS with the admin credential, as an attacker holding it would).

IL_EVENTS denies purges and message deletes, and those flags cannot be lifted, so the admin's way
to shorten a log is to delete the stream and create it again with what it wants kept: a shorter
copy, a copy without deny flags that it then purges a run subject of or deletes messages from, a
run re-appended with a shorter history. The auditor's seal (in IL_SEALS, or exported to a file
when IL_SEALS was wiped too) catches each, citing the seal and the sequences.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import APIError

from interlock.auditor.service import AuditorService
from interlock.client import Client
from interlock.contracts import headers as h
from interlock.contracts import subjects as s
from interlock.core import seal as sl
from interlock.core.natsserver import EmbeddedNats
from interlock.core.seal import Seal
from interlock.core.topology import STREAMS, provision
from interlock.identity import IdentityHome, Signer
from interlock.worker import JobContext, Worker
from tests.integration.harness import Harness, connect, unique
from tests.principals import Principals

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

KEPT_HEADERS = (h.MSG_ID, h.SIGNER, h.SIGNATURE)  # what a copy keeps (the rest the server sets)


@dataclasses.dataclass
class Sealed:
    harness: Harness
    auditor: AuditorService
    admin: NATS
    client: Client
    workflow: str
    tmp: Path
    principals: Principals

    async def run(self, name: str) -> str:
        run_id = await self.harness.trigger(self.workflow, {"name": name})
        await self.harness.wait_end(run_id)
        return run_id

    async def seal(self) -> Seal:
        assert self.auditor.seal_writer is not None
        await self.auditor.seal_writer.seal("test")
        assert self.auditor.seal_writer.latest is not None
        return self.auditor.seal_writer.latest

    def writer(self) -> Any:
        assert self.harness.writer is not None
        return self.harness.writer.jetstream()

    async def export(self) -> Path:
        path = self.tmp / "seals.jsonl"
        path.write_text("".join(seal.encode().decode() + "\n" for seal in await self.client.seals()))
        return path


@pytest.fixture
async def sealed(tmp_path: Path) -> AsyncIterator[Sealed]:
    home = IdentityHome(tmp_path / "home")
    server = EmbeddedNats(store_dir=tmp_path / "store", port=0, log_file=tmp_path / "nats.log",
                          config=home.server_config())
    server.start()
    principals = Principals(home)
    admin_creds = principals.admin()
    admin = await connect(server.url, admin_creds)
    await provision(admin.jetstream())
    for name in ("planner", "policy", "approval", "dispatcher", "auditor"):
        principals.service(name)
    await home.publish_keyring(admin.jetstream())
    principals.publish_to = (server.url, admin_creds)
    harness = Harness(url=server.url, nc=admin, principals=principals)
    await harness.start_services()
    # seals only when a run ends or a test asks (no interval seal in the middle of a test)
    auditor = AuditorService(harness.service_settings("auditor"), db_path=":memory:", instance="seals",
                             seal_interval=3600)
    await auditor.start()
    topic = f"seal.{unique('echo').replace('-', '_')}"
    worker = Worker(unique("seal-w"))

    @worker.job(topic)
    async def echo(ctx: JobContext) -> dict[str, Any]:
        return {"echo": ctx.input}

    await harness.start_worker(worker)
    workflow = unique("sealwf")
    await harness.apply(f"id: {workflow}\nversion: 1\nsteps:\n  a: {{topic: {topic}}}\n"
                        f"  b: {{topic: {topic}, depends_on: [a]}}\n")
    client = await Client.connect(server.url, creds=admin_creds)
    try:
        yield Sealed(harness, auditor, admin, client, workflow, tmp_path, principals)
    finally:
        await client.close()
        await auditor.stop()
        await harness.stop()
        await admin.close()
        server.stop()


async def stored_messages(nc: NATS) -> list[tuple[int, str, bytes, dict[str, str]]]:
    """Every message of IL_EVENTS with the headers a copy would keep."""
    js = nc.jetstream()
    last = (await js.stream_info(s.EVENTS_STREAM)).state.last_seq
    out: list[tuple[int, str, bytes, dict[str, str]]] = []
    seq = 1
    while seq <= last:
        try:
            msg = await js.get_msg(s.EVENTS_STREAM, seq, direct=True)
        except nats.js.errors.NotFoundError:
            seq += 1
            continue
        kept = {k: v for k, v in (msg.headers or {}).items() if k in KEPT_HEADERS}
        out.append((seq, msg.subject or "", msg.data or b"", kept))
        seq += 1
    return out


async def recreate_events(sealed: Sealed, keep: Callable[[int, str], bool] = lambda seq, subject: True, *,
                          protected: bool = False) -> list[tuple[int, str, bytes, dict[str, str]]]:
    """Delete IL_EVENTS and create it again (without deny flags unless ``protected``) with the admin
    credential, and copy back the messages ``keep`` keeps, in order, with a service's (only
    services may write run logs); returns what it held before."""
    nc = sealed.admin
    js = nc.jetstream()
    writer = sealed.writer()
    before = await stored_messages(nc)
    spec = next(spec for spec in STREAMS if spec.name == s.EVENTS_STREAM)
    await js.delete_stream(s.EVENTS_STREAM)
    config = spec.config(1)
    if not protected:
        config = dataclasses.replace(config, deny_delete=False, deny_purge=False)
    await js.add_stream(config)
    for seq, subject, data, headers in before:
        if keep(seq, subject):
            await writer.publish(subject, data, headers=headers or None)
    return before


def kinds(problems: list[sl.SealProblem]) -> list[str]:
    return [p.kind for p in problems]


async def wait_for_seal(client: Client, covering: int, reason: str) -> Seal:
    for _ in range(200):
        seals = await client.seals()
        if seals and seals[-1].last_seq >= covering:
            assert any(x.reason == reason for x in seals), [x.reason for x in seals]
            return seals[-1]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no seal covering stream seq {covering} appeared")


async def test_a_clean_stack_is_sealed_when_runs_end_and_verifies_green(sealed: Sealed) -> None:
    first = await sealed.run("one")
    second = await sealed.run("two")
    last = (await sealed.admin.jetstream().stream_info(s.EVENTS_STREAM)).state.last_seq
    seal = await wait_for_seal(sealed.client, last, "run_ended")
    assert seal.runs == 2 and seal.signer == Signer.from_creds(sealed.principals.service("auditor")).key_id
    chain = await sealed.client.seals()
    assert [x.number for x in chain] == list(range(1, len(chain) + 1))
    assert all(b.prev == a.hash for a, b in itertools.pairwise(chain))

    report = await sealed.client.verify_seals()
    assert report.ok, report.problems
    assert report.runs_checked == 2 and report.seal == seal
    for run_id in (first, second):
        assert (await sealed.client.verify_seals(run_id)).ok
    # the stream grows after the seal: still green
    await sealed.run("three")
    assert (await sealed.client.verify_seals()).ok

    from tests.integration.test_cli import cli

    listed = await cli(sealed.harness, "audit", "seals", "-o", "json")
    assert listed.exit_code == 0, listed.output
    assert [row["number"] for row in json.loads(listed.stdout)][-1] >= seal.number
    verified = await cli(sealed.harness, "audit", "verify", first)
    assert verified.exit_code == 0, verified.output
    assert "chain intact" in verified.stdout and "agrees" in verified.stdout
    exported = await cli(sealed.harness, "audit", "seal", "export")
    assert exported.exit_code == 0
    assert [Seal.decode(line) for line in exported.stdout.splitlines()] == await sealed.client.seals()


async def test_the_streams_refuse_purges_and_deletes_even_to_the_admin(sealed: Sealed) -> None:
    await sealed.run("one")
    await sealed.seal()
    js = sealed.admin.jetstream()
    for stream in (s.EVENTS_STREAM, s.SEALS_STREAM):
        info = await js.stream_info(stream)
        assert info.config.deny_purge and info.config.deny_delete, stream
        with pytest.raises(APIError):
            await js.purge_stream(stream)
        with pytest.raises(APIError):
            await js.delete_msg(stream, 1)


async def test_a_recreated_stream_with_a_run_purged_is_caught(sealed: Sealed) -> None:
    victim = await sealed.run("victim")
    other = await sealed.run("other")
    seal = await sealed.seal()
    victim_subject = s.run_events("default", victim)
    sealed_head = sealed.auditor.seal_writer.heads[victim_subject] if sealed.auditor.seal_writer else None
    assert sealed_head is not None
    await recreate_events(sealed)  # an identical copy, but without deny flags …
    await sealed.admin.jetstream().purge_stream(s.EVENTS_STREAM,  # … so a run can go
                                             subject=s.run_log("default", victim))

    report = await sealed.client.verify_seals()
    assert kinds(report.problems) == [sl.STREAM_RECREATED, sl.RUN_DELETED], report.problems
    deleted = report.problems[1]
    assert deleted.subject == victim_subject and deleted.seal == seal.number
    assert deleted.stream_seq == sealed_head.stream_seq and f"event seq {sealed_head.seq}" in deleted.message
    # the run-level verify of the other run names the re-creation only; the victim's names its loss
    assert kinds((await sealed.client.verify_seals(other)).problems) == [sl.STREAM_RECREATED]
    # and the auditor refuses to seal over it
    assert sealed.auditor.seal_writer is not None
    assert await sealed.auditor.seal_writer.seal("test") == []
    assert kinds(sealed.auditor.seal_writer.problems) == [sl.STREAM_RECREATED]


async def test_a_shorter_copy_is_caught_as_truncation_and_lost_run_heads(sealed: Sealed) -> None:
    first = await sealed.run("first")
    second = await sealed.run("second")
    seal = await sealed.seal()
    cut = seal.last_seq - 3  # the last three commits (of the second run) are not copied
    await recreate_events(sealed, lambda seq, subject: seq <= cut, protected=True)
    report = await sealed.client.verify_seals()
    got = kinds(report.problems)
    assert got[:2] == [sl.STREAM_RECREATED, sl.STREAM_TRUNCATED], report.problems
    assert got[2:] == [sl.RUN_ROLLED_BACK]
    truncated, rolled = report.problems[1], report.problems[2]
    assert truncated.stream_seq == cut + 1 and f"ends at seq {cut}" in truncated.message
    assert rolled.subject == s.run_events("default", second)
    assert (await sealed.client.verify_seals(first)).problems[-1].kind == sl.STREAM_TRUNCATED


async def test_a_run_rolled_back_to_a_shorter_history_is_caught(sealed: Sealed) -> None:
    victim = await sealed.run("victim")
    await sealed.run("other")
    seal = await sealed.seal()
    subject = s.run_events("default", victim)
    before = await recreate_events(sealed)
    js = sealed.admin.jetstream()
    await js.purge_stream(s.EVENTS_STREAM, subject=s.run_log("default", victim))
    commits = [(subj, data, headers) for seq, subj, data, headers in before if s.log_of(subj) == subject]
    for subj, data, headers in commits[:2]:  # re-appended: only the first two commits of its history
        fresh = {k: v for k, v in headers.items() if k != h.MSG_ID}  # (the same ids would be dropped as repeats)
        await sealed.writer().publish(subj, data, headers=fresh)
    report = await sealed.client.verify_seals(victim)
    assert kinds(report.problems) == [sl.STREAM_RECREATED, sl.RUN_ROLLED_BACK], report.problems
    rolled = report.problems[1]
    want = sealed.auditor.seal_writer.heads[subject] if sealed.auditor.seal_writer else None
    assert want is not None and rolled.seal == seal.number and rolled.stream_seq == want.stream_seq
    assert f"the seal has its head at event seq {want.seq}" in rolled.message

    from tests.integration.test_cli import cli

    result = await cli(sealed.harness, "audit", "verify", victim)
    assert result.exit_code == 1
    assert f"seal #{seal.number}, stream seq {want.stream_seq}: run_rolled_back" in result.stdout


async def test_wiping_the_seals_too_is_caught_by_an_exported_copy(sealed: Sealed) -> None:
    victim = await sealed.run("victim")
    await sealed.run("other")
    await sealed.seal()
    exported = await sealed.export()
    subject = s.run_events("default", victim)
    js = sealed.admin.jetstream()
    await js.delete_stream(s.SEALS_STREAM)
    await recreate_events(sealed, lambda seq, subj: s.log_of(subj) != subject, protected=True)
    await provision(js)  # IL_SEALS back, empty

    online = await sealed.client.verify_seals()
    assert online.ok and online.seal is None  # nothing to compare with: the point of an export
    offline = await sealed.client.verify_seals(seals_file=exported)
    assert kinds(offline.problems)[0] == sl.STREAM_RECREATED
    assert sl.RUN_DELETED in kinds(offline.problems) and offline.source == str(exported)

    from tests.integration.test_cli import cli

    result = await cli(sealed.harness, "audit", "verify", "--seals", str(exported))
    assert result.exit_code == 1 and "run_deleted" in result.stdout and subject in result.stdout


async def test_a_forged_seal_is_reported(sealed: Sealed) -> None:
    await sealed.run("one")
    await sealed.seal()
    await sealed.run("two")
    await sealed.seal()
    exported = await sealed.export()
    lines = exported.read_text().splitlines()
    # an edited seal: claims less than the stream held
    raw = json.loads(lines[-1])
    raw["last_seq"] -= 1
    forged = sealed.tmp / "forged.jsonl"
    forged.write_text("\n".join([*lines[:-1], json.dumps(raw)]) + "\n")
    report = await sealed.client.verify_seals(seals_file=forged)
    assert kinds(report.problems) == [sl.SEAL_SIGNATURE] and report.problems[0].seal == raw["number"]
    assert report.seal is not None and report.seal.number == raw["number"] - 1  # checked against the last good one
    # a well-formed seal signed by a key that is not an auditor's (a worker's)
    worker_key = Signer.from_creds(sealed.principals.worker(["x"]))
    resigned = Seal.decode(lines[-1]).signed(worker_key)
    other = sealed.tmp / "other.jsonl"
    other.write_text("\n".join([*lines[:-1], resigned.encode().decode()]) + "\n")
    report = await sealed.client.verify_seals(seals_file=other)
    assert kinds(report.problems) == [sl.SEAL_SIGNATURE] and worker_key.key_id[:8] in report.problems[0].message


async def test_the_auditor_seals_on_its_interval_when_no_run_ends(sealed: Sealed) -> None:
    # a run that never ends (nobody serves its topic): only the interval seals its commits
    workflow = unique("stuck")
    await sealed.harness.apply(f"id: {workflow}\nversion: 1\nsteps:\n  a: {{topic: {unique('nobody')}}}\n")
    run_id = await sealed.harness.trigger(workflow)
    await sealed.harness.wait_for(run_id, lambda events: "StepDispatched" in [e["type"] for e in events])
    last = (await sealed.admin.jetstream().stream_info(s.EVENTS_STREAM)).state.last_seq
    ticking = AuditorService(sealed.harness.service_settings("auditor"), db_path=":memory:", instance="tick",
                             seal_interval=0.2)
    await ticking.start()  # (the fixture's auditor seals only when asked or a run ends: neither happens here)
    try:
        await wait_for_seal(sealed.client, last, "start")
        # another run starts and stays dispatched: no run ends, so the interval seals it
        second = await sealed.harness.trigger(workflow)
        await sealed.harness.wait_for(second, lambda events: "StepDispatched" in [e["type"] for e in events])
        grown = (await sealed.admin.jetstream().stream_info(s.EVENTS_STREAM)).state.last_seq
        seal = await wait_for_seal(sealed.client, grown, "interval")
        assert seal.reason == "interval" and seal.runs >= 2
    finally:
        await ticking.stop()


async def test_a_viewer_verifies_a_run_without_reading_the_seals(sealed: Sealed) -> None:
    run_id = await sealed.run("one")
    await sealed.seal()
    exported = await sealed.export()
    viewer = await Client.connect(sealed.harness.url, creds=sealed.principals.person("viewer", "default"))
    try:
        report = await viewer.verify_seals(run_id)
        assert report.ok and report.seal is None and "IL_SEALS" in report.note
        assert (await viewer.verify(run_id)).ok
        with_file = await viewer.verify_seals(run_id, seals_file=exported)
        assert with_file.ok and with_file.seal is not None and with_file.runs_checked == 1
        with pytest.raises(Exception, match="IL_EVENTS"):
            await viewer.verify_seals(seals_file=exported)  # the whole stream: the admin's
    finally:
        await viewer.close()


async def test_an_accepted_recreation_starts_a_new_chain_once_the_old_one_is_removed(sealed: Sealed) -> None:
    await sealed.run("one")
    await sealed.seal()
    await recreate_events(sealed, protected=True)
    assert sealed.auditor.seal_writer is not None
    assert await sealed.auditor.seal_writer.seal("test") == []  # refused: the stream was re-created
    exported = await sealed.export()  # the evidence, kept
    js = sealed.admin.jetstream()
    await js.delete_stream(s.SEALS_STREAM)
    await provision(js)
    [first] = await sealed.auditor.seal_writer.seal("test")
    assert first.number == 1 and first.runs == 1
    assert (await sealed.client.verify_seals()).ok
    assert kinds((await sealed.client.verify_seals(seals_file=exported)).problems) == [sl.STREAM_RECREATED]


async def test_an_exported_run_cut_short_is_caught_offline_by_the_seal_file(sealed: Sealed) -> None:
    from tests.integration.test_cli import cli

    run_id = await sealed.run("one")
    await sealed.seal()
    seals = await sealed.export()
    run_file, keys = sealed.tmp / "run.jsonl", sealed.tmp / "keyring.json"
    exported = await cli(sealed.harness, "audit", "export", run_id)
    assert exported.exit_code == 0, exported.output
    run_file.write_text(exported.stdout)
    keys.write_text((await cli(sealed.harness, "audit", "keyring")).stdout)
    offline = ["audit", "verify", "--offline", str(run_file), "--keys", str(keys), "--seals", str(seals)]
    intact = await cli(sealed.harness, *offline)
    assert intact.exit_code == 0 and "agrees" in intact.stdout, intact.output
    # the last commits cut off the export: the chain that is left is intact, the seal says it is short
    lines = exported.stdout.splitlines(keepends=True)
    run_file.write_text("".join(lines[:-2]))
    short = await cli(sealed.harness, *offline)
    assert short.exit_code == 1 and "run_rolled_back" in short.stdout, short.output
    assert "chain intact" in short.stdout.splitlines()[0]  # what the hash chain alone cannot see


async def test_two_auditor_copies_never_fork_the_chain(sealed: Sealed) -> None:
    from interlock.runtime.seals import Sealer, SealError, seal_verifier

    await sealed.run("one")
    nc = await connect(sealed.harness.url, sealed.principals.service("auditor"))
    try:
        signer = Signer.from_creds(sealed.principals.service("auditor"))
        other = Sealer(nc, signer, seal_verifier(None))
        await other.load()  # both copies know the same chain …
        await sealed.run("two")
        await sealed.seal()  # … one seals what the stream grew by first
        with pytest.raises(SealError, match="failed"):
            await other.seal("test")  # the other's append expects the old last seal: refused, not forked
        assert await other.seal("test") == []  # it read the chain again: nothing new since the latest
        await sealed.run("three")
        [taken] = await other.seal("test")  # and goes on from it
        chain = await sealed.client.seals()
        assert chain[-1] == taken and [x.number for x in chain] == list(range(1, len(chain) + 1))
        assert all(b.prev == a.hash for a, b in itertools.pairwise(chain))
        assert (await sealed.client.verify_seals()).ok
    finally:
        await nc.close()


async def test_a_server_restart_is_not_a_recreation(tmp_path: Path) -> None:
    """The stream's creation time survives a restart of the server on the same store, so a seal
    taken before still agrees after (else every restart would look like a re-created stream)."""
    from interlock.runtime.seals import Sealer, seal_verifier, verify_stream

    home = IdentityHome(tmp_path / "home")
    principals = Principals(home)
    admin_creds, auditor_creds = principals.admin(), principals.service("auditor")
    writer_creds = principals.service("planner")

    def start() -> EmbeddedNats:
        server = EmbeddedNats(store_dir=tmp_path / "store", port=0, log_file=tmp_path / "nats.log",
                              config=home.server_config())
        server.start()
        return server

    server = start()
    try:
        admin = await connect(server.url, admin_creds)
        await provision(admin.jetstream())
        writer = await connect(server.url, writer_creds)
        await writer.jetstream().publish(s.commit_subject("default", "r1", "planner", "flow"), commit_bytes("r1"))
        auditor = await connect(server.url, auditor_creds)
        [seal] = await Sealer(auditor, Signer.from_creds(auditor_creds), seal_verifier(None)).seal("test")
        assert seal.runs == 1
        for nc in (admin, writer, auditor):
            await nc.close()
    finally:
        server.stop()
    server = start()
    try:
        admin = await connect(server.url, admin_creds)
        report = await verify_stream(admin, seal_verifier(None))
        assert report.ok and report.seal == seal, report.problems
        await admin.close()
    finally:
        server.stop()


def commit_bytes(run_id: str) -> bytes:
    from interlock.contracts import events as ev
    from interlock.core import codec

    envelope: dict[str, Any] = {"run_id": run_id, "tenant": "default", "seq": 1, "type": ev.RunStarted.type_name,
                                "at": "2026-12-02T00:00:00+00:00", "service": "test", "step_id": None,
                                "attempt": None, "data": {}, "prev_hash": ev.GENESIS_HASH}
    envelope["hash"] = codec.event_hash(envelope)
    return codec.encode_commit(run_id, "default", [envelope])
