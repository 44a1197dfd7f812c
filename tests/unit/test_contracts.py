"""The language-neutral contracts: generated files up to date, AsyncAPI sound, models round-trip,
schemas accept what the models produce, evolution rules hold, every subject has a channel."""

from __future__ import annotations

import inspect
import json
import re
import types
from datetime import UTC, datetime, timedelta, timezone
from functools import cache
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from interlock.contracts import catalog as cat
from interlock.contracts import events as ev
from interlock.contracts import generate
from interlock.contracts import subjects as s
from interlock.contracts.messages import DeadLetter

CONTRACT_TYPES = generate.contract_types()
NAMES = sorted(CONTRACT_TYPES)
HYPOTHESIS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- (1) drift -----------------------------------------------------------------------------
def test_generated_files_are_up_to_date() -> None:
    problems = generate.check()
    assert not problems, (
        "contracts/schemas or contracts/asyncapi.json do not match the models and the catalog:\n  "
        + "\n  ".join(problems)
        + "\nrun `python -m interlock.contracts.generate` and commit the result"
    )


def test_generation_is_deterministic() -> None:
    assert generate.render() == generate.render()


def test_check_reports_stale_missing_and_extra(tmp_path: Any) -> None:
    generate.write(tmp_path)
    assert generate.check(tmp_path) == []
    (tmp_path / "schemas" / "Job.json").write_text("{}\n")
    (tmp_path / "schemas" / "Trigger.json").unlink()
    (tmp_path / "schemas" / "Gone.json").write_text("{}\n")
    assert generate.check(tmp_path) == ["stale: schemas/Job.json", "missing: schemas/Trigger.json",
                                        "extra: schemas/Gone.json"]
    assert generate.main(["--check", "--root", str(tmp_path)]) == 1
    generate.write(tmp_path)
    assert generate.check(tmp_path) == []


# -- (2) AsyncAPI structure ----------------------------------------------------------------
@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return generate.asyncapi()


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"only local references are used, got {ref!r}"
    node: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"unresolvable reference {ref!r}"
        node = node[part]
    return node


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for key, value in node.items() if key != "$ref" for r in _refs(value)]
    if isinstance(node, list):
        return [r for item in node for r in _refs(item)]
    return []


def test_asyncapi_basics(doc: dict[str, Any]) -> None:
    assert doc["asyncapi"] == "3.0.0"
    assert isinstance(doc["info"]["title"], str) and isinstance(doc["info"]["version"], str)
    assert doc["defaultContentType"] == "application/json"
    assert set(doc) <= {"asyncapi", "id", "info", "servers", "defaultContentType", "channels", "operations",
                        "components"} | {k for k in doc if k.startswith("x-")}
    for server in doc["servers"].values():
        assert server["protocol"] == "nats" and server["host"]
    key = re.compile(r"^[a-zA-Z0-9.\-_]+$")
    for section in doc["components"].values():
        assert all(key.match(name) for name in section)


def test_every_reference_resolves(doc: dict[str, Any]) -> None:
    refs = _refs(doc)
    assert refs
    for ref in refs:
        _resolve(doc, ref)
    assert not [r for r in refs if "$defs" in r], "AsyncAPI schemas must point at components, not $defs"


def test_channels_messages_resolve_to_components(doc: dict[str, Any]) -> None:
    for channel_id, channel in doc["channels"].items():
        assert "address" in channel
        assert channel["messages"], channel_id
        for message_ref in channel["messages"].values():
            assert message_ref["$ref"].startswith("#/components/messages/")
            message = _resolve(doc, message_ref["$ref"])
            assert message["payload"]["$ref"].startswith("#/components/schemas/")
            assert _resolve(doc, message["payload"]["$ref"])["type"] == "object"
            if "headers" in message:
                assert message["headers"]["type"] == "object"
        address = channel["address"]
        if address is not None:
            assert set(re.findall(r"\{([^}]+)\}", address)) == set(channel.get("parameters", {})), channel_id


