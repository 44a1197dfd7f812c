"""Tamper detection by the audit verifier, on logs produced by a real Run aggregate."""

from __future__ import annotations

import copy
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from interlock.contracts import events as ev
from interlock.contracts.messages import JobError
from interlock.core import codec
from interlock.core.run import Run
from interlock.core.verify import VerifyReport, render_report, verify_envelopes

TENANT = "t-audit"


def build_log() -> list[dict[str, Any]]:
    """A finished run: 11 events, one step retried once, one skipped."""
    run = Run.start(uuid.uuid4(), ev.RunStarted(workflow_id="wf", workflow_version="1", definition_hash="d" * 64,
                                                idempotency_key="k-1", tenant=TENANT, input={"x": 1}))
    run.mark_step_ready(ev.StepReady(step_id="a", topic="work.do", input={"n": 1}, job_hash="j" * 64))  # 2
    run.decide_policy(ev.PolicyDecided(step_id="a", decision="allow", snapshot_id="s", job_hash="j" * 64))  # 3
    run.dispatch_step(ev.StepDispatched(step_id="a", attempt=1, job_id="r:a@1", topic="work.do"))  # 4
    run.fail_step(ev.StepFailed(step_id="a", attempt=1, final=False, error=JobError(message="flaky")))  # 5
    run.schedule_retry(ev.RetryScheduled(step_id="a", attempt=2, due_at=datetime(2030, 1, 1, tzinfo=UTC),
                                         delay_ms=10))  # 6
    run.dispatch_step(ev.StepDispatched(step_id="a", attempt=2, job_id="r:a@2", topic="work.do"))  # 7
    run.record_heartbeat(ev.StepHeartbeat(step_id="a", attempt=2, worker="w1"))  # 8
    run.succeed_step(ev.StepSucceeded(step_id="a", attempt=2, output={"amount": 12.5}))  # 9
    run.skip_step(ev.StepSkipped(step_id="b", reason="condition false"))  # 10
    run.succeed(ev.RunSucceeded(output={"amount": 12.5}))  # 11
    envelopes: list[dict[str, Any]] = []
    prev = ev.GENESIS_HASH
    for event in run.collect_events():
        envelope = codec.envelope_from_event(event, tenant=TENANT, service="unit", prev_hash=prev)
        envelopes.append(envelope)
        prev = envelope["hash"]
    # as stored and read back: through JSON
    return codec.decode_commit_raw(codec.encode_commit(run.run_id, TENANT, envelopes))["events"]


@pytest.fixture
def log() -> list[dict[str, Any]]:
    return build_log()


def rehash(envelope: dict[str, Any]) -> dict[str, Any]:
    envelope["hash"] = codec.event_hash(envelope)
    return envelope


def at(log: list[dict[str, Any]], seq: int) -> dict[str, Any]:
    return next(e for e in log if e["seq"] == seq)


def found(report: VerifyReport) -> set[tuple[int | None, str]]:
    return {(p.seq, p.kind) for p in report.problems}


def test_untouched_log_verifies(log: list[dict[str, Any]]) -> None:
    report = verify_envelopes(log)
    assert report.ok and report.problems == []
    assert report.events == 11 and report.run_id == log[0]["run_id"] and report.tenant == TENANT
    assert report.head_hash == log[-1]["hash"]
    text = render_report(report)
    assert text == f"run {log[0]['run_id']} (tenant {TENANT}): 11 events, chain intact, head sha256 {log[-1]['hash']}"
    assert verify_envelopes(log, run_id=log[0]["run_id"], tenant=TENANT).ok


def test_edited_data_is_a_hash_mismatch(log: list[dict[str, Any]]) -> None:
    at(log, 9)["data"]["output"]["amount"] = 1250.0
    report = verify_envelopes(log)
    assert not report.ok
    assert found(report) == {(9, "hash_mismatch")}
    assert report.problems[0].position == 9


