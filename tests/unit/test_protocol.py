"""The protocol constants of contracts/: what the code uses is what the contract documents."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from interlock.contracts import generate, protocol
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
    letter = deadletter.letter_for("worker", "il.x", b"x" * (protocol.DEAD_LETTER_PREFIX_LIMIT + 1), "r" * 5000)
    assert letter.truncated and len(letter.reason) == protocol.DEAD_LETTER_REASON_LIMIT


def test_worker_consumer_settings_are_jetstream_fields() -> None:
    cfg = protocol.WORKER_CONSUMER.as_jetstream()
    assert cfg == {"ack_policy": "explicit", "ack_wait": int(protocol.WORKER_CONSUMER.ack_wait_s * 1e9),
                   "max_ack_pending": protocol.WORKER_CONSUMER.max_ack_pending, "max_deliver": -1,
                   "deliver_policy": "all"}


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