def test_operations_reference_existing_channels(doc: dict[str, Any]) -> None:
    assert doc["operations"]
    for op_id, op in doc["operations"].items():
        assert op["action"] in ("send", "receive"), op_id
        channel_ref = op["channel"]["$ref"]
        assert channel_ref.startswith("#/channels/")
        _resolve(doc, channel_ref)
        for message in op["messages"]:
            assert message["$ref"].startswith(channel_ref + "/messages/"), op_id
            _resolve(doc, message["$ref"])
        if "reply" in op:
            reply_ref = op["reply"]["channel"]["$ref"]
            _resolve(doc, reply_ref)
            for message in op["reply"]["messages"]:
                assert message["$ref"].startswith(reply_ref + "/messages/"), op_id
        assert op["x-interlock-service"] in cat.SERVICES


def test_every_catalog_channel_is_documented_with_both_sides(doc: dict[str, Any]) -> None:
    for ch in cat.CHANNELS:
        channel = doc["channels"][ch.id]
        assert channel["address"] == ch.address
        ops = [op for op in doc["operations"].values() if op["channel"]["$ref"] == f"#/channels/{ch.id}"]
        assert {op["action"] for op in ops} == {"send", "receive"}, ch.id
        assert {op["x-interlock-service"] for op in ops if op["action"] == "send"} == set(ch.publishers)
        assert {op["x-interlock-service"] for op in ops if op["action"] == "receive"} == set(ch.subscribers)
        if ch.transport == "request":
            assert all("reply" in op for op in ops), ch.id
        if ch.transport == "jetstream":
            assert channel["x-interlock"]["stream"] == ch.stream


def test_headers_contract(doc: dict[str, Any]) -> None:
    def header_names(channel_id: str) -> set[str]:
        (ref,) = doc["channels"][channel_id]["messages"].values()
        return set(_resolve(doc, ref["$ref"])["headers"]["required"])

    assert header_names(cat.RUN_EVENTS.id) == {"Nats-Msg-Id", "Nats-Expected-Last-Subject-Sequence",  # literal: pinned
                                               "Nats-Expected-Last-Subject-Sequence-Subject",  # literal: pinned
                                               "Interlock-Signer", "Interlock-Signature"}
    assert "Nats-Msg-Id" in header_names(cat.RESULTS.id)  # literal: pinned
    (commit_ref,) = doc["channels"][cat.RUN_EVENTS.id]["messages"].values()
    commit = _resolve(doc, commit_ref["$ref"])
    assert set(commit["x-interlock-event-data"]) == set(ev.EVENT_TYPES)


def test_worker_protocol_is_documented(doc: dict[str, Any]) -> None:
    text = doc["info"]["description"]
    for needle in ("run_id:step_id@attempt", "worker_", s.JOBS_STREAM, cat.JOBS.address, cat.HEARTBEATS.address,
                   cat.RESULTS.address, "heartbeat_interval_ms", "result:", "Nats-Msg-Id",  # literal: pinned
                   "Nats-Expected-Last-Subject-Sequence",  # literal: pinned
                   s.PAYLOADS_OBJECT_STORE, "PayloadRef", "prev_hash",
                   "sha256", s.AGENTS_BUCKET):
        assert needle in text, needle
    assert doc["x-interlock-key-value"][s.AGENTS_BUCKET]["value"] == {
        "$ref": "#/components/schemas/AgentRegistration"}


def test_schema_files_are_valid_draft_2020_12() -> None:
    for name, schema in generate.json_schemas().items():
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert schema["title"] == name and schema["$id"].endswith(name)


# -- (3) round trip and schema validation --------------------------------------------------
FORMATS = jsonschema.FormatChecker()
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


@FORMATS.checks("date-time")
def _is_rfc3339(value: object) -> bool:
    return not isinstance(value, str) or bool(_RFC3339.match(value))