def test_edit_with_recomputed_hash_breaks_the_next_link(log: list[dict[str, Any]]) -> None:
    at(log, 9)["data"]["worker"] = "w2"
    rehash(at(log, 9))
    report = verify_envelopes(log)
    assert found(report) == {(10, "broken_link")}


def test_edited_last_event_with_recomputed_hash_changes_the_head(log: list[dict[str, Any]]) -> None:
    head = log[-1]["hash"]
    log[-1]["data"]["output"] = {"amount": 0}
    rehash(log[-1])
    report = verify_envelopes(log)
    # nothing follows the last event: only an externally recorded head hash reveals the edit
    assert report.ok and report.head_hash != head


def test_dropped_event(log: list[dict[str, Any]]) -> None:
    del log[4]  # seq 5
    report = verify_envelopes(log)
    assert found(report) == {(6, "seq_gap"), (6, "broken_link")}
    assert report.events == 10
    gap = next(p for p in report.problems if p.kind == "seq_gap")
    assert "from 4 to 6" in gap.message and gap.position == 5


def test_dropped_tail_is_invisible_without_a_head_hash(log: list[dict[str, Any]]) -> None:
    head = log[-1]["hash"]
    report = verify_envelopes(log[:-2])
    assert report.ok and report.head_hash != head


def test_inserted_forged_event_with_a_correct_hash(log: list[dict[str, Any]]) -> None:
    # a forged success of attempt 1, chained correctly after seq 5 and hashed correctly
    forged = copy.deepcopy(at(log, 5))
    forged.update(type="StepSucceeded", seq=6, prev_hash=at(log, 5)["hash"],
                  data={"step_id": "a", "attempt": 1, "output": {"amount": 1e9}, "worker": "mallory"})
    rehash(forged)
    log.insert(5, forged)
    report = verify_envelopes(log)
    # the forgery itself is consistent; the real seq 6 no longer links to it and repeats its seq
    assert found(report) == {(6, "broken_link"), (6, "seq_order")}
    assert {p.position for p in report.problems} == {7}


def test_inserted_forged_event_renumbered(log: list[dict[str, Any]]) -> None:
    forged = rehash({**copy.deepcopy(at(log, 3)), "seq": 4, "prev_hash": at(log, 3)["hash"]})
    log.insert(3, forged)
    for envelope in log[4:]:
        envelope["seq"] += 1  # renumbered, but not re-hashed
    report = verify_envelopes(log)
    assert found(report) == {(5, "broken_link")} | {(seq, "hash_mismatch") for seq in range(5, 13)}


def test_swapped_events(log: list[dict[str, Any]]) -> None:
    log[3], log[4] = log[4], log[3]  # seq 4 and 5
    report = verify_envelopes(log)
    assert found(report) == {(5, "seq_gap"), (5, "broken_link"), (4, "seq_order"), (4, "broken_link"),
                             (6, "broken_link")}
    assert [p.position for p in report.problems if p.seq == 5] == [4, 4]


def test_changed_tenant(log: list[dict[str, Any]]) -> None:
    at(log, 7)["tenant"] = "t-other"
    report = verify_envelopes(log)
    assert found(report) == {(7, "hash_mismatch"), (7, "tenant_mismatch")}
    # with the hash recomputed, the next link breaks
    rehash(at(log, 7))
    assert found(verify_envelopes(log)) == {(7, "tenant_mismatch"), (8, "broken_link")}


def test_whole_log_moved_to_another_tenant(log: list[dict[str, Any]]) -> None:
    # every envelope re-tenanted and the whole chain recomputed: consistent, except that the run
    # was started for another tenant, and the reader asked for another tenant
    prev = ev.GENESIS_HASH
    for envelope in log:
        envelope["tenant"], envelope["prev_hash"] = "t-other", prev
        prev = rehash(envelope)["hash"]
    assert found(verify_envelopes(log)) == {(1, "tenant_mismatch")}
    report = verify_envelopes(log, tenant=TENANT)
    assert (1, "tenant_mismatch") in found(report) and len(report.problems) == 12


