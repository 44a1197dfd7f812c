"""Generate the language-neutral contracts: JSON Schema files and one AsyncAPI 3.0 document.

- ``contracts/schemas/<Name>.json``: one JSON Schema (draft 2020-12) per message type and per run
  event data type, straight from the pydantic models (``model_json_schema(mode="validation")``)
  with ``$schema``, ``$id`` and ``title`` added.
- ``contracts/asyncapi.json``: every channel of :mod:`interlock.contracts.catalog` with its
  messages, operations (who sends, who receives), headers, and the protocol rules in
  ``info.description``.

Run ``python -m interlock.contracts.generate`` to write them, ``--check`` to only compare (exit 1 and
list stale, missing or extra files). Output is deterministic: sorted keys, indent 2, final newline.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from interlock.contracts import catalog as cat
from interlock.contracts import events as ev
from interlock.contracts import permissions as p
from interlock.contracts import protocol, timing
from interlock.contracts import subjects as s

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_ID_BASE = "urn:interlock:schema:"
CONTRACTS_DIR = Path(__file__).resolve().parents[2]
SCHEMAS_SUBDIR = "schemas"
ASYNCAPI_FILE = "asyncapi.json"
ASYNCAPI_VERSION = "3.0.0"

_SUMMARY = "Generate contracts/schemas/*.json and contracts/asyncapi.json from the pydantic contracts."
_DEFS_REF = "#/$defs/"
_COMPONENT_SCHEMA_REF = "#/components/schemas/"

JsonObject = dict[str, Any]


# -- JSON Schema ---------------------------------------------------------------------------
def schema_id(name: str) -> str:
    return SCHEMA_ID_BASE + name


def json_schema(model: type[BaseModel]) -> JsonObject:
    """The standalone JSON Schema of one model: self-contained (nested types under ``$defs``)."""
    name = model.__name__
    schema: JsonObject = {
        "$schema": SCHEMA_DIALECT,
        "$id": schema_id(name),
        **model.model_json_schema(mode="validation"),
    }
    schema["title"] = name
    return schema


def contract_types() -> dict[str, type[BaseModel]]:
    """Every type that gets a schema file: message types and event data types, by name."""
    types: dict[str, type[BaseModel]] = {}
    for name, model in [*cat.MESSAGE_TYPES.items(), *cat.EVENT_DATA_TYPES.items()]:
        if name in types and types[name] is not model:
            raise ValueError(f"two contract types are named {name!r}")
        types[name] = model
    return dict(sorted(types.items()))


def json_schemas() -> dict[str, JsonObject]:
    """Name -> standalone JSON Schema, for every message type and event data type."""
    return {name: json_schema(model) for name, model in contract_types().items()}


# -- AsyncAPI ------------------------------------------------------------------------------
def _rewrite_refs(node: Any) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith(_DEFS_REF):
                value = _COMPONENT_SCHEMA_REF + value[len(_DEFS_REF):]
            out[key] = _rewrite_refs(value)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(item) for item in node]
    return node


def component_schemas(schemas: dict[str, JsonObject]) -> dict[str, JsonObject]:
    """The standalone schemas as AsyncAPI components: ``$defs`` hoisted, refs pointed at components."""
    components: dict[str, JsonObject] = {}

    def put(name: str, schema: JsonObject) -> None:
        schema = _rewrite_refs({k: v for k, v in schema.items() if k not in ("$schema", "$id", "$defs")})
        if name in components and components[name] != schema:
            raise ValueError(f"schema {name!r} differs between its own model and where it is nested")
        components[name] = schema

    for name, schema in schemas.items():
        put(name, schema)
    for schema in schemas.values():
        for def_name, definition in schema.get("$defs", {}).items():
            put(def_name, definition)
    return dict(sorted(components.items()))


def _ref(*path: str) -> JsonObject:
    return {"$ref": "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in path)}


def _headers_schema(headers: Sequence[cat.Header]) -> JsonObject:
    properties: JsonObject = {}
    for header in headers:
        prop: JsonObject = {"type": "string", "description": header.description}
        if header.example is not None:
            prop["examples"] = [header.example]
        properties[header.name] = prop
    schema: JsonObject = {"type": "object", "properties": properties}
    required = [h.name for h in headers if h.required]
    if required:
        schema["required"] = required
    return schema


def _message(model: type[BaseModel], schema: JsonObject, channel: cat.Channel | None) -> JsonObject:
    name = model.__name__
    message: JsonObject = {
        "name": name,
        "title": name,
        "contentType": "application/json",
        "payload": _ref("components", "schemas", name),
    }
    if "description" in schema:
        message["summary"] = schema["description"].splitlines()[0]
        message["description"] = schema["description"]
    if channel is not None and channel.headers:
        message["headers"] = _headers_schema(channel.headers)
    if channel is not None and channel.event_data:
        message["x-interlock-event-data"] = {
            type_name: _ref("components", "schemas", data.__name__)
            for type_name, data in sorted(channel.event_data.items())
        }
    return message


def _channel_extension(ch: cat.Channel) -> JsonObject:
    ext: JsonObject = {
        "transport": ch.transport,
        "publishers": list(ch.publishers),
        "subscribers": list(ch.subscribers),
    }
    if ch.stream is not None:
        ext["stream"] = ch.stream
    if ch.filters:
        ext["filters"] = [f if isinstance(f, str) else f.address for f in ch.filters]
    if ch.consumer is not None:
        ext["consumer"] = ch.consumer
    return ext


def _reply_channel_id(ch: cat.Channel) -> str:
    return ch.id + "Reply"


def _operation_id(ch: cat.Channel, service: str, action: str) -> str:
    return f"{ch.id}_{service.replace('-', '_')}_{action}"


def asyncapi(schemas: dict[str, JsonObject] | None = None) -> JsonObject:
    """The AsyncAPI 3.0.0 document of every channel in the catalog."""
    schemas = json_schemas() if schemas is None else schemas
    components = component_schemas(schemas)
    messages: dict[str, JsonObject] = {}
    channels: dict[str, JsonObject] = {}
    operations: dict[str, JsonObject] = {}
    uses = Counter(m.__name__ for ch in cat.CHANNELS for m in (ch.message, ch.reply) if m is not None)

    def add_message(model: type[BaseModel], channel: cat.Channel | None) -> str:
        """The component key of the message: its type name, or '<channel id>.<type name>' where the
        same type travels with different headers on another channel."""
        name = model.__name__
        message = _message(model, components[name], channel)
        key = name
        if channel is not None and uses[name] > 1 and (channel.headers or channel.event_data):
            key = f"{channel.id}.{name}"
        if key in messages and messages[key] != message:
            raise ValueError(f"message {key!r} differs between channels")
        messages[key] = message
        return key

    for ch in cat.CHANNELS:
        if ch.id in channels:
            raise ValueError(f"duplicate channel id {ch.id!r}")
        name = add_message(ch.message, ch)
        channel: JsonObject = {
            "address": ch.address,
            "title": ch.title,
            "description": ch.description,
            "messages": {name: _ref("components", "messages", name)},
            "x-interlock": _channel_extension(ch),
        }
        if ch.parameters:
            channel["parameters"] = {p.name: {"description": p.description} for p in ch.parameters}
        channels[ch.id] = channel

        reply: JsonObject | None = None
        if ch.reply is not None:
            reply_name = add_message(ch.reply, None)
            reply_id = _reply_channel_id(ch)
            channels[reply_id] = {
                "address": None,
                "title": f"{ch.title} reply",
                "description": f"The requester's inbox: the reply subject NATS sets on a request to {ch.address}.",
                "messages": {reply_name: _ref("components", "messages", reply_name)},
            }
            reply = {
                "channel": _ref("channels", reply_id),
                "messages": [_ref("channels", reply_id, "messages", reply_name)],
            }

        for action, services in (("send", ch.publishers), ("receive", ch.subscribers)):
            for service in services:
                verb = {"send": "publishes to", "receive": "subscribes to"}[action]
                if ch.transport == "request":
                    verb = {"send": "sends requests to", "receive": "answers requests on"}[action]
                operation: JsonObject = {
                    "action": action,
                    "channel": _ref("channels", ch.id),
                    "messages": [_ref("channels", ch.id, "messages", name)],
                    "title": f"{service}: {ch.title}",
                    "summary": f"{service} {verb} {ch.address}",
                    "tags": [{"name": service}],
                    "x-interlock-service": service,
                }
                if reply is not None:
                    operation["reply"] = copy.deepcopy(reply)
                operations[_operation_id(ch, service, action)] = operation

    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "Interlock",
            "version": cat.CONTRACTS_VERSION,
            "description": info_description(),
        },
        "defaultContentType": "application/json",
        "servers": {
            "nats": {
                "host": "localhost:4222",
                "protocol": "nats",
                "description": "A NATS server (2.12 or newer) with JetStream, provisioned by Interlock.",
            },
        },
        "channels": channels,
        "operations": operations,
        "components": {"schemas": components, "messages": dict(sorted(messages.items()))},
        "x-interlock-services": dict(cat.SERVICES),
        "x-interlock-protocol": protocol.table(),
        "x-interlock-key-value": {
            entry.name: {
                "key": entry.key,
                "value": _ref("components", "schemas", entry.value.__name__),
                "description": entry.description,
                "writers": list(entry.writers),
                "readers": list(entry.readers),
            }
            for entry in cat.KEY_VALUE
        },
        "x-interlock-object-stores": {
            store.name: {
                "key": store.key,
                "reference": _ref("components", "schemas", store.reference.__name__),
                "description": store.description,
            }
            for store in cat.OBJECT_STORES
        },
    }


def info_description() -> str:
    """The protocol rules a worker or client in another language needs, as Markdown."""
    jobs, results, heartbeats = cat.JOBS.address, cat.RESULTS.address, cat.HEARTBEATS.address
    events = cat.RUN_EVENTS.address
    cancels = cat.Pattern(s.tenant_control_cancel, (cat.TENANT,)).address
    return f"""\