@cache
def validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(generate.json_schema(CONTRACT_TYPES[name]), format_checker=FORMATS)


TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
JSON_INTS = st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | JSON_INTS | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
# Services write aware (UTC) times; a fixed offset must survive too.
DATETIMES = st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]),
)


def strategy_for(annotation: Any, metadata: list[Any]) -> st.SearchStrategy[Any]:
    """A strategy of JSON-safe values for one field type and its pydantic constraints."""
    bounds: dict[str, int] = {}
    for constraint in metadata:
        if isinstance(constraint, annotated_types.Ge):
            bounds["min_value"] = int(constraint.ge)  # type: ignore[call-overload]
        elif isinstance(constraint, annotated_types.Le):
            bounds["max_value"] = int(constraint.le)  # type: ignore[call-overload]
        elif isinstance(constraint, annotated_types.MinLen):
            bounds["min_size"] = constraint.min_length
        elif isinstance(constraint, annotated_types.MaxLen):
            bounds["max_size"] = constraint.max_length
        else:
            raise TypeError(f"no strategy for constraint {constraint!r}: extend strategy_for in this test")
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is Any:
        return JSON_VALUES
    if annotation is type(None):
        return st.none()
    if origin in (Union, types.UnionType):
        return st.one_of([strategy_for(arg, metadata) for arg in args])
    if origin is Literal:
        return st.sampled_from(args)
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return st.integers(min_value=bounds.get("min_value", -(2**53) + 1),
                           max_value=bounds.get("max_value", 2**53 - 1))
    if annotation is float:  # finite: JSON has no NaN or infinity
        return st.floats(min_value=bounds.get("min_value", -1e12), max_value=bounds.get("max_value", 1e12),
                         allow_nan=False, allow_infinity=False)
    if annotation is str:
        return st.text(st.characters(codec="utf-8"), min_size=bounds.get("min_size", 0),
                       max_size=bounds.get("max_size", 12))
    if annotation is datetime:
        return DATETIMES
    if origin is list:
        return st.lists(strategy_for(args[0], []), min_size=bounds.get("min_size", 0),
                        max_size=max(bounds.get("min_size", 0), 3))
    if origin is dict and args[0] is str:
        return st.dictionaries(TEXT, strategy_for(args[1], []), max_size=3)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return model_strategy(annotation)
    raise TypeError(f"no strategy for {annotation!r}: extend strategy_for in this test")


@st.composite
def _envelopes(draw: st.DrawFn) -> ev.EventEnvelope:
    """An envelope whose data is a valid instance of the event type it names."""
    type_name, data_type = draw(st.sampled_from(sorted(ev.EVENT_TYPES.items())))
    data = draw(model_strategy(data_type)).model_dump(mode="json")
    envelope = draw(_fields_strategy(ev.EventEnvelope))
    return envelope.model_copy(update={"type": type_name, "data": data})


def _fields_strategy(model: type[BaseModel]) -> st.SearchStrategy[Any]:
    fields = {name: strategy_for(info.annotation, info.metadata) for name, info in model.model_fields.items()}
    return st.builds(model, **fields)


@cache
def model_strategy(model: type[BaseModel]) -> st.SearchStrategy[Any]:
    if model is ev.EventEnvelope:
        return _envelopes()
    return _fields_strategy(model)


@pytest.mark.parametrize("name", NAMES)
@HYPOTHESIS
@given(data=st.data())
def test_round_trip_and_schema(name: str, data: st.DataObject) -> None:
    model = CONTRACT_TYPES[name]
    instance = data.draw(model_strategy(model))
    raw = instance.model_dump_json()
    assert model.model_validate_json(raw) == instance
    decoded = json.loads(raw)
    validator(name).validate(decoded)
    envelopes = decoded["events"] if name == "Commit" else [decoded] if name == "EventEnvelope" else []
    for envelope in envelopes:
        validator(envelope["type"]).validate(envelope["data"])


