"""Encoding run events to and from their stored form, and the hash chain over them."""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec

from interlock.contracts import events as ev
from interlock.core.run import Run

_json_decoder = msgspec.json.Decoder()


def canonical_json(value: Any) -> bytes:
    """UTF-8 JSON with keys sorted and no whitespace: the form every hash is taken over."""
    return msgspec.json.encode(value, order="sorted")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def event_hash(envelope: dict[str, Any]) -> str:
    """The hash of one stored event: sha256 of its canonical JSON without the ``hash`` field."""
    body = {k: v for k, v in envelope.items() if k != "hash"}
    return sha256_hex(canonical_json(body))


def job_hash(*, workflow_id: str, workflow_version: str, step_id: str, topic: str | None, input: Any) -> str:
    """The identity of a job an approval or policy decision is bound to; equal for every attempt."""
    return sha256_hex(canonical_json({
        "workflow_id": workflow_id, "workflow_version": workflow_version, "step_id": step_id,
        "topic": topic, "input": input,
    }))


def envelope_from_event(event: Any, *, tenant: str, service: str, prev_hash: str) -> dict[str, Any]:
    """Turn an aggregate event into its stored envelope (a plain dict, hash included)."""
    data: ev.EventData = event.data
    data_json = data.model_dump(mode="json")
    for name in data.omit_when_none:
        if data_json.get(name) is None:
            data_json.pop(name, None)
    envelope: dict[str, Any] = {
        "run_id": str(event.originator_id),
        "tenant": tenant,
        "seq": event.originator_version,
        "type": data.type_name,
        "at": event.timestamp.isoformat(),
        "service": service,
        "step_id": data_json.get("step_id"),
        "attempt": data_json.get("attempt"),
        "data": data_json,
        "prev_hash": prev_hash,
    }
    envelope["hash"] = event_hash(envelope)
    return envelope


def encode_commit(run_id: str, tenant: str, envelopes: list[dict[str, Any]]) -> bytes:
    return msgspec.json.encode({"run_id": run_id, "tenant": tenant, "events": envelopes})


def decode_commit_raw(payload: bytes) -> dict[str, Any]:
    """Decode a commit to plain dicts (fast; no validation beyond JSON)."""
    raw = _json_decoder.decode(payload)
    if not isinstance(raw, dict) or not isinstance(raw.get("events"), list) or not raw["events"]:
        raise ValueError("not a commit: expected an object with a non-empty 'events' list")
    return raw


def apply_envelope(run: Run, envelope: dict[str, Any]) -> None:
    """Replay one stored event onto a run: what ``event_from_envelope(e).mutate(run)`` does,
    without building the intermediate event object (replay is the hot path of every load).
    The caller has checked that the event is the run's next one."""
    data_cls = ev.EVENT_TYPES.get(envelope["type"])
    if data_cls is None:
        raise ValueError(f"unknown event type {envelope['type']!r} at seq {envelope.get('seq')}")
    at = datetime.fromisoformat(envelope["at"])
    run._when(data_cls.model_validate(envelope["data"]), at)
    run.version = envelope["seq"]
    run.modified_on = at


def event_from_envelope(envelope: dict[str, Any]) -> Any:
    """Rebuild the aggregate event an envelope stores."""
    type_name = envelope["type"]
    data_cls = ev.EVENT_TYPES.get(type_name)
    if data_cls is None:
        raise ValueError(f"unknown event type {type_name!r} at seq {envelope.get('seq')}")
    event_cls = Run.EVENT_CLASSES[type_name]
    kwargs: dict[str, Any] = {
        "originator_id": UUID(envelope["run_id"]),
        "originator_version": envelope["seq"],
        "timestamp": datetime.fromisoformat(envelope["at"]),
        "data": data_cls.model_validate(envelope["data"]),
    }
    if data_cls is ev.RunStarted:
        kwargs["originator_topic"] = f"{Run.__module__}:{Run.__qualname__}"
    return event_cls(**kwargs)