Interlock is a durable, auditable workflow orchestrator for AI agents on NATS JetStream. This document
lists every subject (channel), the message on it (JSON, schemas under components.schemas, generated
from the pydantic models), who publishes and who subscribes (operations, tagged with the service), and
how it travels (`x-interlock.transport`: `jetstream` into `x-interlock.stream`, `core` NATS, or `request`
for NATS request-reply whose answer arrives on the requester's inbox).

## Identifiers

- Subject tokens (tenant, run id, workflow id, ...) are letters, digits, `_` and `-`; job topics are
  dot-separated tokens, so `{jobs}` has as many tokens as the topic.
- Job id: `run_id:step_id@attempt`, e.g. `3f0c...:summarize@2`. Attempts count from 1.
  `idempotency_key` (`run_id:step_id`) is the same for every attempt: use it for side effects.
  The item steps of a `for_each` step are named `{{step_id}}-{{index}}`.

## Tenants and principals

Every tenant-owned subject carries the tenant (`{jobs}`, `{cat.TRIGGERS.address}`, `{cat.CMD_APPROVE.address}`,
`{cat.Q_RUNS.address}`, events, results, heartbeats, notifications, cancel notices). A service takes
the tenant of a request, and the principal of a command, from the subject, never from the body: a body
whose (deprecated) `tenant`, `approver` or `by` names another is refused (a trigger is dead-lettered).
Runs started on a workflow's own trigger subjects (`triggers:`) run in tenant `default`.
The approver of a decision is the command subject's principal; a decision by a principal without the
step's role, in another role or for another job hash is refused and recorded as `ApprovalRefused`.

## Evolution

Readers ignore unknown fields, and every field added to a message later has a default, so an older
reader understands a newer message. Send every field a schema lists as required (a required field
may still allow `null`); the others may be omitted and take their default.
Times are RFC 3339 strings with an offset (UTC, `Z`).

## Connecting

Server URL: the one given, else `INTERLOCK_NATS_URL` (comma-separated for a cluster), else the URL
`interlock up` wrote to `.interlock/nats.url`, else `nats://127.0.0.1:4222`; `tls://` or
`INTERLOCK_TLS_CA`/`_CERT`/`_KEY`/`_HOSTNAME` for TLS. Every connection authenticates with a `.creds`
file (user JWT + nkey seed; anonymous connections are refused) and must use the inbox prefix
`{p.INBOX_ROOT}.{{user public key}}` (the seed's public key, the JWT's `sub`): a credential may subscribe to
its own inboxes only, so replies to any other inbox never arrive.

## Identifiers and numbers

`run_id` = uuid5(`x-interlock-protocol.run_id.uuid5_namespace`, UTF-8 name `"{protocol.RUN_ID_NAME_FORMAT}"`,
lower-case hex with dashes): a trigger gets no reply, so a client computes the run id of its own
trigger (a worked example is in `x-interlock-protocol.run_id.example`). `worker_id`: one subject
token, unique per worker process; the `worker` field of heartbeats and results carries it.
`x-interlock-protocol` holds the worker consumer's settings, the inline payload limit, the registry's
refresh, staleness and TTL, and the dead-letter bounds, generated from the code.

## Worker protocol

1. Register: put an `AgentRegistration` into KV bucket `{s.AGENTS_BUCKET}` under key
   `{cat.AGENT_REGISTRY.key}` (one per topic) when you start, rewrite it (new `last_heartbeat`) every
   `registry.refresh_s`, and delete it on a clean shutdown. Readers take an entry older than
   `registry.stale_after_s` as a worker that is gone.
2. A worker serves one tenant. Create (or bind to) the durable pull consumer
   `worker_{{tenant}}_{{topic with '.' replaced by '_'}}_{{digest}}` (digest: the first 16 hex digits of
   sha256 of tenant, a newline and topic) on stream `{s.JOBS_STREAM}` with filter subject `{jobs}`,
   `name` = `durable_name`, and the settings of `x-interlock-protocol.worker_consumer`, through the
   create API whose subject carries the filter (the only one a worker credential may use); an existing
   one with other settings is used as it is. All copies of a worker for one tenant's topic share it.
3. Decode the `Job`. `input` is any JSON value, `null` included; if `input_ref` is set, the input is
   the JSON object `input_ref.key` in object store `{s.PAYLOADS_OBJECT_STORE}` (check `sha256`). Keep
   the job message un-acked while you work on it and send a progress ack (`+WPI`) for it every
   {timing.PROGRESS_INTERVAL_S:g} s; ack it once the result is published (or the run was cancelled). The
   consumer's ack wait is {timing.ACK_WAIT_S:g} s and its max_deliver {timing.JOB_MAX_DELIVER}: a job whose
   worker dies goes to another copy within {timing.ACK_WAIT_S:g} s. (A worker that acks at once still works:
   its dead jobs then come back only through the heartbeat lease.) A job that does not decode, or of
   another tenant, is dead-lettered: JetStream-publish a `DeadLetter` (`service` `worker`, the job's
   `subject`, `reason`, `data_b64` of the original or of its first `dead_letter.prefix_limit_bytes` with
   `truncated`, `size`, `sha256`, `at`) to `{s.dead_letter(cat.WORKER)}`, then ack.
4. JetStream-publish a `Heartbeat` (no `Nats-Msg-Id`) to `{heartbeats}` when you start and then every
   `heartbeat_interval_ms` of the job until its result is acknowledged. A silent job is timed out and
   may be retried as a new attempt. At the job's `deadline`, stop and report `ok: false` with
   `error.kind` `timeout` (retryable). Subscribe to `{cancels}` (core NATS) and stop the jobs of a
   run when a `CancelNotice` for it arrives (their job ids start with `run_id:`); send no result.
5. Publish exactly one `JobResult` (JetStream publish; retry with the same id until acked) to `{results}`
   with header `Nats-Msg-Id: result:<job_id>`, echoing job_id, run_id, tenant, step_id and attempt, and
   `worker`. `ok: true` with `output` (any JSON value, `null` included), or `ok: false` with `error`
   (`retryable: false` stops retries; `kind` is free text such as `error`, `timeout`, `fatal`).
   A result for an attempt that is no longer current is recorded and ignored.
6. Large payloads: an output whose canonical JSON exceeds `inline_limit_bytes` goes into object store
   `{s.PAYLOADS_OBJECT_STORE}` under its sha256 hex digest, and a `PayloadRef` (`object_store`, `key`,
   `sha256`, `size` in bytes) is sent as `output_ref` instead of `output`.
7. Clean shutdown: stop pulling, stop the jobs in hand without results (their leases run out and they
   are retried), delete the registry entries, drain.

## Run events and the hash chain

A run's log is `{events}` on stream `{s.EVENTS_STREAM}` (append-only: delete and purge are denied).
Each message is a `Commit` of one or more `EventEnvelope`s. `seq` counts from 1 without gaps; the
envelope's `data` has the schema named by its `type` (see `x-interlock-event-data` on the `Commit`
message). Every envelope is chained to its predecessor:

    hash = sha256_hex(canonical_json(envelope without the "hash" key))
    prev_hash = hash of the previous event in the run, or 64 zeros ("{ev.GENESIS_HASH[:8]}...") for seq 1