# -- (4) evolution -------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@HYPOTHESIS
@given(data=st.data())
def test_unknown_fields_are_ignored(name: str, data: st.DataObject) -> None:
    model = CONTRACT_TYPES[name]
    instance = data.draw(model_strategy(model))
    raw = instance.model_dump(mode="json")
    raw["added_in_a_later_version"] = {"anything": [1, "two", None]}
    assert model.model_validate_json(json.dumps(raw)) == instance
    validator(name).validate(raw)


# Fields a message can't be sent without. A field added later must have a default, so an older
# producer's message still decodes: adding a name here is a breaking change to the wire contract.
REQUIRED_FIELDS: dict[str, set[str]] = {
    "AgentRegistration": {"worker_id", "topic", "started_at", "last_heartbeat"},
    "GateHolder": {"tenant", "run_id", "step_id", "at"},
    "GateScope": set(),
    "GateWaiter": {"tenant", "run_id", "step_id", "since"},
    "GateQueued": {"job", "limit", "waiter"},
    "ApiKeyRecord": {"key_id", "tenant", "role", "principal", "sha256", "created_at"},
    "ApprovalDecision": {"run_id", "step_id", "job_hash", "role"},  # approver: the command subject's principal
    # new types (signed approvals): what a signature covers is all required
    "ApprovalStatement": {"tenant", "run_id", "step_id", "job_hash", "snapshot_id", "decision", "principal", "role",
                          "at"},
    "SignedApproval": {"statement", "key_id", "signature"},
    "ApprovalExpired": {"step_id", "job_hash"},
    "ApprovalInvalidated": {"step_id", "job_hash", "reason"},
    "ApprovalEscalated": {"step_id", "job_hash", "from_role", "to_role"},
    "RunAdmitted": {"snapshot_id"},
    "ApprovalGranted": {"step_id", "job_hash", "approver", "role"},
    "ApprovalRejected": {"step_id", "job_hash", "approver", "role"},
    "ApprovalRefused": {"step_id", "principal", "role", "job_hash", "reason"},
    "ApprovalRequested": {"step_id", "job_hash", "snapshot_id", "approver_role"},
    "CancelNotice": {"run_id", "tenant"},
    "CancelRequest": {"run_id"},
    "CommandReply": {"ok"},
    "Commit": {"run_id", "tenant", "events"},
    "CompensationFinished": {"ok"},
    "CompensationStarted": {"failed_step", "steps"},
    "DeadLetter": {"service", "subject", "reason", "data_b64", "at"},
    "DeadLetterAction": {"action", "by", "at"},
    "DeadLetterStatus": {"seq", "status"},
    "EventEnvelope": {"run_id", "tenant", "seq", "type", "at", "service", "data", "prev_hash", "hash"},
    "Heartbeat": {"job_id", "run_id", "tenant", "step_id", "attempt"},
    "Job": {"job_id", "run_id", "tenant", "workflow_id", "step_id", "topic", "attempt", "idempotency_key",
            "job_hash"},
    "JobError": {"message"},
    "JobResult": {"job_id", "run_id", "tenant", "step_id", "attempt", "ok"},
    "LateResultRecorded": {"step_id", "attempt", "ok"},
    "GuardChecked": {"step_id", "attempt", "check", "verdict"},
    "Notification": {"run_id", "tenant", "workflow_id", "step_id", "channel", "message"},
    "PayloadRef": {"object_store", "key", "sha256", "size"},
    "PolicyDecided": {"step_id", "decision", "snapshot_id", "job_hash"},
    "QueryReply": {"ok"},
    "RetryScheduled": {"step_id", "attempt", "due_at", "delay_ms"},
    "RunCancelled": set(),
    "RunDenied": {"step_id", "reason"},
    "RunFailed": {"reason"},
    "RunQuery": {"run_id"},
    "RunStarted": {"workflow_id", "workflow_version", "definition_hash", "idempotency_key", "tenant"},
    "RunSucceeded": set(),
    "RunTimedOut": {"timeout_ms"},
    "RunsQuery": set(),
    "UsageQuery": set(),
    "FailuresQuery": {"workflow_id"},
    "SchedulesQuery": set(),
    "SchedulesReply": {"ok"},
    "ScheduleRow": {"workflow_id", "workflow_version", "tenant", "timezone", "missed", "next_tick", "armed"},
    "ScheduleTimer": {"tenant", "workflow_id", "workflow_version", "schedule_hash", "tick"},
    "UsageTotals": {"calls", "input_tokens", "output_tokens", "cost_usd"},
    "Alert": {"alert_id", "rule", "state", "tenant", "summary", "at"},
    "LlmCall": {"provider", "model"},
    "BudgetExceeded": {"limit", "allowed", "spent"},
    "StepDispatched": {"step_id", "attempt", "job_id", "topic"},
    "StepThrottled": {"step_id", "attempt", "scope"},
    "StepExpanded": {"step_id", "count"},
    "StepFailed": {"step_id", "attempt", "error", "final"},
    "StepHeartbeat": {"step_id", "attempt"},
    "StepReady": {"step_id", "job_hash"},
    "StepSkipped": {"step_id", "reason"},
    "StepCacheHit": {"step_id", "job_hash", "cache_key", "source_run_id", "source_step_id"},
    "StepSucceeded": {"step_id", "attempt"},
    "StepTimedOut": {"step_id", "attempt"},
    "TimerFired": {"kind", "run_id", "tenant", "due_at"},
    "Trigger": {"workflow_id", "idempotency_key"},
    # published by nats-server (the JetStream API audit and stream action advisories), not by Interlock
    "JsApiAudit": {"type", "id", "timestamp", "server", "subject"},
    "ApiAuditClient": set(),
    "JsStreamAction": {"type", "id", "timestamp", "stream", "action"},
    # the auditor's record of an API audit advisory (il.admin.audit)
    "AdminAuditRecord": {"type", "id", "timestamp", "server", "subject"},
    "AdvisoryTruncation": {"size", "sha256"},
    # query results (the auditor's projection) and the typed query replies
    "RunSummary": {"run_id", "tenant", "status", "last_seq", "events", "head_hash", "chain_ok"},
    "RunStatus": {"run_id", "tenant", "status", "last_seq", "events", "head_hash", "chain_ok"},
    "StepAttempt": {"attempt"},
    "StepDecision": set(),
    "StepApproval": {"status", "seq"},
    "StepStatus": {"step_id", "status", "attempt", "attempts"},
    "TimelineEntry": {"seq", "summary"},
    "PendingApproval": {"run_id", "tenant", "step_id", "seq"},
    "RunsReply": {"ok"},
    "StatusReply": {"ok"},
    "TimelineReply": {"ok"},
    "ApprovalsReply": {"ok"},
    "UsageReply": {"ok"},
    "FailuresReply": {"ok"},
    "FailedRun": {"run_id"},
    # the result cache (bucket il_cache)
    "CacheEntry": {"tenant", "workflow_id", "step_id", "run_id", "source_step_id", "job_hash", "cache_key",
                   "stored_at", "expires_at"},
    "UsageRow": {"key", "runs", "calls", "input_tokens", "output_tokens", "cost_usd"},
    # the auditor's seals (il.seal.{stream}): every field is signed, so none may be left out
    "Seal": {"number", "stream", "created", "first_seq", "last_seq", "messages", "runs", "heads_root", "heads",
             "sealed_at", "prev", "reason", "signer", "signature"},
    "SealHead": {"subject", "stream_seq", "seq", "hash"},
    # issue 17: a person's interventions (who, why) and feedback, and their commands and query
    "RunResumed": {"by", "reason", "steps"},
    "StepRetryRequested": {"by", "reason", "step_id", "attempt", "job_hash"},
    "StepOutputSupplied": {"by", "reason", "step_id", "output_hash"},
    "RunPaused": {"by", "reason"},
    "RunUnpaused": {"by", "reason"},
    "FeedbackGiven": {"step_id", "by", "output_hash"},
    "Intervention": {"run_id", "reason"},
    "RetryStepRequest": {"run_id", "reason", "step_id"},
    "SkipStepRequest": {"run_id", "reason", "step_id"},
    "RunControlRequest": {"run_id", "reason"},
    "FeedbackRequest": {"run_id", "step_id"},
    "FeedbackQuery": set(),
    "FeedbackRow": {"run_id", "seq", "step_id", "output_hash", "by"},
    "FeedbackReply": {"ok"},
    # workload control (issue 16): KV values written and read by the dispatchers and the client
    "BreakerOutcome": {"job_id", "ok", "at"},
    "BreakerState": {"tenant", "topic"},
    "BreakerChange": {"tenant", "topic", "seq", "from_state", "to_state", "at"},
    "RolloutStats": {"version"},
    "Rollout": {"tenant", "topic", "stable", "canary", "share", "started_at", "canary_stats", "stable_stats"},
    "StepHeld": {"step_id", "attempt", "topic", "reason"},
}


