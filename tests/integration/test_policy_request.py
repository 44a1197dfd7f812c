"""The policy decision as a request-reply (issue 15) on the real services: the planner appends a
step's StepReady and the policy service's signed decision in one commit; with the policy service
stopped its consumer decides later; a planner-written decision without a valid policy statement
changes nothing, is dead-lettered and reported by verify, online and offline."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from interlock.client import Client
from interlock.contracts import authorship as a
from interlock.contracts import events as ev
from interlock.contracts import headers as h
from interlock.contracts import routing
from interlock.contracts import subjects as s
from interlock.core import codec
from interlock.core.eventstore import StoredCommit
from interlock.identity import Signer
from interlock.policy.service import PolicyService
from interlock.worker import JobContext, Worker
from tests.integration.harness import Harness, types, unique
from tests.integration.test_signing import cli, independent

pytestmark = pytest.mark.integration


def chain(topic: str, wf: str) -> str:
    return f"""
id: {wf}
version: 1
steps:
  a: {{topic: {topic}, input: {{n: 1}}}}
  b: {{topic: {topic}, depends_on: [a]}}
  c: {{topic: {topic}, depends_on: [a]}}
"""


async def with_worker(harness: Harness, calls: list[str]) -> tuple[str, str]:
    wf, topic = unique("pr"), unique("t")
    await harness.apply(chain(topic, wf))
    worker = Worker(unique("pr"))

    @worker.job(topic)
    async def work(ctx: JobContext) -> dict[str, str]:
        calls.append(ctx.job.step_id)
        return {"done": ctx.job.step_id}

    await harness.start_worker(worker)
    return wf, topic


def key_of(harness: Harness, service: str) -> Signer:
    return Signer.from_creds(harness.principals.service(service))  # type: ignore[union-attr]


def decisions_by_commit(commits: list[StoredCommit]) -> list[tuple[StoredCommit, dict[str, Any]]]:
    return [(c, e) for c in commits for e in c.envelopes if e["type"] == ev.PolicyDecided.type_name]


async def test_a_ready_step_and_its_decision_land_in_one_commit_signed_by_the_planner(harness: Harness) -> None:
    calls: list[str] = []
    wf, _ = await with_worker(harness, calls)
    run_id = await harness.trigger(wf)
    assert types(await harness.wait_end(run_id))[-1] == "RunSucceeded"
    commits = await harness.store.read_commits(harness.tenant, run_id)
    planner, policy = key_of(harness, "planner"), key_of(harness, "policy")
    ring = harness.principals.home.keyring()  # type: ignore[union-attr]
    decided = decisions_by_commit(commits)
    assert sorted(e["step_id"] for _, e in decided) == ["a", "b", "c"]  # one decision per step, no more
    for commit, decision in decided:
        ready = [e for e in commit.envelopes if e["type"] == ev.StepReady.type_name
                 and e["step_id"] == decision["step_id"]]
        assert ready, f"the decision of {decision['step_id']} is not in its StepReady's commit"
        assert commit.signer == planner.key_id  # appended by the planner ...
        signed = decision["data"]["signed"]  # ... carrying the policy service's statement
        assert signed["key_id"] == policy.key_id
        assert signed["statement"]["job_hash"] == ready[0]["data"]["job_hash"] == decision["data"]["job_hash"]
        assert signed["statement"]["snapshot_id"] == decision["data"]["snapshot_id"]
        assert ring.policy_problem(decision) is None
    # b and c were made ready together: one commit, one request
    assert len({c.stream_seq for c, e in decided if e["step_id"] in ("b", "c")}) == 1
    # the policy service appended nothing at all to this run
    assert not [c for c in commits if c.signer == policy.key_id]
    client = await Client.connect(harness.url, creds=harness.principals.admin(), tenant=harness.tenant)  # type: ignore[union-attr]
    try:
        assert (await client.verify(run_id)).ok
    finally:
        await client.close()


def policies(harness: Harness) -> list[PolicyService]:
    return [svc for svc in harness.services if isinstance(svc, PolicyService)]


async def stop_policy(harness: Harness) -> None:
    for svc in policies(harness):
        await svc.stop()
        harness.services.remove(svc)


async def start_policy(harness: Harness) -> PolicyService:
    service = PolicyService(harness.service_settings("policy"))
    await service.start()
    harness.services.append(service)
    return service


async def test_with_the_policy_service_stopped_its_consumer_decides_later(harness: Harness) -> None:
    calls: list[str] = []
    wf, _ = await with_worker(harness, calls)
    await stop_policy(harness)
    run_id = await harness.trigger(wf)
    await harness.wait_for(run_id, lambda evs: ev.StepReady.type_name in types(evs))
    await harness.settled()
    # the planner appended the step ready alone (no responder): nothing decided, nothing dispatched
    events = await harness.events(run_id)
    assert ev.PolicyDecided.type_name not in types(events) and calls == []
    commits = await harness.store.read_commits(harness.tenant, run_id)
    assert all(routing.POLICY in routing.route_of(c.envelopes, "planner").split("_")
               for c in commits if any(e["type"] == ev.StepReady.type_name for e in c.envelopes))

    policy = await start_policy(harness)  # restarted: its consumer finds the step and decides it
    assert types(await harness.wait_end(run_id))[-1] == "RunSucceeded"
    assert sorted(calls) == ["a", "b", "c"]
    decided = decisions_by_commit(await harness.store.read_commits(harness.tenant, run_id))
    assert sorted(e["step_id"] for _, e in decided) == ["a", "b", "c"]  # each decided once
    by_policy = [e["step_id"] for c, e in decided if c.signer == key_of(harness, "policy").key_id]
    assert "a" in by_policy  # the fallback: the policy service's own append, no statement needed
    assert all("signed" not in e["data"] for c, e in decided if e["step_id"] in by_policy)
    # a step the log holds decided is never decided again (the sweep's pass, a redelivery)
    before = len(await harness.events(run_id))
    await policy.reconcile(harness.tenant, run_id)
    assert len(await harness.events(run_id)) == before


async def test_a_step_decided_in_the_log_is_not_decided_again_by_the_consumer(harness: Harness) -> None:
    wf = unique("gate")
    await harness.apply(f"""
