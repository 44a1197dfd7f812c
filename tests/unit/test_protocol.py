"""The protocol constants of contracts/: what the code uses is what the contract documents."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from interlock.contracts import generate, protocol, timing
from interlock.contracts import subjects as s
from interlock.core import ids, topology
from interlock.runtime import deadletter, payloads
from interlock.worker import _worker

CONTRACTS = Path(generate.CONTRACTS_DIR)


def test_run_id_is_uuid5_of_the_documented_namespace_and_name() -> None:
    table = json.loads((CONTRACTS / "asyncapi.json").read_text())["x-interlock-protocol"]["run_id"]
    example = table["example"]
    name = table["name"].format(**{k: example[k] for k in ("tenant", "workflow_id", "idempotency_key")})
    # computed from the document alone, as a client in another language would
    assert str(uuid.uuid5(uuid.UUID(table["uuid5_namespace"]), name)) == example["run_id"]
    assert str(ids.run_id_for(example["tenant"], example["workflow_id"], example["idempotency_key"])) \
        == example["run_id"]
    assert str(ids.run_id_for("acme", "wf", "k")) == str(uuid.uuid5(protocol.RUN_ID_NAMESPACE, "acme/wf/k"))


def test_the_code_uses_the_documented_values() -> None:
    assert payloads.DEFAULT_INLINE_LIMIT == protocol.INLINE_LIMIT_BYTES
    assert deadletter.DATA_PREFIX_LIMIT == protocol.DEAD_LETTER_PREFIX_LIMIT
    assert deadletter.HEADERS_LIMIT == protocol.DEAD_LETTER_HEADERS_LIMIT
    assert _worker.REGISTRY_REFRESH_S == protocol.REGISTRY_REFRESH_S
    agents = next(b for b in topology.BUCKETS if b.name == s.AGENTS_BUCKET)
    assert agents.ttl == protocol.REGISTRY_TTL_S
    assert protocol.REGISTRY_STALE_AFTER_S > protocol.REGISTRY_REFRESH_S
    letter = deadletter.letter_for("worker", s.job("default", "x"), b"x" * (protocol.DEAD_LETTER_PREFIX_LIMIT + 1),
                                   "r" * 5000)
    assert letter.truncated and len(letter.reason) == protocol.DEAD_LETTER_REASON_LIMIT


def test_worker_consumer_settings_are_jetstream_fields() -> None:
    cfg = protocol.WORKER_CONSUMER.as_jetstream()
    assert cfg == {"ack_policy": "explicit", "ack_wait": int(timing.ACK_WAIT_S * 1e9),
                   "max_ack_pending": protocol.WORKER_CONSUMER.max_ack_pending, "max_deliver": timing.JOB_MAX_DELIVER,
                   "deliver_policy": "all"}
    assert cfg["ack_wait"] == 1_500_000_000, "the ack wait a dead worker's job comes back within (contracts/timing.py)"


def test_readme_table_is_generated_and_checked(tmp_path: Path) -> None:
    readme = (CONTRACTS / "README.md").read_text()
    assert generate.protocol_table() in readme, "run `python -m interlock.contracts.generate`"
    generate.write(tmp_path)
    (tmp_path / "README.md").write_text(readme.replace(generate.protocol_table(),
                                                       f"{generate.TABLE_BEGIN}\n| old |\n{generate.TABLE_END}"))
    assert generate.check(tmp_path) == ["stale: README.md"]
    generate.write(tmp_path)
    assert generate.check(tmp_path) == [] and generate.protocol_table() in (tmp_path / "README.md").read_text()
    (tmp_path / "README.md").write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        generate.check(tmp_path)


# Each thing a worker written in another language had to guess (issue 14), and where
# contracts/README.md now says it.
DOCUMENTED = {
    "consumer settings": ["worker_consumer", "ack_wait", "max_ack_pending",
                          f"{s.JS_API_PREFIX}.CONSUMER.CREATE.{s.JOBS_STREAM}"],
    "heartbeat publication": ["**JetStream** publish", "**no** `Nats-Msg-Id`", "heartbeat_interval_ms"],
    "input/output and null": ["any JSON value", "`null` is a real value"],
    "inline limit and output_ref": ["inline_limit_bytes", "output_ref"],
    "worker id": ["Worker id", "`worker` field"],
    "registry": ["registry.refresh_s", "registry.stale_after_s", "registry.ttl_s", "Clean shutdown"],
    "after a deadline": ['"kind": "timeout"'],
    "dead letters": [s.dead_letter("worker"), "dead_letter.prefix_limit_bytes", "truncated"],
    "query results": ["RunsReply", "StatusReply", "TimelineReply", "ApprovalsReply"],
    "run id": ["uuid5", "run_id.uuid5_namespace", "{tenant}/{workflow_id}/{idempotency_key}", "gets no reply"],
    "run by idempotency key, timeline paging (api)": ["Finding a run by idempotency key", "`idempotency_key` set",
                                                      "Timeline paging", "`after_seq`"],
    "finding the server": ["INTERLOCK_NATS_URL", ".interlock/nats.url", "INTERLOCK_CREDS", "_INBOX.{user public key}",
                           "INTERLOCK_TLS_CA"],
}


@pytest.mark.parametrize("point", sorted(DOCUMENTED))
def test_readme_specifies_what_a_foreign_worker_needs(point: str) -> None:
    readme = (CONTRACTS / "README.md").read_text()
    missing = [needle for needle in DOCUMENTED[point] if needle not in readme]
    assert not missing, f"contracts/README.md does not say ({point}): {missing}"


def test_schemas_allow_null_and_any_json_for_input_and_output() -> None:
    import jsonschema

    job = json.loads((CONTRACTS / "schemas" / "Job.json").read_text())
    result = json.loads((CONTRACTS / "schemas" / "JobResult.json").read_text())
    base = {"job_id": "r:s@1", "run_id": "r", "tenant": "t", "step_id": "s", "attempt": 1}
    for value in (None, 1, "x", [1, None], {"a": {"b": None}}, True):
        jsonschema.validate({**base, "workflow_id": "w", "topic": "a.b", "idempotency_key": "r:s", "job_hash": "h",
                             "input": value}, job)
        jsonschema.validate({**base, "ok": True, "output": value}, result)
    for schema, field in ((job, "input"), (result, "output")):
        assert "null" in schema["properties"][field]["description"]