def test_pinned_required_fields_cover_every_contract() -> None:
    assert set(REQUIRED_FIELDS) == set(CONTRACT_TYPES), "pin the required fields of new contract types here"


@pytest.mark.parametrize("name", NAMES)
def test_new_fields_have_defaults(name: str) -> None:
    model = CONTRACT_TYPES[name]
    required = {field for field, info in model.model_fields.items() if info.is_required()}
    added = required - REQUIRED_FIELDS[name]
    assert not added, f"{name}: new field(s) {sorted(added)} need a default (older producers don't send them)"
    relaxed = REQUIRED_FIELDS[name] - required
    assert not relaxed, f"{name}: {sorted(relaxed)} are no longer required: update REQUIRED_FIELDS"
    assert set(generate.json_schema(model).get("required", [])) == required


def test_dead_letter_size_hash_and_truncation_are_optional() -> None:
    # an older producer's dead letter (the whole original, no size or hash) still decodes
    model = CONTRACT_TYPES["DeadLetter"]
    old = DeadLetter.model_validate({"service": "planner", "subject": s.trigger("acme", "wf"), "reason": "r",
                                     "data_b64": "", "at": "2026-01-01T00:00:00Z"})
    assert (old.size, old.sha256, old.truncated) == (None, None, False)
    assert {"size", "sha256", "truncated"} <= set(generate.json_schema(model)["properties"])


