"""Which stored commits may change a run's state: signed by a trusted key entitled to write them.

A process appends with a :class:`CommitSigner` (its own key: ``interlock.identity.Signer``) and
trusts through a :class:`CommitTrust` (``interlock.identity.Keyring``); both are given to the
:class:`Authenticity` of its event store (core does not import identity: the layers are
siblings). Before a commit is applied, :meth:`Authenticity.check` asks, without any state:

- are its bytes a commit of events of this run (else ``undecodable``/``malformed``);
- does every event hash to its ``hash``, and do its events chain onto each other;
- is it signed, by a key the keyring knows and had not revoked when it was stored, whose role
  may write every event type in it (``interlock.contracts.authorship``).

The repository then checks that the commit continues the run (``seq`` and ``prev_hash``). A
commit that fails any check is skipped (it changes no state; the run's position moves past it,
so the run goes on), reported once to ``on_refused`` and remembered, like every verdict, per
(subject, stream sequence): a replay never checks a commit twice.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from interlock.contracts import authorship as a
from interlock.contracts import headers as h
from interlock.core import codec
from interlock.core.eventstore.recorder import StoredCommit

log = logging.getLogger("interlock.alert")

UNDECODABLE = "undecodable"
MALFORMED = "malformed"
HASH_MISMATCH = "hash_mismatch"
BROKEN_LINK = "broken_link"
UNSIGNED = "unsigned"


class CommitSigner(Protocol):
    key_id: str

    def sign_b64(self, data: bytes) -> str: ...


class CommitTrust(Protocol):
    def commit_problem(self, subject: str, envelopes: Sequence[Mapping[str, Any]], key_id: str | None,
                       signature: str | None, at: float | None) -> tuple[str, str] | None: ...


@dataclass(frozen=True)
class Refusal:
    """Why one stored commit was not applied."""

    subject: str
    stream_seq: int
    kind: str
    message: str
    first_seq: int | None = None

    def __str__(self) -> str:
        at = f" (event seq {self.first_seq})" if self.first_seq is not None else ""
        return f"refused commit at stream seq {self.stream_seq} of {self.subject}{at}: {self.kind}: {self.message}"


_OK = object()


def structural_problem(subject: str, commit: StoredCommit, run_id: str, tenant: str) -> tuple[str, str] | None:
    """What is wrong with a commit on its own (bytes, run, hashes, inner links), or None."""
    if commit.problem is not None:
        return UNDECODABLE, commit.problem
    prev: Mapping[str, Any] | None = None
    for envelope in commit.envelopes:
        seq = envelope.get("seq")
        if envelope.get("run_id") != run_id or envelope.get("tenant") != tenant:
            return MALFORMED, (f"an event of run {envelope.get('run_id')!r} / tenant {envelope.get('tenant')!r} "
                               f"on {subject}")
        if not isinstance(seq, int) or not isinstance(envelope.get("type"), str):
            return MALFORMED, "an event without an integer seq or a type"
        try:
            actual = codec.event_hash(dict(envelope))
        except (TypeError, ValueError) as e:
            return MALFORMED, f"event seq {seq} cannot be hashed: {e}"
        if actual != envelope.get("hash"):
            return HASH_MISMATCH, f"event seq {seq} hashes to {actual[:12]}…, its stored hash is " \
                                  f"{str(envelope.get('hash'))[:12]}…"
        if prev is not None and (seq != prev["seq"] + 1 or envelope.get("prev_hash") != prev["hash"]):
            return BROKEN_LINK, f"event seq {seq} does not follow event seq {prev['seq']} in the same commit"
        prev = envelope
    return None


class Authenticity:
    """Signs what this process appends; judges what it reads. Safe for concurrent tasks (no awaits).

    ``signer`` None: commits are appended unsigned (``INTERLOCK_SIGNING=off``). ``trust`` None:
    signatures are not checked. ``require_signatures``: an unsigned commit is refused (the
    default once ``trust`` is given)."""

    def __init__(self, signer: CommitSigner | None = None, trust: CommitTrust | None = None, *,
                 require_signatures: bool | None = None,
                 on_refused: Callable[[Refusal, StoredCommit], None] | None = None,
                 cache_size: int = 200_000) -> None:
        self.signer = signer
        self.trust = trust
        self.require_signatures = trust is not None if require_signatures is None else require_signatures
        self.on_refused = on_refused
        self.cache_size = cache_size
        self._verdicts: OrderedDict[tuple[str, int], object] = OrderedDict()
        self._reported: OrderedDict[tuple[str, int], None] = OrderedDict()
        self.stats = {"checked": 0, "cached": 0, "refused": 0, "signed": 0}

    def headers(self, subject: str, envelopes: Sequence[Mapping[str, Any]]) -> dict[str, str]:
        """The authorship headers of a commit about to be appended (none when signing is off)."""
        if self.signer is None:
            return {}
        self.stats["signed"] += 1
        signature = self.signer.sign_b64(a.canonical(a.commit_statement(subject, envelopes)))
        return {h.SIGNER: self.signer.key_id, h.SIGNATURE: signature}

    def check(self, subject: str, commit: StoredCommit, run_id: str, tenant: str) -> Refusal | None:
        """The verdict on one stored commit on its own (cached per subject and stream sequence)."""
        key = (subject, commit.stream_seq)
        verdict = self._verdicts.get(key)
        if verdict is not None:
            self.stats["cached"] += 1
            return None if verdict is _OK else verdict  # type: ignore[return-value]
        self.stats["checked"] += 1
        problem = structural_problem(subject, commit, run_id, tenant)
        if problem is None and (commit.signer or commit.signature):
            if self.trust is not None:
                problem = self.trust.commit_problem(subject, commit.envelopes, commit.signer, commit.signature,
                                                    commit.at)
        elif problem is None and self.require_signatures:
            problem = (UNSIGNED, "no signature (a commit written before signing, or by something that is not "
                                 "an Interlock service)")
        refusal = None
        if problem is not None:
            first = commit.envelopes[0].get("seq") if commit.envelopes else None
            refusal = Refusal(subject, commit.stream_seq, problem[0], problem[1],
                              first if isinstance(first, int) else None)
        self.remember(subject, commit.stream_seq, refusal, commit)
        return refusal

    def remember(self, subject: str, stream_seq: int, refusal: Refusal | None, commit: StoredCommit) -> None:
        """Record a verdict on a commit's own content; a refusal is reported (once) as it is first recorded."""
        key = (subject, stream_seq)
        if key in self._verdicts:
            return
        self._verdicts[key] = _OK if refusal is None else refusal
        while len(self._verdicts) > self.cache_size:
            self._verdicts.popitem(last=False)
        if refusal is not None:
            self.report(refusal, commit)

    def report(self, refusal: Refusal, commit: StoredCommit) -> None:
        """Report a refusal once per commit (also one that depends on the state it was read
        onto, which is not remembered as a verdict: a later replay judges it again)."""
        key = (refusal.subject, refusal.stream_seq)
        if key in self._reported:
            return
        self._reported[key] = None
        while len(self._reported) > self.cache_size:
            self._reported.popitem(last=False)
        self.stats["refused"] += 1
        log.error("%s", refusal)
        if self.on_refused is not None:
            try:
                self.on_refused(refusal, commit)
            except Exception:  # reporting must never stop a replay
                log.exception("reporting a refused commit failed")


__all__ = [
    "BROKEN_LINK",
    "HASH_MISMATCH",
    "MALFORMED",
    "UNDECODABLE",
    "UNSIGNED",
    "Authenticity",
    "CommitSigner",
    "CommitTrust",
    "Refusal",
    "structural_problem",
]
