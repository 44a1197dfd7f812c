"""Who may write what, and the signed statements that prove it (see contracts/README.md).

- :data:`WRITERS`: for every event type, the roles whose keys may sign a commit holding it
  (derived from what each service appends; checked complete against the event registry).
- :data:`VOUCHED`: event types a role may write only with another role's signed statement of
  them (the planner appends the policy service's decisions: :func:`policy_mismatch`).
- :func:`commit_statement` / :func:`approval_bytes` / :func:`policy_bytes`: what a commit's, an
  approval's and a policy decision's Ed25519 signatures cover; :func:`canonical` turns a
  statement into the signed bytes (RFC 8785 JSON Canonicalization Scheme).
- :class:`KeyEntry` / :class:`KeyringDocument`: the trusted keys (KV bucket
  ``subjects.KEYRING_BUCKET``, and ``interlock audit keyring`` / ``verify --keys``).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

import rfc8785
from pydantic import Field

from interlock.contracts import events as ev
from interlock.contracts.messages import (
    ApprovalStatement,
    Message,
    PolicyStatement,
    SignedApproval,
    SignedPolicyDecision,
)

COMMIT_DOMAIN = "interlock.commit.v1"
"""``domain`` of a commit statement: a signature made for one purpose is never valid for another."""

APPROVAL_DOMAIN: Literal["interlock.approval.v1"] = "interlock.approval.v1"
"""``domain`` of an approval statement."""

POLICY_DOMAIN: Literal["interlock.policy.v1"] = "interlock.policy.v1"
"""``domain`` of a policy statement."""

KEYRING_VERSION = 1

_PLANNER, _POLICY, _APPROVAL, _DISPATCHER = "planner", "policy", "approval", "dispatcher"

# Who appends what today. The planner and the approval service complete steps themselves too
# (reused outputs, for_each parents, failed inputs; approval steps), so they may write step
# outcomes; a job's outcome after dispatch (attempt >= 1) only the dispatcher may write
# (:data:`DISPATCHED_OUTCOMES`).
_WRITERS: dict[type[ev.EventData], tuple[str, ...]] = {
    ev.RunStarted: (_PLANNER,),
    ev.RunAdmitted: (_PLANNER,),
    ev.RunSucceeded: (_PLANNER,),
    ev.RunFailed: (_PLANNER,),
    ev.BudgetExceeded: (_PLANNER,),
    ev.RunDenied: (_PLANNER, _POLICY),
    ev.RunCancelled: (_PLANNER,),
    ev.RunTimedOut: (_PLANNER,),
    ev.StepReady: (_PLANNER,),
    ev.StepExpanded: (_PLANNER,),
    ev.PolicyDecided: (_POLICY,),
    ev.ApprovalRequested: (_APPROVAL,),
    ev.ApprovalGranted: (_APPROVAL,),
    ev.ApprovalRejected: (_APPROVAL,),
    ev.ApprovalRefused: (_APPROVAL,),
    ev.ApprovalExpired: (_APPROVAL,),
    ev.ApprovalInvalidated: (_APPROVAL,),
    ev.ApprovalEscalated: (_APPROVAL,),
    ev.StepDispatched: (_DISPATCHER,),
    ev.StepThrottled: (_DISPATCHER,),
    ev.StepHeartbeat: (_DISPATCHER,),
    ev.StepHeld: (_DISPATCHER,),
    ev.StepSucceeded: (_PLANNER, _APPROVAL, _DISPATCHER),
    ev.StepFailed: (_PLANNER, _APPROVAL, _DISPATCHER),
    ev.RetryScheduled: (_DISPATCHER,),
    ev.StepTimedOut: (_DISPATCHER,),
    ev.StepSkipped: (_PLANNER,),
    ev.StepCacheHit: (_DISPATCHER,),
    ev.LateResultRecorded: (_DISPATCHER,),
    ev.GuardChecked: (_DISPATCHER,),
    ev.CompensationStarted: (_PLANNER,),
    ev.CompensationFinished: (_PLANNER,),
    # a person's interventions and feedback, appended by the planner on their command (issue 17)
    ev.RunResumed: (_PLANNER,),
    ev.StepRetryRequested: (_PLANNER,),
    ev.StepOutputSupplied: (_PLANNER,),
    ev.RunPaused: (_PLANNER,),
    ev.RunUnpaused: (_PLANNER,),
    ev.FeedbackGiven: (_PLANNER,),
}

#: Event type name -> the roles that may write it. Fails at import when an event type has no entry.
WRITERS: Mapping[str, frozenset[str]] = {
    name: frozenset(roles) for name, roles in ev.complete_table("authorship.WRITERS", _WRITERS).items()}

#: Event type name -> {writer role: voucher role}: the writer may sign a commit holding the event
#: only when the event's ``data.signed`` is a statement of it signed by a key of the voucher role
#: (checked by the keyring: ``Keyring.commit_problem``). The planner appends the policy service's
#: decisions in the same commit as the StepReady they decide (issue 15), each carrying the policy
#: service's signed PolicyStatement. Kept apart from WRITERS, so a verifier that does not know
#: this table refuses such a commit rather than trusting it unchecked.
VOUCHED: Mapping[str, Mapping[str, str]] = {
    ev.PolicyDecided.type_name: {_PLANNER: _POLICY},
}

#: Step outcomes that, for an attempt >= 1 (a dispatched job), only the dispatcher may write.
DISPATCHED_OUTCOMES: frozenset[str] = ev.kinds(ev.StepSucceeded, ev.StepFailed, ev.StepTimedOut)
DISPATCHER_ROLE = _DISPATCHER


def vouched_by(role: str, envelope: Mapping[str, Any]) -> str | None:
    """The role whose signed statement ``envelope`` must carry for ``role`` to write it, if any."""
    type_name = envelope.get("type")
    if not isinstance(type_name, str) or role in WRITERS.get(type_name, ()):
        return None
    return VOUCHED.get(type_name, {}).get(role)


def may_write(role: str, envelope: Mapping[str, Any]) -> bool:
    """Whether a key of ``role`` may sign a commit holding ``envelope`` (for a :data:`VOUCHED`
    writer: only an event that carries a statement, which the keyring then checks)."""
    type_name = envelope.get("type")
    if not isinstance(type_name, str):
        return False
    if role not in WRITERS.get(type_name, ()):
        data = envelope.get("data")
        return vouched_by(role, envelope) is not None and isinstance(data, Mapping) \
            and isinstance(data.get("signed"), Mapping)
    attempt = envelope.get("attempt")
    if type_name in DISPATCHED_OUTCOMES and isinstance(attempt, int) and attempt >= 1:
        return role == _DISPATCHER
    return True


def _flat(statement: Mapping[str, Any]) -> bool:
    return all(key.isascii() and (type(value) is str or (type(value) is int and -(2**53) < value < 2**53))
               for key, value in statement.items())


def canonical(statement: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: RFC 8785 (JCS) canonical JSON of the statement.

    A flat object of ASCII keys with string and safe-integer values (every commit statement)
    takes the stdlib's encoder, whose output is then byte-for-byte RFC 8785 (sorted keys, no
    whitespace, UTF-8, the same escapes) at a tenth of the cost; anything else goes to ``rfc8785``."""
    if _flat(statement):
        return json.dumps(statement, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return rfc8785.dumps(dict(statement))


def b64url(data: bytes) -> str:
    """Base64url without padding: how signatures and raw public keys are written."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def commit_statement(subject: str, envelopes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What a commit's signature covers: its subject, its first and last ``seq``, the hash it
    chains onto and the hash of its last event (which covers every event in it through
    ``prev_hash``)."""
    first, last = envelopes[0], envelopes[-1]
    return {
        "domain": COMMIT_DOMAIN,
        "subject": subject,
        "run_id": first.get("run_id"),
        "tenant": first.get("tenant"),
        "first_seq": first.get("seq"),
        "last_seq": last.get("seq"),
        "prev_hash": first.get("prev_hash"),
        "head_hash": last.get("hash"),
    }


def approval_bytes(statement: ApprovalStatement) -> bytes:
    """The bytes an approval's signature covers: canonical JSON of its statement."""
    return canonical(statement.model_dump(mode="json"))


POLICY_BOUND: tuple[str, ...] = tuple(name for name in PolicyStatement.model_fields
                                     if name not in ("domain", "tenant", "run_id", "at"))
"""The fields of a PolicyDecided its policy statement must state alike (every field but ``signed``)."""
if set(POLICY_BOUND) != set(ev.PolicyDecided.model_fields) - {"signed"}:  # pragma: no cover - a contract edit
    raise RuntimeError("authorship: PolicyStatement must bind every field of PolicyDecided but signed")


def policy_bytes(statement: PolicyStatement | Mapping[str, Any]) -> bytes:
    """The bytes a policy decision's signature covers: canonical JSON of its statement (as stored:
    a verifier hashes the statement object it reads, not a re-encoding of it)."""
    return canonical(statement.model_dump(mode="json") if isinstance(statement, PolicyStatement) else statement)


def policy_statement(tenant: str, run_id: str, decided: ev.PolicyDecided, at: str) -> PolicyStatement:
    """The statement the policy service signs for ``decided`` in run ``run_id``."""
    return PolicyStatement(tenant=tenant, run_id=run_id, at=at,
                           **decided.model_dump(mode="json", include=set(POLICY_BOUND)))


def policy_decided(signed: SignedPolicyDecision) -> ev.PolicyDecided:
    """The PolicyDecided a signed statement records (carrying it when it is signed)."""
    fields = signed.statement.model_dump(mode="json", include=set(POLICY_BOUND))
    return ev.PolicyDecided(**fields, signed=signed if signed.signature else None)


def policy_mismatch(envelope: Mapping[str, Any], statement: PolicyStatement) -> str | None:
    """How a PolicyDecided envelope differs from the policy statement it carries, or None."""
    data = envelope.get("data")
    if not isinstance(data, Mapping):
        return "the event has no data"
    try:
        recorded = ev.PolicyDecided.model_validate(data).model_dump(mode="json", include=set(POLICY_BOUND))
    except ValueError as e:
        return f"the event's data is not a PolicyDecided: {str(e).splitlines()[0]}"
    stated = statement.model_dump(mode="json")
    wrong = [f"{k} {stated[k]!r} (the event says {recorded[k]!r})" for k in POLICY_BOUND if stated[k] != recorded[k]]
    for name in ("tenant", "run_id"):
        if stated[name] != envelope.get(name):
            wrong.append(f"{name} {stated[name]!r} (the event's is {envelope.get(name)!r})")
    return f"the signed statement says {', '.join(wrong)}" if wrong else None


class KeyEntry(Message):
    """One trusted key: whose it is and when it may sign (unix seconds)."""

    key_id: str = Field(description="nkey public key (U…)")
    public_key: str = Field(description="The raw 32-byte Ed25519 public key, base64url without padding")
    principal: str
    role: str
    kind: str = Field(description="service, worker, person or custom")
    tenant: str = Field(description="The principal's tenant, '*' for services")
    valid_from: int
    revoked_at: int | None = None
    expires: int | None = None

    def valid_at(self, at: float | None) -> bool:
        """Whether the key may sign at unix time ``at`` (None: now is not known, only revocation counts)."""
        if at is None:
            return self.revoked_at is None
        if at < self.valid_from - 300:  # clocks of the signer and the server may differ a little
            return False
        if self.revoked_at is not None and at >= self.revoked_at:
            return False
        return self.expires is None or at < self.expires


class KeyringDocument(Message):
    """The exported keyring: every key ever issued, and what each role may write."""

    version: int = KEYRING_VERSION
    generated_at: datetime | None = None
    keys: list[KeyEntry] = Field(default_factory=list)
    writers: dict[str, list[str]] = Field(
        default_factory=lambda: {name: sorted(roles) for name, roles in WRITERS.items()},
        description="Event type -> roles whose keys may write it")
    vouched: dict[str, dict[str, str]] = Field(
        default_factory=lambda: {name: dict(by) for name, by in VOUCHED.items()},
        description="Event type -> {writer role: voucher role}: the writer may write it only carrying a statement "
                    "of it signed by a key of the voucher role")


__all__ = [
    "APPROVAL_DOMAIN",
    "COMMIT_DOMAIN",
    "DISPATCHED_OUTCOMES",
    "KEYRING_VERSION",
    "POLICY_BOUND",
    "POLICY_DOMAIN",
    "VOUCHED",
    "WRITERS",
    "ApprovalStatement",
    "KeyEntry",
    "KeyringDocument",
    "PolicyStatement",
    "SignedApproval",
    "SignedPolicyDecision",
    "approval_bytes",
    "b64url",
    "b64url_decode",
    "canonical",
    "commit_statement",
    "may_write",
    "policy_bytes",
    "policy_decided",
    "policy_mismatch",
    "policy_statement",
    "vouched_by",
]