@pytest.mark.parametrize("name", NAMES)
def test_models_tolerate_unknown_fields(name: str) -> None:
    model = CONTRACT_TYPES[name]
    assert model.model_config.get("extra") == "ignore"
    assert generate.json_schema(model).get("additionalProperties") is not False


# -- (5) subjects and catalog --------------------------------------------------------------
def _subject_builders() -> dict[str, Any]:
    """Public functions of ``subjects`` that build a subject (return 'il.…' for sample tokens)."""
    found = {}
    for name, fn in inspect.getmembers(s, inspect.isfunction):
        if fn.__module__ != s.__name__ or name.startswith("_"):
            continue
        try:
            out = fn(*["x"] * len(inspect.signature(fn).parameters))
        except s.SubjectError:
            continue
        if isinstance(out, str) and out.startswith(s.PREFIX + "."):
            found[name] = fn
    return found


def test_every_subject_function_has_a_channel() -> None:
    builders = _subject_builders()
    assert {"commit_subject", "job", "result", "heartbeat", "control_cancel"} <= set(builders)
    # names of a run's log (statements, seals) and its read filter, not subjects anything is sent on
    builders = {k: v for k, v in builders.items() if k not in ("run_events", "run_log")}
    covered = {ch.pattern.build for ch in cat.CHANNELS}
    covered |= {f.build for ch in cat.CHANNELS for f in ch.filters if isinstance(f, cat.Pattern)}
    missing = sorted(name for name, fn in builders.items() if fn not in covered)
    assert not missing, f"subjects.{missing} not used by any channel in interlock.contracts.catalog"


