"""The audit verifier: is a run's stored log an intact, well-formed hash chain?

:func:`verify_envelopes` checks one run's envelopes, in stored order, without trusting any of
them:

- every event's ``hash`` is the hash of its own content (an edited event shows up here);
- ``seq`` runs 1..n without gaps, repeats or reordering (dropped, inserted or swapped events);
- every ``prev_hash`` is the stored hash of the event before it (:data:`GENESIS_HASH` first),
  so an edit whose hash was recomputed still breaks the link to the next event;
- all events belong to one run and one tenant, the tenant the run was started for;
- the first event is ``RunStarted`` and no other is;
- every ``type`` is a known event type and its ``data`` validates against that contract.

Every problem is reported (with the seq, the 1-based position in the log and a kind), not just
the first, and the check never raises on malformed input. :func:`verify_commits` checks stored
commits: their bytes, their signatures and entitlements and the approvers' signatures (with a
keyring), then the chain over the commits that pass, as the services replay them. An intact chain only proves the log
was not changed *after* its last event: compare :attr:`VerifyReport.head_hash` with a head hash
recorded elsewhere to detect a log rewritten from some point on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from pydantic import ValidationError

from interlock.contracts import events as ev
from interlock.contracts import subjects as s
from interlock.contracts.messages import SignedApproval
from interlock.core import codec
from interlock.core.eventstore import EventStore, StoredCommit
from interlock.core.eventstore.authenticity import structural_problem

# Problem kinds
MALFORMED = "malformed"  # not an object, or a field is missing or of the wrong type
HASH_MISMATCH = "hash_mismatch"  # the event's content does not hash to its ``hash``
BROKEN_LINK = "broken_link"  # ``prev_hash`` is not the previous event's hash
SEQ_GAP = "seq_gap"  # seq jumps forward: events are missing before this one
SEQ_ORDER = "seq_order"  # seq repeats or goes back: an event was inserted or moved
RUN_MISMATCH = "run_mismatch"  # the event belongs to another run
TENANT_MISMATCH = "tenant_mismatch"  # the event names another tenant
NOT_STARTED = "not_started"  # the log does not begin with RunStarted
DUPLICATE_START = "duplicate_start"  # a RunStarted after the first event
UNKNOWN_TYPE = "unknown_type"  # not one of the event type names
INVALID_DATA = "invalid_data"  # ``data`` does not validate against its contract type
FIELD_MISMATCH = "field_mismatch"  # envelope step_id/attempt disagree with the data
EMPTY = "empty"  # no events at all
UNDECODABLE = "undecodable"  # a stored message on the run's subject that is not a commit
UNSIGNED = "unsigned"  # a commit without a signature (written before signing, or by something else)
UNSIGNED_APPROVAL = "unsigned_approval"  # an approval event without the approver's signature
APPROVAL_MISMATCH = "approval_mismatch"  # the approver signed something else than the event records
# and, from the keyring: bad_signature, unknown_key, revoked_key, not_entitled (approval_* for approvals)

_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "run_id": str,
    "tenant": str,
    "seq": int,
    "type": str,
    "at": str,
    "data": dict,
    "prev_hash": str,
    "hash": str,
}


@dataclass(frozen=True)
class VerifyProblem:
    """One thing wrong with the log. ``seq`` is the seq the event claims (its position when it
    claims none); ``position`` is where it is stored (1-based); ``seq`` is None for the log."""

    seq: int | None
    kind: str
    message: str
    position: int | None = None
    stream_seq: int | None = None  # the stream sequence of the commit (when verified by commit)

    def __str__(self) -> str:
        where = "log" if self.seq is None else f"seq {self.seq}"
        if self.stream_seq is not None:
            where = f"stream seq {self.stream_seq}" if self.seq is None else f"{where} (stream seq {self.stream_seq})"
        elif self.position is not None and self.position != self.seq:
            where += f" (position {self.position})"
        return f"{where}: {self.kind}: {self.message}"


@dataclass
class VerifyReport:
    run_id: str
    events: int
    ok: bool
    problems: list[VerifyProblem] = field(default_factory=list)
    head_hash: str | None = None  # stored hash of the last event
    tenant: str = ""
    commits: int = 0
    signed_commits: int = 0
    signatures_checked: bool = False

    def kinds(self) -> set[str]:
        return {p.kind for p in self.problems}


class _Reporter:
    """Adds problems found at one position."""

    __slots__ = ("position", "problems")

    def __init__(self, problems: list[VerifyProblem], position: int) -> None:
        self.problems = problems
        self.position = position

    def __call__(self, kind: str, message: str, seq: int) -> None:
        self.problems.append(VerifyProblem(seq, kind, message, self.position))


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] + "…" if len(text) > 12 else text


def verify_envelopes(envelopes: list[dict[str, Any]], *, run_id: str | None = None,
                     tenant: str | None = None) -> VerifyReport:
    """Check one run's envelopes, in stored order. ``run_id``/``tenant``, when given, are what
    the log must belong to (otherwise the first event's values are taken)."""
    problems: list[VerifyProblem] = []
    first = envelopes[0] if envelopes and isinstance(envelopes[0], dict) else {}
    want_run = run_id if run_id is not None else first.get("run_id")
    want_tenant = tenant if tenant is not None else first.get("tenant")
    if not envelopes:
        problems.append(VerifyProblem(None, EMPTY, "the log has no events"))

    prev_hash: str = ev.GENESIS_HASH
    max_seq = 0
    last_hash: str | None = None
    for position, envelope in enumerate(envelopes, start=1):
        report = _Reporter(problems, position)
        if not isinstance(envelope, dict):
            report(MALFORMED, f"not an object: {type(envelope).__name__}", position)
            prev_hash, last_hash = "", None
            max_seq += 1
            continue
        raw_seq = envelope.get("seq")
        seq = raw_seq if isinstance(raw_seq, int) and not isinstance(raw_seq, bool) else position
        wrong = [name for name, kind in _REQUIRED.items()
                 if not isinstance(envelope.get(name), kind) or isinstance(envelope.get(name), bool)]
        if wrong:
            report(MALFORMED, f"missing or mistyped field(s): {', '.join(wrong)}", seq)

        # 1. the event's own hash
        stored_hash = envelope.get("hash")
        try:
            actual = codec.event_hash(envelope)
        except (TypeError, ValueError) as e:  # not JSON-encodable
            report(MALFORMED, f"cannot be hashed: {e}", seq)
        else:
            if stored_hash != actual:
                report(HASH_MISMATCH, f"content hashes to {_short(actual)}, stored hash is {_short(stored_hash)}",
                       seq)

        # 2. the link to the event before
        if envelope.get("prev_hash") != prev_hash:
            before = "genesis" if position == 1 else f"the hash of the event at position {position - 1}"
            report(BROKEN_LINK, f"prev_hash {_short(envelope.get('prev_hash'))} is not {before} "
                   f"({_short(prev_hash)})", seq)

        # 3. seq: 1..n, gap-free, in order
        if seq > max_seq + 1:
            missing = seq - max_seq - 1
            report(SEQ_GAP, f"seq jumps from {max_seq} to {seq} ({missing} missing)", seq)
        elif seq <= max_seq:
            report(SEQ_ORDER, f"seq {seq} repeats or goes back (after seq {max_seq})", seq)
        max_seq = max(max_seq, seq)

        # 4. one run, one tenant
        if envelope.get("run_id") != want_run:
            report(RUN_MISMATCH, f"run_id {envelope.get('run_id')!r}, the log is run {want_run!r}", seq)
        if envelope.get("tenant") != want_tenant:
            report(TENANT_MISMATCH, f"tenant {envelope.get('tenant')!r}, the log is tenant {want_tenant!r}",
                   seq)

        # 5. type, data, and where RunStarted may appear
        type_name = envelope.get("type")
        started = ev.RunStarted.type_name
        if position == 1 and type_name != started:
            report(NOT_STARTED, f"the first event is {type_name!r}, not {started!r}", seq)
        elif position > 1 and type_name == started:
            report(DUPLICATE_START, f"{started} after the first event", seq)
        data_cls = ev.EVENT_TYPES.get(type_name) if isinstance(type_name, str) else None
        if data_cls is None:
            report(UNKNOWN_TYPE, f"unknown event type {type_name!r}", seq)
        elif isinstance(envelope.get("data"), dict):
            data = envelope["data"]
            try:
                validated = data_cls.model_validate(data)
            except ValidationError as e:
                errors = "; ".join(f"{'.'.join(map(str, err['loc'])) or '(data)'}: {err['msg']}"
                                   for err in e.errors()[:3])
                report(INVALID_DATA, f"{type_name} data does not validate: {errors}", seq)
            else:
                if isinstance(validated, ev.RunStarted) and validated.tenant != envelope.get("tenant"):
                    report(TENANT_MISMATCH, f"{started} names tenant {validated.tenant!r}, the event is "
                           f"stored for tenant {envelope.get('tenant')!r}", seq)
                for name in ("step_id", "attempt"):
                    if envelope.get(name) != data.get(name):
                        report(FIELD_MISMATCH, f"envelope {name} {envelope.get(name)!r} but data {name} "
                               f"{data.get(name)!r}", seq)
        if isinstance(envelope.get("at"), str):
            try:
                datetime.fromisoformat(envelope["at"])
            except ValueError:
                report(MALFORMED, f"'at' is not an ISO timestamp: {envelope['at']!r}", seq)

        prev_hash = stored_hash if isinstance(stored_hash, str) else ""
        last_hash = stored_hash if isinstance(stored_hash, str) else None

    return VerifyReport(
        run_id=str(want_run) if want_run is not None else "",
        events=len(envelopes),
        ok=not problems,
        problems=problems,
        head_hash=last_hash,
        tenant=str(want_tenant) if want_tenant is not None else "",
    )


class Trust(Protocol):
    """What verification asks of a keyring (``interlock.identity.Keyring`` is one)."""

    def commit_problem(self, subject: str, envelopes: Sequence[Mapping[str, Any]], key_id: str | None,
                       signature: str | None, at: float | None) -> tuple[str, str] | None: ...

    def approval_problem(self, signed: SignedApproval, *, principal: str | None = None,
                         at: float | None = None) -> tuple[str, str] | None: ...


_APPROVALS = {ev.ApprovalGranted.type_name: "approve", ev.ApprovalRejected.type_name: "reject"}


def _approval_problems(envelope: dict[str, Any], trust: Trust | None, require: bool) -> list[tuple[str, str]]:
    """What is wrong with the approver's signature on an ApprovalGranted/Rejected event."""
    data: dict[str, Any] = envelope["data"] if isinstance(envelope.get("data"), dict) else {}
    raw = data.get("signed")
    if raw is None:
        return [(UNSIGNED_APPROVAL, "the decision carries no approver signature")] if require else []
    try:
        signed = SignedApproval.model_validate(raw)
    except ValidationError as e:
        return [(UNSIGNED_APPROVAL, f"the approver signature is malformed: {e.errors()[0]['msg']}")]
    statement = signed.statement
    expected = {"run_id": envelope.get("run_id"), "tenant": envelope.get("tenant"), "step_id": data.get("step_id"),
                "job_hash": data.get("job_hash"), "principal": data.get("approver"), "role": data.get("role"),
                "decision": _APPROVALS[envelope["type"]]}
    wrong = [f"{k} {getattr(statement, k)!r} (the event says {v!r})" for k, v in expected.items()
             if getattr(statement, k) != v]
    problems = [(APPROVAL_MISMATCH, f"the signed statement says {', '.join(wrong)}")] if wrong else []
    if trust is not None:
        problem = trust.approval_problem(signed, principal=data.get("approver"))
        if problem is not None:
            problems.append((f"approval_{problem[0]}", problem[1]))
    return problems


def verify_commits(commits: Sequence[StoredCommit], *, run_id: str, tenant: str, trust: Trust | None = None,
                   require_signatures: bool = True) -> VerifyReport:
    """Check one run's stored commits, in stored order: every commit's bytes and authorship
    (signed by a trusted key entitled to write what it holds: ``trust``), every approver's
    signature, then the hash chain over the commits that pass (what the services replay). A
    problem names the event ``seq`` and the commit's stream sequence; nothing here raises on bad
    bytes. ``trust`` None: signatures are not checked (reported ``unsigned`` when
    ``require_signatures``)."""
    subject = s.run_events(tenant, run_id)
    problems: list[VerifyProblem] = []
    accepted: list[dict[str, Any]] = []
    stream_seqs: list[int] = []
    signed_commits = 0
    next_seq, last_hash = 1, ev.GENESIS_HASH
    for commit in commits:
        first = commit.envelopes[0].get("seq") if commit.envelopes else None
        seq = first if isinstance(first, int) and not isinstance(first, bool) else None
        if commit.problem is not None:
            problems.append(VerifyProblem(seq, UNDECODABLE, commit.problem, stream_seq=commit.stream_seq))
            continue
        problem = structural_problem(subject, commit, run_id, tenant)
        if problem is not None:
            pass
        elif commit.signer or commit.signature:
            signed_commits += 1
            if trust is not None:
                problem = trust.commit_problem(subject, commit.envelopes, commit.signer, commit.signature, commit.at)
        elif require_signatures:
            problem = (UNSIGNED, "the commit is not signed")
        if problem is None and (seq != next_seq or commit.envelopes[0].get("prev_hash") != last_hash):
            # what the services do too: a commit that does not continue the run is not applied
            kind = BROKEN_LINK if seq == next_seq else (SEQ_GAP if isinstance(seq, int) and seq > next_seq
                                                        else SEQ_ORDER)
            problem = (kind, f"does not continue the run (at seq {next_seq - 1}, head hash {last_hash[:12]}…)")
        if problem is not None:
            last = commit.envelopes[-1].get("seq")
            span = f"events {seq}..{last}" if last != seq else f"event {seq}"
            problems.append(VerifyProblem(seq, problem[0], f"{span} not applied: {problem[1]}",
                                          stream_seq=commit.stream_seq))
            continue
        next_seq, last_hash = int(commit.envelopes[-1]["seq"]) + 1, str(commit.envelopes[-1]["hash"])
        for envelope in commit.envelopes:
            accepted.append(envelope)
            stream_seqs.append(commit.stream_seq)
            if isinstance(envelope, dict) and envelope.get("type") in _APPROVALS:
                for kind, message in _approval_problems(envelope, trust, require_signatures):
                    problems.append(VerifyProblem(envelope.get("seq"), kind, message, stream_seq=commit.stream_seq))
    chain = verify_envelopes(accepted, run_id=run_id, tenant=tenant)
    for found in chain.problems:
        where = stream_seqs[found.position - 1] if found.position else None
        problems.append(dataclasses.replace(found, stream_seq=where))
    problems.sort(key=lambda p: (p.stream_seq or 0, p.seq or 0))
    return VerifyReport(run_id=run_id, events=sum(len(c.envelopes) for c in commits), ok=not problems,
                        problems=problems, head_hash=chain.head_hash, tenant=tenant, commits=len(commits),
                        signed_commits=signed_commits, signatures_checked=trust is not None)


async def verify_run(store: EventStore, tenant: str, run_id: str, trust: Trust | None = None, *,
                     require_signatures: bool | None = None) -> VerifyReport:
    """Read a run's whole log from the store (no cache, no replay) and verify it (signatures too
    when ``trust`` is given)."""
    commits = await store.read_commits(tenant, run_id)
    return verify_commits(commits, run_id=run_id, tenant=tenant, trust=trust,
                          require_signatures=trust is not None if require_signatures is None else require_signatures)


def render_report(report: VerifyReport) -> str:
    """Human-readable: one line when intact, else a summary line and one line per problem."""
    where = f"run {report.run_id}" + (f" (tenant {report.tenant})" if report.tenant else "")
    noun = "event" if report.events == 1 else "events"
    signed = ""
    if report.commits:
        signed = (f", {report.signed_commits}/{report.commits} commits signed"
                  + (" and checked against the keyring" if report.signatures_checked else " (signatures not checked)"))
    if report.ok:
        return f"{where}: {report.events} {noun}, chain intact{signed}, head sha256 {report.head_hash}"
    count = len(report.problems)
    lines = [f"{where}: {report.events} {noun}{signed}, {count} problem{'s' if count != 1 else ''}"]
    lines.extend(f"  {problem}" for problem in report.problems)
    return "\n".join(lines)


__all__ = [
    "APPROVAL_MISMATCH",
    "BROKEN_LINK",
    "DUPLICATE_START",
    "EMPTY",
    "FIELD_MISMATCH",
    "HASH_MISMATCH",
    "INVALID_DATA",
    "MALFORMED",
    "NOT_STARTED",
    "RUN_MISMATCH",
    "SEQ_GAP",
    "SEQ_ORDER",
    "TENANT_MISMATCH",
    "UNDECODABLE",
    "UNKNOWN_TYPE",
    "UNSIGNED",
    "UNSIGNED_APPROVAL",
    "Trust",
    "VerifyProblem",
    "VerifyReport",
    "render_report",
    "verify_commits",
    "verify_envelopes",
    "verify_run",
]
