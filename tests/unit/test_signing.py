"""Signing primitives, the keyring's rules and the authorship table, with no server."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from interlock.contracts import authorship as a
from interlock.contracts import events as ev
from interlock.contracts import subjects as s
from interlock.core import codec
from interlock.core.eventstore.authenticity import Authenticity
from interlock.core.eventstore.recorder import stored_commit
from interlock.core.verify import verify_commits
from interlock.identity import Keyring, Signer, key_entry, verify_signature
from interlock.identity._keys import KeyKind, NKey

TENANT = "default"


def signer() -> Signer:
    return Signer(NKey.generate(KeyKind.USER))


def entry(key: Signer, role: str, *, kind: str = "service", tenant: str = "*", principal: str | None = None,
          revoked_at: int | None = None) -> a.KeyEntry:
    return key_entry(key_id=key.key_id, principal=principal or role, role=role, kind=kind, tenant=tenant,
                     valid_from=int(time.time()) - 60, revoked_at=revoked_at)


def envelopes(run_id: str, *datas: ev.EventData, prev: str = ev.GENESIS_HASH, seq: int = 1) -> list[dict[str, Any]]:
    out = []
    for data in datas:
        body = data.model_dump(mode="json")
        envelope = {"run_id": run_id, "tenant": TENANT, "seq": seq, "type": data.type_name,
                    "at": datetime.now(UTC).isoformat(), "service": "x", "step_id": body.get("step_id"),
                    "attempt": body.get("attempt"), "data": body, "prev_hash": prev}
        envelope["hash"] = codec.event_hash(envelope)
        out.append(envelope)
        prev, seq = str(envelope["hash"]), seq + 1
    return out


def started() -> ev.RunStarted:
    return ev.RunStarted(workflow_id="wf", workflow_version="1", definition_hash="d" * 64, idempotency_key="k",
                         tenant=TENANT)


def commit(seq: int, run_id: str, events: list[dict[str, Any]], key: Signer | None, at: float | None = None) -> Any:
    subject = s.run_events(TENANT, run_id)
    headers = Authenticity(key).headers(subject, events) if key else {}
    return stored_commit(seq, codec.encode_commit(run_id, TENANT, events), headers, at or time.time())


def test_every_event_type_has_writers_and_only_services_write() -> None:
    assert set(a.WRITERS) == set(ev.EVENT_TYPES)
    assert all(roles and roles <= {"planner", "policy", "approval", "dispatcher"} for roles in a.WRITERS.values())
    assert a.WRITERS[ev.ApprovalGranted.type_name] == {"approval"}
    # a dispatched job's outcome is the dispatcher's alone
    outcome = {"type": ev.StepSucceeded.type_name, "attempt": 1}
    assert [r for r in ("planner", "approval", "dispatcher") if a.may_write(r, outcome)] == ["dispatcher"]
    assert a.may_write("planner", {"type": ev.StepSucceeded.type_name, "attempt": 0})


def test_signer_is_the_nkey_and_verification_never_raises() -> None:
    key = NKey.generate(KeyKind.USER)
    sig = Signer(key)
    assert sig.key_id == key.public_key and sig.sign(b"m") == key.sign(b"m")  # same key as the nkey
    assert verify_signature(sig.key_id, b"m", sig.sign_b64(b"m"))
    assert not verify_signature(sig.key_id, b"other", sig.sign_b64(b"m"))
    assert not verify_signature("Unot-a-key", b"m", "!!")
    assert "S" not in repr(sig).split("(")[1][:1]  # repr shows the public key only


def test_commit_statement_is_rfc8785() -> None:
    statement = {"b": 1, "a": "é", "domain": a.COMMIT_DOMAIN}
    assert a.canonical(statement) == '{"a":"é","b":1,"domain":"interlock.commit.v1"}'.encode()


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(st.characters(max_codepoint=127), max_size=8),
                       st.one_of(st.text(), st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1)), max_size=8))
def test_the_fast_canonical_form_is_rfc8785(statement: dict[str, Any]) -> None:
    assert a.canonical(statement) == rfc8785.dumps(statement)


def test_keyring_judges_commits() -> None:
    planner, dispatcher, stranger = signer(), signer(), signer()
    revoked = signer()
    ring = Keyring([entry(planner, "planner"), entry(dispatcher, "dispatcher"),
                    entry(revoked, "planner", revoked_at=int(time.time()) - 10)])
    run_id = str(uuid.uuid4())
    subject = s.run_events(TENANT, run_id)
    first = envelopes(run_id, started())

    def problem(key: Signer | None, events: list[dict[str, Any]], signature: str | None = None) -> str | None:
        sig = signature or (key.sign_b64(a.canonical(a.commit_statement(subject, events))) if key else None)
        found = ring.commit_problem(subject, events, key.key_id if key else None, sig, time.time())
        return found[0] if found else None

    assert problem(planner, first) is None
    assert problem(None, first) == "unsigned"
    assert problem(stranger, first) == "unknown_key"
    assert problem(revoked, first) == "revoked_key"
    assert problem(dispatcher, first) == "not_entitled"
    assert problem(planner, first, signature=planner.sign_b64(b"something else")) == "bad_signature"
    # the signature covers the subject: the same commit replayed onto another run is refused
    other = s.run_events(TENANT, str(uuid.uuid4()))
    sig = planner.sign_b64(a.canonical(a.commit_statement(subject, first)))
    assert ring.commit_problem(other, first, planner.key_id, sig, None) is not None


def test_store_authenticity_caches_and_verify_reports_every_problem() -> None:
    planner, policy = signer(), signer()
    ring = Keyring([entry(planner, "planner"), entry(policy, "policy")])
    run_id = str(uuid.uuid4())
    one = envelopes(run_id, started())
    two = envelopes(run_id, ev.StepReady(step_id="a", job_hash="0" * 64), prev=one[-1]["hash"], seq=2)
    forged = envelopes(run_id, ev.PolicyDecided(step_id="a", decision="allow", snapshot_id="s", job_hash="0" * 64),
                       prev=two[-1]["hash"], seq=3)
    commits = [commit(1, run_id, one, planner), commit(2, run_id, two, planner),
               commit(3, run_id, forged, planner),  # the planner may not decide policy
               stored_commit(4, b"\x00garbage", {}), commit(5, run_id, forged, policy)]
    auth = Authenticity(None, ring)
    subject = s.run_events(TENANT, run_id)
    verdicts = [auth.check(subject, c, run_id, TENANT) for c in commits]
    assert [v.kind if v else None for v in verdicts] == [None, None, "not_entitled", "undecodable", None]
    assert [auth.check(subject, c, run_id, TENANT) for c in commits] == verdicts
    assert auth.stats["checked"] == 5 and auth.stats["cached"] == 5 and auth.stats["refused"] == 2

    report = verify_commits(commits, run_id=run_id, tenant=TENANT, trust=ring)
    assert [(p.stream_seq, p.kind) for p in report.problems] == [(3, "not_entitled"), (4, "undecodable")]
    assert report.head_hash == forged[-1]["hash"] and report.signed_commits == 4
    unsigned = [commit(1, run_id, one, None)]
    # nothing accepted: the log is also empty for the services
    assert [p.kind for p in verify_commits(unsigned, run_id=run_id, tenant=TENANT, trust=ring).problems] == [
        "empty", "unsigned"]
    assert verify_commits(unsigned, run_id=run_id, tenant=TENANT, trust=ring, require_signatures=False).ok


def test_keyring_round_trips_through_json() -> None:
    key = signer()
    ring = Keyring([entry(key, "approver", kind="person", tenant="acme", principal="alice")])
    again = Keyring.from_json(ring.to_json())
    assert again.entries() == ring.entries()
    assert a.KeyringDocument.model_validate_json(ring.to_json()).writers[ev.RunStarted.type_name] == ["planner"]
    with pytest.raises(ValueError, match="not an Interlock keyring"):
        Keyring.load(__file__)


def signed_decision(key: Signer | None, run_id: str, decided: ev.PolicyDecided, *, tenant: str = TENANT,
                    **statement_changes: Any) -> ev.PolicyDecided:
    """``decided`` carrying the policy statement ``key`` signed (with ``statement_changes`` made
    to the statement before signing: a statement of another decision)."""
    statement = a.policy_statement(tenant, run_id, decided, datetime.now(UTC).isoformat())
    statement = statement.model_copy(update=statement_changes)
    signed = a.SignedPolicyDecision(statement=statement, key_id=key.key_id if key else "",
                                    signature=key.sign_b64(a.policy_bytes(statement)) if key else "")
    return decided.model_copy(update={"signed": signed})


def test_the_planner_writes_a_policy_decision_only_with_the_policy_services_statement() -> None:
    planner, policy, approver, other_planner = signer(), signer(), signer(), signer()
    ring = Keyring([entry(planner, "planner"), entry(policy, "policy"), entry(other_planner, "planner"),
                    entry(approver, "approver", kind="person", tenant=TENANT, principal="alice")])
    run_id = str(uuid.uuid4())
    subject = s.run_events(TENANT, run_id)
    one = envelopes(run_id, started())
    decided = ev.PolicyDecided(step_id="a", decision="allow", snapshot_id="snap", rule_ids=["r1"], job_hash="0" * 64)

    def verdict(decision: ev.PolicyDecided, writer: Signer = planner) -> str | None:
        ready = (ev.StepReady(step_id="a", job_hash="0" * 64),) if writer is not policy else ()
        events = envelopes(run_id, *ready, decision, prev=one[-1]["hash"], seq=2)
        sig = writer.sign_b64(a.canonical(a.commit_statement(subject, events)))
        found = ring.commit_problem(subject, events, writer.key_id, sig, time.time())
        return found[0] if found else None

    good = signed_decision(policy, run_id, decided)
    assert verdict(good) is None  # StepReady and the decision in one commit, by the planner
    assert verdict(decided) == "not_entitled"  # no statement: the planner may not decide policy
    assert verdict(decided, writer=policy) is None  # the policy service's own append, as before
    assert verdict(good, writer=other_planner) is None  # any planner copy may carry it in
    # a statement of another decision, step, job hash, rule set, run or tenant
    assert verdict(good.model_copy(update={"decision": "deny"})) == "policy_mismatch"
    assert verdict(good.model_copy(update={"rule_ids": []})) == "policy_mismatch"
    assert verdict(good.model_copy(update={"constraints": {"max_tokens": 1}})) == "policy_mismatch"
    assert verdict(signed_decision(policy, run_id, decided, step_id="b")) == "policy_mismatch"
    assert verdict(signed_decision(policy, run_id, decided, job_hash="1" * 64)) == "policy_mismatch"
    assert verdict(signed_decision(policy, str(uuid.uuid4()), decided)) == "policy_mismatch"
    assert verdict(signed_decision(policy, run_id, decided, tenant="acme")) == "policy_mismatch"
    # signed by whom: only a policy service key, and only its signature over this statement
    assert verdict(signed_decision(planner, run_id, decided)) == "policy_not_entitled"
    assert verdict(signed_decision(other_planner, run_id, decided)) == "policy_not_entitled"
    assert verdict(signed_decision(approver, run_id, decided)) == "policy_not_entitled"
    assert verdict(signed_decision(signer(), run_id, decided)) == "policy_unknown_key"
    assert verdict(signed_decision(None, run_id, decided)) == "policy_unsigned"
    assert good.signed is not None
    tampered = good.signed.model_copy(update={"signature": policy.sign_b64(b"another statement")})
    assert verdict(good.model_copy(update={"signed": tampered})) == "policy_bad_signature"
    # the approval service may not carry a policy statement in: the planner alone is vouched for
    assert a.vouched_by("planner", {"type": ev.PolicyDecided.type_name}) == "policy"
    assert a.vouched_by("approval", {"type": ev.PolicyDecided.type_name}) is None
    assert a.vouched_by("policy", {"type": ev.PolicyDecided.type_name}) is None
    # the exported keyring says so, for an independent verifier
    assert a.KeyringDocument.model_validate_json(ring.to_json()).vouched == {"PolicyDecided": {"planner": "policy"}}


def test_a_signed_decision_round_trips_to_the_event_it_records() -> None:
    run_id = str(uuid.uuid4())
    decided = ev.PolicyDecided(step_id="a", decision="require_approval", snapshot_id="snap", job_hash="0" * 64,
                               approver_role="lead", approval_expires_ms=60_000, constraints={"max_cost": 1.5})
    key = signer()
    carried = signed_decision(key, run_id, decided)
    assert carried.signed is not None
    again = a.policy_decided(carried.signed)
    assert again == carried  # the planner records exactly what was signed
    envelope = envelopes(run_id, again)[0]
    assert a.policy_mismatch(envelope, carried.signed.statement) is None
    # stored without the statement when signing is off; the policy service's own decisions hash as before
    unsigned = a.policy_decided(carried.signed.model_copy(update={"key_id": "", "signature": ""}))
    assert unsigned.signed is None
    assert "signed" in ev.PolicyDecided.omit_when_none  # left out of the stored data when absent