def test_every_wildcard_has_a_channel() -> None:
    filters = {f for ch in cat.CHANNELS for f in ch.filters if isinstance(f, str)}
    wildcards = {value for name, value in vars(s).items() if name.endswith("_ALL")}
    assert wildcards <= filters, sorted(wildcards - filters)


COMMANDS = ("approve", "reject", "cancel", "retry", "skip", "resume", "pause", "unpause", "feedback")
QUERIES = ("runs", "status", "timeline", "approvals", "usage", "failures", "schedules", "feedback")


def test_commands_and_queries_carry_the_tenant_and_the_principal() -> None:
    requests = [ch for ch in cat.CHANNELS if ch.transport == "request"]
    assert sorted(ch.address for ch in requests) == sorted(
        [f"{s.PREFIX}.cmd.{{tenant}}.{n}.{{principal}}" for n in COMMANDS]
        + [f"{s.PREFIX}.q.{{tenant}}.{n}" for n in QUERIES])
    # each service subscribes to every tenant's and principal's requests, one wildcard per name
    assert {f.address for ch in requests for f in ch.filters if isinstance(f, cat.Pattern)} == {
        *(s.commands(n) for n in COMMANDS), *(s.queries(n) for n in QUERIES)}
    assert s.commands("approve") == s.PREFIX + ".cmd.*.approve.*" and s.queries("runs") == s.PREFIX + ".q.*.runs"


def test_channel_patterns_build_the_subjects_they_document() -> None:
    for ch in cat.CHANNELS:
        values = {p.name: f"v{i}" for i, p in enumerate(ch.parameters)}
        if "topic" in values:
            values["topic"] = "llm.summarize"
        assert ch.pattern.subject(**values) == ch.address.format(**values)
        for f in ch.filters:
            if isinstance(f, cat.Pattern):
                assert f.address.split(".")[:2] == ch.address.split(".")[:2]
    assert cat.JOBS.address == "il.job.{tenant}.{topic}"  # literal: pinned
    assert cat.TRIGGERS.address == "il.trigger.{tenant}.{workflow_id}"  # literal: pinned
    assert s.worker_consumer("acme", "llm.summarize") == "worker_acme_llm_summarize_2fdb7602a983efe0"


def test_channel_ids_are_unique_and_roles_known() -> None:
    ids = [ch.id for ch in cat.CHANNELS]
    assert len(ids) == len(set(ids))
    for ch in cat.CHANNELS:
        assert set(ch.publishers) | set(ch.subscribers) <= set(cat.SERVICES), ch.id


def test_every_message_type_is_reachable_from_the_catalog(doc: dict[str, Any]) -> None:
    """Each message type travels on a channel, is nested in one that does, or lives in KV/object store."""
    reachable = {ref.rsplit("/", 1)[1] for ref in _refs(doc) if ref.startswith("#/components/schemas/")}
    for component in doc["components"]["schemas"].values():
        reachable |= {ref.rsplit("/", 1)[1] for ref in _refs(component)}
    # a base type (QueryReply: the shape every typed query reply refines) is reached through its subclasses
    reachable |= {base.__name__ for name in list(reachable) if name in cat.MESSAGE_TYPES
                  for base in cat.MESSAGE_TYPES[name].__mro__}
    assert set(cat.MESSAGE_TYPES) <= reachable, sorted(set(cat.MESSAGE_TYPES) - reachable)