def test_changed_run_id(log: list[dict[str, Any]]) -> None:
    at(log, 3)["run_id"] = str(uuid.uuid4())
    rehash(at(log, 3))
    assert found(verify_envelopes(log)) == {(3, "run_mismatch"), (4, "broken_link")}
    assert found(verify_envelopes(log[:1], run_id=str(uuid.uuid4()))) == {(1, "run_mismatch")}


def test_first_event_must_be_run_started(log: list[dict[str, Any]]) -> None:
    report = verify_envelopes(log[1:])
    assert found(report) == {(2, "not_started"), (2, "seq_gap"), (2, "broken_link")}
    # a second RunStarted, chained correctly
    second = rehash({**copy.deepcopy(log[0]), "seq": 12, "prev_hash": log[-1]["hash"]})
    assert found(verify_envelopes([*log, second])) == {(12, "duplicate_start")}


def test_unknown_type_and_invalid_data(log: list[dict[str, Any]]) -> None:
    at(log, 8)["type"] = "StepTeleported"
    rehash(at(log, 8))
    at(log, 4)["data"]["attempt"] = 0  # StepDispatched.attempt must be >= 1
    at(log, 4)["attempt"] = 0
    rehash(at(log, 4))
    del at(log, 10)["data"]["reason"]  # required
    rehash(at(log, 10))
    report = verify_envelopes(log)
    assert found(report) == {(8, "unknown_type"), (9, "broken_link"), (4, "invalid_data"), (5, "broken_link"),
                             (10, "invalid_data"), (11, "broken_link")}
    message = next(p.message for p in report.problems if p.seq == 4 and p.kind == "invalid_data")
    assert "attempt" in message


def test_envelope_fields_must_match_the_data(log: list[dict[str, Any]]) -> None:
    at(log, 7)["step_id"] = "b"
    rehash(at(log, 7))
    assert found(verify_envelopes(log)) == {(7, "field_mismatch"), (8, "broken_link")}


def test_malformed_input_never_raises(log: list[dict[str, Any]]) -> None:
    broken: list[Any] = [*log[:3], "not an event", {"seq": "four"}, *log[5:]]
    report = verify_envelopes(broken)
    assert not report.ok
    assert {p.kind for p in report.problems if p.position in (4, 5)} >= {"malformed", "broken_link"}
    assert report.events == len(broken)
    render_report(report)


def test_empty_log() -> None:
    report = verify_envelopes([])
    assert not report.ok and found(report) == {(None, "empty")} and report.head_hash is None
    assert "no events" in render_report(report)


def test_render_report_lists_every_problem(log: list[dict[str, Any]]) -> None:
    log[3], log[4] = log[4], log[3]
    report = verify_envelopes(log)
    lines = render_report(report).splitlines()
    assert lines[0] == f"run {log[0]['run_id']} (tenant {TENANT}): 11 events, 5 problems"
    assert len(lines) == 6
    assert "  seq 5 (position 4): seq_gap: seq jumps from 3 to 5 (1 missing)" in lines
    assert "  seq 6: broken_link: prev_hash" in "\n".join(lines)


TOP_FIELDS = ("run_id", "tenant", "seq", "type", "at", "service", "step_id", "attempt", "prev_hash")


@settings(max_examples=100, deadline=None)
@given(index=st.integers(0, 10), name=st.sampled_from((*TOP_FIELDS, "data")),
       value=st.one_of(st.text(max_size=8), st.integers(-3, 20), st.none()))
def test_any_single_edit_is_found_at_its_seq(index: int, name: str, value: Any) -> None:
    log = build_log()
    target = log[index]
    if name == "data":
        if target["data"] == {"v": value}:
            return
        target["data"] = {"v": value}
    else:
        if target[name] == value:
            return
        target[name] = value
    report = verify_envelopes(log)
    assert not report.ok
    assert any(p.kind == "hash_mismatch" and p.position == index + 1 for p in report.problems)
