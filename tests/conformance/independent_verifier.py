"""A second, independent verifier of an exported run log, written from contracts/README.md only.

It imports nothing from Interlock: the standard library, ``cryptography`` (Ed25519) and
``rfc8785`` (canonical JSON). Usage::

    python tests/conformance/independent_verifier.py run.jsonl keyring.json

prints one line per problem (``stream seq S, seq N: kind``) and exits 1 if there is any.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from datetime import datetime
from typing import Any

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

GENESIS = "0" * 64
USER_PREFIX = 0xA0
DISPATCHED_OUTCOMES = {"StepSucceeded", "StepFailed", "StepTimedOut"}
APPROVALS = {"ApprovalGranted": "approve", "ApprovalRejected": "reject"}


def b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def crc16_xmodem(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def key_from_id(key_id: str) -> bytes | None:
    """The raw Ed25519 key an nkey user public key encodes, or None if it is not one."""
    try:
        raw = base64.b32decode(key_id + "=" * (-len(key_id) % 8))
    except ValueError:
        return None
    if len(raw) != 35 or raw[0] != USER_PREFIX or crc16_xmodem(raw[:-2]) != int.from_bytes(raw[-2:], "little"):
        return None
    return raw[1:33]


def event_hash(envelope: dict[str, Any]) -> str:
    body = {k: v for k, v in envelope.items() if k != "hash"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def signature_ok(entry: dict[str, Any], data: bytes, signature: str) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(b64url(entry["public_key"])).verify(b64url(signature), data)
    except (InvalidSignature, ValueError):
        return False
    return True


def valid_at(entry: dict[str, Any], at: float | None) -> bool:
    if at is None:
        return entry.get("revoked_at") is None
    if at < entry["valid_from"] - 300:
        return False
    if entry.get("revoked_at") is not None and at >= entry["revoked_at"]:
        return False
    return entry.get("expires") is None or at < entry["expires"]


def check_signer(keys: dict[str, dict[str, Any]], key_id: str | None, signature: str | None, data: bytes,
                 at: float | None) -> tuple[str | None, dict[str, Any] | None]:
    if not key_id or not signature:
        return "unsigned", None
    entry = keys.get(key_id)
    if entry is None:
        return "unknown_key", None
    if key_from_id(key_id) != b64url(entry["public_key"]):
        return "unknown_key", None  # the keyring's key is not the one the id names
    if not signature_ok(entry, data, signature):
        return "bad_signature", None
    if not valid_at(entry, at):
        return "revoked_key", None
    return None, entry


POLICY_BOUND_DEFAULTS: dict[str, Any] = {
    "step_type": "job", "rule_ids": [], "reason": "", "approver_role": None, "approval_expires_ms": None,
    "escalate_after_ms": None, "escalate_to_role": None, "constraints": {}}
POLICY_BOUND_REQUIRED = ("step_id", "job_hash", "decision", "snapshot_id")


def may_write(writers: dict[str, list[str]], vouched: dict[str, dict[str, str]], role: str,
              envelope: dict[str, Any]) -> bool:
    if role not in writers.get(str(envelope.get("type")), []):
        # a vouched writer: only carrying a statement (checked by policy_problem)
        data = envelope.get("data")
        return role in vouched.get(str(envelope.get("type")), {}) and isinstance(data, dict) \
            and isinstance(data.get("signed"), dict)
    attempt = envelope.get("attempt")
    if envelope.get("type") in DISPATCHED_OUTCOMES and isinstance(attempt, int) and attempt >= 1:
        return role == "dispatcher"
    return True


def commit_problem(subject: str, run_id: str, tenant: str, events: Any) -> str | None:
    if not isinstance(events, list) or not events or not all(isinstance(e, dict) for e in events):
        return "undecodable"
    prev = None
    for e in events:
        if e.get("run_id") != run_id or e.get("tenant") != tenant or not isinstance(e.get("seq"), int):
            return "malformed"
        if event_hash(e) != e.get("hash"):
            return "hash_mismatch"
        if prev is not None and (e["seq"] != prev["seq"] + 1 or e.get("prev_hash") != prev["hash"]):
            return "broken_link"
        prev = e
    return None


def approval_problem(keys: dict[str, dict[str, Any]], e: dict[str, Any]) -> str | None:
    data = e.get("data") or {}
    signed = data.get("signed")
    if not isinstance(signed, dict) or not isinstance(signed.get("statement"), dict):
        return "unsigned_approval"
    st = signed["statement"]
    expected = {"run_id": e["run_id"], "tenant": e["tenant"], "step_id": data.get("step_id"),
                "job_hash": data.get("job_hash"), "principal": data.get("approver"), "role": data.get("role"),
                "decision": APPROVALS[e["type"]], "domain": "interlock.approval.v1"}
    if any(st.get(k) != v for k, v in expected.items()):
        return "approval_mismatch"
    try:
        at = datetime.fromisoformat(st["at"]).timestamp()
    except (KeyError, ValueError):
        return "approval_bad_signature"
    kind, entry = check_signer(keys, signed.get("key_id"), signed.get("signature"), rfc8785.dumps(st), at)
    if kind is not None:
        return f"approval_{kind}"
    assert entry is not None
    if entry["principal"] != st["principal"] or entry["tenant"] not in (st["tenant"], "*") \
            or entry["kind"] != "person":
        return "approval_not_entitled"
    return None


def policy_problem(keys: dict[str, dict[str, Any]], e: dict[str, Any], voucher: str) -> str | None:
    """A PolicyDecided written by a vouched writer: the statement it carries states the very same
    decision (every field of the data but ``signed``, the envelope's run and tenant) and is signed
    by a service key of the voucher's role, valid at the statement's time."""
    data = e.get("data") or {}
    signed = data.get("signed")
    if not isinstance(signed, dict) or not isinstance(signed.get("statement"), dict):
        return "policy_unsigned"
    st = signed["statement"]
    bound = [*POLICY_BOUND_REQUIRED, *POLICY_BOUND_DEFAULTS]
    recorded = {k: data.get(k, POLICY_BOUND_DEFAULTS.get(k)) for k in bound}
    stated = {k: st.get(k, POLICY_BOUND_DEFAULTS.get(k)) for k in bound}
    if recorded != stated or st.get("run_id") != e["run_id"] or st.get("tenant") != e["tenant"] \
            or st.get("domain") != "interlock.policy.v1":
        return "policy_mismatch"
    try:
        at = datetime.fromisoformat(st["at"]).timestamp()
    except (KeyError, ValueError, TypeError):
        return "policy_bad_signature"
    kind, entry = check_signer(keys, signed.get("key_id"), signed.get("signature"), rfc8785.dumps(st), at)
    if kind is not None:
        return f"policy_{kind}"
    assert entry is not None
    if entry["role"] != voucher or entry["kind"] != "service":
        return "policy_not_entitled"
    return None


def verify(export_lines: list[str], keyring: dict[str, Any]) -> list[tuple[int | None, int | None, str]]:
    """Every problem of an exported run log as (stream seq, event seq, kind)."""
    header = json.loads(export_lines[0])
    assert header["format"] == "interlock.run-export.v1", header
    run_id, tenant, subject = header["run_id"], header["tenant"], header["subject"]
    keys = {k["key_id"]: k for k in keyring["keys"]}
    writers = keyring["writers"]
    vouched = keyring.get("vouched") or {}
    problems: list[tuple[int | None, int | None, str]] = []
    next_seq, last_hash = 1, GENESIS
    for line in export_lines[1:]:
        if not line.strip():
            continue
        doc = json.loads(line)
        stream_seq, at, headers = doc["stream_seq"], doc.get("at"), doc.get("headers") or {}
        try:
            commit = json.loads(base64.b64decode(doc["data_b64"]))
            found_events = commit.get("events") if isinstance(commit, dict) else None
        except ValueError:
            found_events = None
        problem = commit_problem(subject, run_id, tenant, found_events)
        events: list[dict[str, Any]] = found_events if problem != "undecodable" else []  # type: ignore[assignment]
        first: Any = events[0].get("seq") if events else None
        if problem is None:
            statement = {"domain": "interlock.commit.v1", "subject": subject, "run_id": events[0]["run_id"],
                         "tenant": events[0]["tenant"], "first_seq": events[0]["seq"], "last_seq": events[-1]["seq"],
                         "prev_hash": events[0]["prev_hash"], "head_hash": events[-1]["hash"]}
            problem, entry = check_signer(keys, headers.get("Interlock-Signer"), headers.get("Interlock-Signature"),
                                          rfc8785.dumps(statement), at)
            if problem is None and entry is not None and not all(may_write(writers, vouched, entry["role"], e)
                                                                  for e in events):
                problem = "not_entitled"
            if problem is None and entry is not None:
                problem = next((found for e in events if entry["role"] not in writers.get(e["type"], [])
                                and (found := policy_problem(keys, e, vouched[e["type"]][entry["role"]]))), None)
        if problem is None and (first != next_seq or events[0].get("prev_hash") != last_hash):
            problem = "broken_link" if first == next_seq else ("seq_gap" if first > next_seq else "seq_order")
        if problem is not None:
            problems.append((stream_seq, first, problem))
            continue
        for e in events:
            if e["type"] in APPROVALS:
                found = approval_problem(keys, e)
                if found is not None:
                    problems.append((stream_seq, e["seq"], found))
        next_seq, last_hash = events[-1]["seq"] + 1, events[-1]["hash"]
    if next_seq == 1:
        problems.append((None, None, "empty"))
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        lines = f.read().splitlines()
    with open(argv[2]) as f:
        keyring = json.load(f)
    problems = verify(lines, keyring)
    for stream_seq, seq, kind in problems:
        print(f"stream seq {stream_seq}, seq {seq}: {kind}")
    if not problems:
        print("ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