id: {wf}
version: 1
steps:
  gate: {{type: approval, approvers: finance}}
""")
    run_id = await harness.trigger(wf)
    await harness.wait_for(run_id, lambda evs: "ApprovalRequested" in types(evs))
    await harness.settled()
    before = await harness.events(run_id)
    assert types(before).count(ev.PolicyDecided.type_name) == 1
    policy = policies(harness)[0]
    await policy.on_commit(harness.tenant, run_id, before)  # as if its consumer got the planner's commit
    await policy.reconcile(harness.tenant, run_id)
    assert await harness.events(run_id) == before


def envelope_after(last: dict[str, Any], run_id: str, tenant: str, data: ev.EventData) -> dict[str, Any]:
    body = data.model_dump(mode="json")
    if body.get("signed") is None:
        body.pop("signed", None)
    envelope = {"run_id": run_id, "tenant": tenant, "seq": last["seq"] + 1, "type": data.type_name,
                "at": datetime.now(UTC).isoformat(), "service": "planner", "step_id": body.get("step_id"),
                "attempt": body.get("attempt"), "data": body, "prev_hash": last["hash"]}
    envelope["hash"] = codec.event_hash(envelope)
    return envelope


def statement_by(key: Signer, harness: Harness, run_id: str, decided: ev.PolicyDecided,
                 **changes: Any) -> a.SignedPolicyDecision:
    statement = a.policy_statement(harness.tenant, run_id, decided, datetime.now(UTC).isoformat()
                                   ).model_copy(update=changes)
    return a.SignedPolicyDecision(statement=statement, key_id=key.key_id,
                                  signature=key.sign_b64(a.policy_bytes(statement)))


FORGERIES: dict[str, Callable[[Harness, str, ev.PolicyDecided], a.SignedPolicyDecision | None]] = {
    # no statement: the planner alone may not decide policy
    "not_entitled": lambda harness, run_id, d: None,
    # the planner signs the statement itself
    "policy_not_entitled": lambda harness, run_id, d: statement_by(key_of(harness, "planner"), harness, run_id, d),
    # a real policy statement, but of another job
    "policy_mismatch": lambda harness, run_id, d: statement_by(key_of(harness, "policy"), harness, run_id, d,
                                                               job_hash="f" * 64),
    # the policy service's key, a signature over something else
    "policy_bad_signature": lambda harness, run_id, d: statement_by(key_of(harness, "policy"), harness, run_id, d
                                                                    ).model_copy(update={"signature": key_of(
                                                                        harness, "policy").sign_b64(b"other")}),
}


@pytest.mark.parametrize("forgery", list(FORGERIES))
async def test_a_forged_planner_decision_changes_nothing_and_is_dead_lettered(harness: Harness, forgery: str) -> None:
    calls: list[str] = []
    wf, _ = await with_worker(harness, calls)
    await stop_policy(harness)  # the step stays ready, undecided: what a forger would want to decide
    run_id = await harness.trigger(wf)
    events = await harness.wait_for(run_id, lambda evs: ev.StepReady.type_name in types(evs))
    await harness.settled()
    ready = next(e for e in events if e["type"] == ev.StepReady.type_name)
    decided = ev.PolicyDecided(step_id="a", decision="allow", snapshot_id="forged", rule_ids=["mallory"],
                               job_hash=ready["data"]["job_hash"])
    decided = decided.model_copy(update={"signed": FORGERIES[forgery](harness, run_id, decided)})
    forged = [envelope_after(events[-1], run_id, harness.tenant, decided)]
    subject = s.run_events(harness.tenant, run_id)
    planner = key_of(harness, "planner")
    headers = {h.SIGNER: planner.key_id,
               h.SIGNATURE: planner.sign_b64(a.canonical(a.commit_statement(subject, forged)))}
    dlq_before = (await harness.nc.jetstream().stream_info(s.DLQ_STREAM)).state.last_seq
    writer = await harness.as_service("planner")
    ack = await writer.jetstream().publish(s.commit_subject(harness.tenant, run_id, "planner", routing.FLOW),
                                           codec.encode_commit(run_id, harness.tenant, forged), headers=headers)
    await harness.settled()

    state = await harness.run_state(run_id)
    assert state.steps["a"].status == "ready" and state.steps["a"].decision is None and calls == []
    assert "StepDispatched" not in types(await harness.events(run_id))
    letters = await harness.dead_letters("dispatcher", b"mallory", want=1, after_seq=dlq_before)
    assert letters and forgery in letters[0].reason and f"stream seq {ack.seq}" in letters[0].reason
    client = await Client.connect(harness.url, creds=harness.principals.admin(), tenant=harness.tenant)  # type: ignore[union-attr]
    try:
        report = await client.verify(run_id)
        assert [(p.kind, p.stream_seq) for p in report.problems] == [(forgery, ack.seq)]
        # the real decision still comes, and the run ends with the forged commit skipped
        await start_policy(harness)
        final = await harness.wait_end(run_id)
        assert types(final)[-1] == "RunSucceeded" and sorted(calls) == ["a", "b", "c"]
        applied = [e for e in final if e["type"] == ev.PolicyDecided.type_name and e["step_id"] == "a"]
        assert [e["data"]["snapshot_id"] for e in applied][:1] == ["forged"] and len(applied) == 2  # both stored
        assert (await harness.run_state(run_id)).steps["a"].decision.snapshot_id != "forged"  # type: ignore[union-attr]
    finally:
        await client.close()


def rewritten(line: str, subject: str, key: Signer, change: Callable[[dict[str, Any]], None]) -> str:
    """An exported commit with ``change`` made to its PolicyDecided, its events rehashed and
    rechained and the commit signed again with ``key`` (what a planner gone rogue could write)."""
    doc = json.loads(line)
    commit = json.loads(base64.b64decode(doc["data_b64"]))
    events = commit["events"]
    change(next(e for e in events if e["type"] == ev.PolicyDecided.type_name))
    prev = events[0]["prev_hash"]
    for e in events:
        e["prev_hash"] = prev
        e["hash"] = prev = codec.event_hash(e)
    doc["data_b64"] = base64.b64encode(json.dumps(commit).encode()).decode()
    doc["headers"] = {**doc.get("headers", {}), h.SIGNER: key.key_id,
                      h.SIGNATURE: key.sign_b64(a.canonical(a.commit_statement(subject, events)))}
    return json.dumps(doc)


async def test_offline_verify_passes_and_fails_on_a_tampered_statement(harness: Harness, tmp_path: Path) -> None:
    calls: list[str] = []
    wf, _ = await with_worker(harness, calls)
    run_id = await harness.trigger(wf)
    await harness.wait_end(run_id)
    admin = str(harness.principals.admin())  # type: ignore[union-attr]
    common = ["--nats", harness.url, "--creds", admin, "--tenant", harness.tenant]
    exported = await asyncio.to_thread(cli, "audit", "export", run_id, *common)
    keyring = await asyncio.to_thread(cli, "audit", "keyring", *common)
    assert exported.exit_code == 0 and keyring.exit_code == 0, (exported.output, keyring.output)
    log_file, keys_file = tmp_path / "run.jsonl", tmp_path / "keyring.json"
    log_file.write_text(exported.output)
    keys_file.write_text(keyring.output)
    good = cli("audit", "verify", "--offline", str(log_file), "--keys", str(keys_file))
    assert good.exit_code == 0, good.output
    assert independent(log_file, keys_file) == (0, ["ok"])

    lines = exported.output.splitlines()
    subject = json.loads(lines[0])["subject"]
    target = next(i for i, line in enumerate(lines[1:], start=1)
                  if b'"PolicyDecided"' in base64.b64decode(json.loads(line)["data_b64"]))
    target_seq = json.loads(lines[target])["stream_seq"]
    planner = key_of(harness, "planner")

    def also_in_statement(name: str, value: Any) -> Callable[[dict[str, Any]], None]:
        def change(e: dict[str, Any]) -> None:
            e["data"][name] = value
            e["data"]["signed"]["statement"][name] = value
        return change

    cases = {
        # the decision and its statement edited alike: the policy service's signature no longer covers it
        "policy_bad_signature": also_in_statement("rule_ids", ["mallory"]),
        # the decision edited, the statement left as signed
        "policy_mismatch": lambda e: e["data"].__setitem__("decision", "deny"),
        # the statement removed
        "not_entitled": lambda e: e["data"].pop("signed"),
    }
    for kind, change in cases.items():
        new_lines = [*lines[:target], rewritten(lines[target], subject, planner, change), *lines[target + 1:]]
        path = tmp_path / f"{kind}.jsonl"
        path.write_text("\n".join(new_lines) + "\n")
        result = cli("audit", "verify", "--offline", str(path), "--keys", str(keys_file), "-o", "json")
        assert result.exit_code == 1, (kind, result.output)
        ours = [(p["stream_seq"], p["kind"]) for p in json.loads(result.output)["problems"]]
        assert (target_seq, kind) in ours, (kind, ours)
        code, out = independent(path, keys_file)
        assert code == 1 and f"stream seq {target_seq}, seq " in out[0] and out[0].endswith(kind), (kind, out)