where canonical JSON is UTF-8 JSON with object keys sorted (recursively) and no whitespace, strings
escaped minimally (no `\\uXXXX` for non-ASCII, no HTML escaping). To verify, hash each envelope as
received, keeping every number's literal text (e.g. Go `json.Number`, a lossless parser in JS): the
writer emits floats such as `1.0` and `1e20`, which most encoders would rewrite.

Appends carry `Nats-Msg-Id` (`{{run_id}}@{{first seq}}:{{first 16 hex of last hash}}`) and
`Nats-Expected-Last-Subject-Sequence` (stream sequence of the run's last commit, `0` for a new run):
a concurrent writer gets error 10071 and must reload, never fork the log.
"""


# -- the protocol table in README.md -------------------------------------------------------
README_FILE = "README.md"
TABLE_BEGIN = "<!-- BEGIN GENERATED: protocol constants (python -m interlock.contracts.generate) -->"
TABLE_END = "<!-- END GENERATED: protocol constants -->"


def _flatten(prefix: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [row for key, item in value.items() for row in _flatten(f"{prefix}.{key}" if prefix else key, item)]
    return [(prefix, value)]


def protocol_table() -> str:
    """The Markdown table of ``x-interlock-protocol`` (between the markers in contracts/README.md)."""
    rows = ["| `x-interlock-protocol` | value |", "| --- | --- |"]
    rows += [f"| `{name}` | `{json.dumps(value)}` |" for name, value in _flatten("", protocol.table())]
    return "\n".join([TABLE_BEGIN, *rows, TABLE_END])


def readme_with_table(text: str, where: str = README_FILE) -> str:
    """``text`` (contracts/README.md) with its generated table replaced by the current one."""
    start, end = text.find(TABLE_BEGIN), text.find(TABLE_END)
    if start < 0 or end < start:
        raise ValueError(f"{where}: the markers {TABLE_BEGIN!r} and {TABLE_END!r} are missing or out of order")
    return text[:start] + protocol_table() + text[end + len(TABLE_END):]


# -- files ---------------------------------------------------------------------------------
def dumps(document: Any) -> str:
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def render(root: Path = CONTRACTS_DIR) -> dict[str, str]:
    """Every generated file, by path relative to the contracts directory (POSIX separators); the
    README is ``root``'s with its protocol table brought up to date (absent: not generated)."""
    schemas = json_schemas()
    files = {f"{SCHEMAS_SUBDIR}/{name}.json": dumps(schema) for name, schema in schemas.items()}
    files[ASYNCAPI_FILE] = dumps(asyncapi(schemas))
    readme = root / README_FILE
    if readme.is_file():
        files[README_FILE] = readme_with_table(readme.read_text(encoding="utf-8"), str(readme))
    return dict(sorted(files.items()))


def _existing(root: Path) -> set[str]:
    schema_dir = root / SCHEMAS_SUBDIR
    found = {f"{SCHEMAS_SUBDIR}/{p.name}" for p in schema_dir.glob("*.json")} if schema_dir.is_dir() else set()
    for name in (ASYNCAPI_FILE, README_FILE):
        if (root / name).is_file():
            found.add(name)
    return found


def check(root: Path = CONTRACTS_DIR) -> list[str]:
    """Problems with the files under ``root``: 'missing: …', 'stale: …' or 'extra: …' (empty if up to date)."""
    expected = render(root)
    existing = _existing(root)
    problems: list[str] = []
    for path, text in expected.items():
        if path not in existing:
            problems.append(f"missing: {path}")
        elif (root / path).read_text(encoding="utf-8") != text:
            problems.append(f"stale: {path}")
    problems.extend(f"extra: {path}" for path in sorted(existing - expected.keys()))
    return problems


def write(root: Path = CONTRACTS_DIR) -> list[str]:
    """Write every generated file under ``root`` and delete extra schema files; returns what changed."""
    expected = render(root)
    changed: list[str] = []
    (root / SCHEMAS_SUBDIR).mkdir(parents=True, exist_ok=True)
    for path, text in expected.items():
        target = root / path
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8", newline="\n")
            changed.append(f"wrote: {path}")
    for path in sorted(_existing(root) - expected.keys()):
        (root / path).unlink()
        changed.append(f"removed: {path}")
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m interlock.contracts.generate", description=_SUMMARY)
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 if anything is stale")
    parser.add_argument("--root", type=Path, default=CONTRACTS_DIR, help="contracts directory (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.check:
        problems = check(args.root)
        for line in problems:
            print(line)
        if problems:
            print("contracts are out of date: run `python -m interlock.contracts.generate`", file=sys.stderr)
            return 1
        print(f"contracts up to date ({len(render(args.root))} files)")
        return 0
    changes = write(args.root)
    for line in changes:
        print(line)
    print(f"{len(changes)} file(s) changed under {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
