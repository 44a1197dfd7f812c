"""Sealed heads: signed statements of how far the event stream went, and checks against them.

A :class:`Seal` says, signed by the auditor: stream ``IL_EVENTS`` (created at ``created``) held
``messages`` messages from ``first_seq`` to ``last_seq``, and its ``runs`` run subjects ended
at these heads (subject, stream seq of the run's last commit, seq and hash of its last event),
summed up in ``heads_root`` (an RFC 6962 Merkle root, so one run's head can be proven alone).
Seals form a chain (``prev`` is the previous seal's hash) and each carries the heads that
changed since the previous one (all of them in the first), so the chain alone rebuilds the
whole set. The encoding is specified in contracts/README.md ("Seals").

The hash chain of a run proves that nothing changed *before* its last event; a seal proves
where the last event was. :func:`check_against_seal` compares what a stream holds now with the
latest seal and reports truncation, purges, deleted messages, deletion and re-creation of the
stream, and a run's log that was rolled back or rewritten, each with sequence numbers.

Pure: no I/O. Signing and verifying are injected: a :class:`SealSigner` (a key id and
``sign(bytes) -> signature``, e.g. :class:`interlock.identity.Signer`) and a :data:`Verify`
callable ``(key_id, data, signature) -> bool`` that also says whether that key may seal.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from interlock.contracts import subjects as s
from interlock.core.codec import canonical_json

SEAL_VERSION = 1
GENESIS = "0" * 64
"""``prev`` of the first seal of a chain."""



class SealSigner(Protocol):
    """Signs seals: its ``key_id`` is recorded in the seal (and covered by the signature)."""

    key_id: str

    def sign(self, data: bytes) -> bytes: ...


Verify = Callable[[str, bytes, bytes], bool]
"""True if the signature over the bytes is by that key id (and the key is trusted to seal)."""

# Problem kinds
SEAL_SIGNATURE = "seal_signature"  # a seal's signature does not verify (forged or altered seal)
SEAL_CHAIN = "seal_chain"  # seals out of order, a seal missing or a prev that is not the previous seal
SEAL_DIGEST = "seal_digest"  # the heads a seal carries do not sum up to its heads_root
SEAL_MALFORMED = "seal_malformed"  # not a seal at all
STREAM_RECREATED = "stream_recreated"  # the stream was deleted and created again
STREAM_TRUNCATED = "stream_truncated"  # the stream ends before the last sealed sequence
STREAM_PURGED = "stream_purged"  # the stream's first messages are gone (a purge)
MESSAGES_DELETED = "messages_deleted"  # sealed messages are gone from inside the stream
RUN_DELETED = "run_deleted"  # a sealed run's log is gone (subject purged)
RUN_ROLLED_BACK = "run_rolled_back"  # a run's log ends before its sealed head
RUN_REWRITTEN = "run_rewritten"  # the event at a run's sealed head has another hash
RUN_MOVED = "run_moved"  # the sealed head event is stored at another stream sequence
RUN_INSERTED = "run_inserted"  # a run the seal does not know has messages before the seal point

MAX_LISTED = 20  # sequences named in one problem's message


@dataclass(frozen=True, order=True)
class Head:
    """Where a run's log ends: its subject, the stream seq of its last commit, the seq and hash
    of its last event."""

    subject: str
    stream_seq: int
    seq: int
    hash: str

    def to_json(self) -> dict[str, Any]:
        return {"subject": self.subject, "stream_seq": self.stream_seq, "seq": self.seq, "hash": self.hash}

    @classmethod
    def from_json(cls, raw: Any) -> Head:
        if not isinstance(raw, dict):
            raise ValueError(f"a head is an object, not {type(raw).__name__}")
        subject, stream_seq, seq, hash_ = (raw.get(k) for k in ("subject", "stream_seq", "seq", "hash"))
        if not (isinstance(subject, str) and isinstance(stream_seq, int) and isinstance(seq, int)
                and _is_int(stream_seq) and _is_int(seq) and isinstance(hash_, str)):
            raise ValueError(f"a head needs subject (string), stream_seq, seq (integers) and hash (string): {raw!r}")
        return cls(subject, stream_seq, seq, hash_)


@dataclass(frozen=True)
class StreamState:
    """What a stream holds now (from its info): ``deleted`` lists the sequences deleted inside it
    when the server was asked for them (``num_deleted`` counts them in any case)."""

    stream: str
    created: str
    first_seq: int
    last_seq: int
    messages: int
    num_deleted: int = 0
    deleted: tuple[int, ...] = ()


@dataclass(frozen=True)
class Seal:
    """One signed seal. ``heads``: the heads that changed since the previous seal (every head in
    the first seal of a chain); ``runs`` and ``heads_root``: the whole set after applying them."""

    number: int
    stream: str
    created: str
    first_seq: int
    last_seq: int
    messages: int
    runs: int
    heads_root: str
    heads: tuple[Head, ...]
    sealed_at: str
    prev: str = GENESIS
    reason: str = "interval"
    signer: str = ""
    signature: str = ""

    def body(self) -> dict[str, Any]:
        """Everything the signature covers (all fields but ``signature``)."""
        return {
            "v": SEAL_VERSION, "number": self.number, "stream": self.stream, "created": self.created,
            "first_seq": self.first_seq, "last_seq": self.last_seq, "messages": self.messages, "runs": self.runs,
            "heads_root": self.heads_root, "heads": [h.to_json() for h in self.heads], "sealed_at": self.sealed_at,
            "prev": self.prev, "reason": self.reason, "signer": self.signer,
        }

    def signed_bytes(self) -> bytes:
        """The canonical JSON of :meth:`body`: what is signed, and what :meth:`hash` is taken of."""
        return canonical_json(self.body())

    @property
    def hash(self) -> str:
        """The seal's identity: the next seal's ``prev``, its message id."""
        return hashlib.sha256(self.signed_bytes()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {**self.body(), "signature": self.signature}

    def encode(self) -> bytes:
        """The stored form (one line of an export): canonical JSON with the signature."""
        return canonical_json(self.to_json())

    def signed(self, signer: SealSigner) -> Seal:
        """This seal signed: ``signer`` becomes the key id (so the signature covers it too)."""
        unsigned = replace(self, signer=signer.key_id, signature="")
        return replace(unsigned, signature=_b64(signer.sign(unsigned.signed_bytes())))

    def signature_ok(self, verify: Verify) -> bool:
        try:
            raw = base64.urlsafe_b64decode(self.signature + "=" * (-len(self.signature) % 4))
        except (binascii.Error, ValueError):
            return False
        return bool(self.signature) and verify(self.signer, self.signed_bytes(), raw)

    @classmethod
    def decode(cls, data: bytes | str | dict[str, Any]) -> Seal:
        """Parse a stored seal; ValueError naming what is wrong."""
        try:
            raw = json.loads(data) if isinstance(data, (bytes, str)) else data
        except ValueError as e:
            raise ValueError(f"not JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"a seal is a JSON object, not {type(raw).__name__}")
        if raw.get("v") != SEAL_VERSION:
            raise ValueError(f"unsupported seal version {raw.get('v')!r} (this reader knows {SEAL_VERSION})")
        ints = ("number", "first_seq", "last_seq", "messages", "runs")
        strs = ("stream", "created", "heads_root", "sealed_at", "prev", "reason", "signer", "signature")
        wrong = [k for k in ints if not _is_int(raw.get(k))] + [k for k in strs if not isinstance(raw.get(k), str)]
        if wrong or not isinstance(raw.get("heads"), list):
            raise ValueError(f"missing or mistyped field(s): {', '.join(wrong or ['heads'])}")
        return cls(heads=tuple(Head.from_json(h) for h in raw["heads"]),
                   **{k: raw[k] for k in (*ints, *strs)})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


# -- the Merkle tree of the heads (RFC 6962, section 2.1) ----------------------------------------
@functools.lru_cache(maxsize=200_000)  # a seal recomputes the root over every head: most are unchanged
def leaf_hash(head: Head) -> bytes:
    """SHA-256(0x00 || canonical JSON of the head)."""
    return hashlib.sha256(b"\x00" + canonical_json(head.to_json())).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def _root(leaves: Sequence[bytes]) -> bytes:
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = _split(len(leaves))
    return _node(_root(leaves[:k]), _root(leaves[k:]))


def sorted_heads(heads: Iterable[Head]) -> list[Head]:
    """Heads in tree order: by subject (UTF-8 bytes)."""
    return sorted(heads, key=lambda h: h.subject.encode())


def _root_bottom_up(leaves: Sequence[bytes]) -> bytes:
    """The same tree hash as :func:`_root`, level by level (a last odd node moves up as it is):
    no recursion, no slices, for the whole set of heads on every seal."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    level = list(leaves)
    while len(level) > 1:
        paired = [_node(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def heads_root(heads: Iterable[Head]) -> str:
    """Merkle root (hex) of the heads sorted by subject; SHA-256 of nothing for no heads."""
    return _root_bottom_up([leaf_hash(h) for h in sorted_heads(heads)]).hex()


def inclusion_proof(heads: Iterable[Head], subject: str) -> list[str]:
    """The audit path (hex, leaf to root) proving ``subject``'s head is in :func:`heads_root`."""
    ordered = sorted_heads(heads)
    index = next((i for i, h in enumerate(ordered) if h.subject == subject), None)
    if index is None:
        raise KeyError(subject)
    leaves = [leaf_hash(h) for h in ordered]
    path: list[str] = []

    def walk(nodes: Sequence[bytes], m: int) -> None:
        if len(nodes) <= 1:
            return
        k = _split(len(nodes))
        if m < k:
            walk(nodes[:k], m)
            path.append(_root(nodes[k:]).hex())
        else:
            walk(nodes[k:], m - k)
            path.append(_root(nodes[:k]).hex())

    walk(leaves, index)
    return path


def verify_inclusion(head: Head, index: int, size: int, proof: Sequence[str], root: str) -> bool:
    """RFC 9162 section 2.1.3.2: does ``proof`` lead from ``head`` (at ``index`` of ``size``) to ``root``?"""
    if not 0 <= index < size:
        return False
    fn, sn = index, size - 1
    node = leaf_hash(head)
    for step in proof:
        sibling = bytes.fromhex(step)
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            node = _node(sibling, node)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            node = _node(node, sibling)
        fn >>= 1
        sn >>= 1
    return sn == 0 and node.hex() == root


# -- building heads from the stream ------------------------------------------------------------
def _log_name(subject: str) -> str:
    """A run's head is per run log: a commit's subject (``il.evt.{tenant}.{run}.{writer}.{route}``)
    names its log (``il.evt.{tenant}.{run}``); any other subject is its own."""
    try:
        return s.log_of(subject)
    except s.SubjectError:
        return subject


class HeadScanner:
    """Folds a stream's commits (in stream order) into the run heads.

    ``wanted``: subject -> event seq; for those subjects the head kept is the event with that seq
    when the log holds it (so a re-created stream's run can be compared with its sealed head even
    if it grew since), else the last event. Undecodable messages are skipped and listed."""

    def __init__(self, wanted: Mapping[str, int] | None = None) -> None:
        self.heads: dict[str, Head] = {}
        self.wanted = dict(wanted or {})
        self.undecodable: list[int] = []
        self.messages = 0
        self.last_seq = 0

    def add(self, stream_seq: int, subject: str, envelopes: Any) -> None:
        self.messages += 1
        self.last_seq = max(self.last_seq, stream_seq)
        events = [e for e in envelopes if isinstance(e, dict)] if isinstance(envelopes, list) else []
        last = events[-1] if events else None
        if last is None or not _is_int(last.get("seq")) or not isinstance(last.get("hash"), str):
            self.undecodable.append(stream_seq)
            return
        subject = _log_name(subject)
        want = self.wanted.get(subject)
        held = self.heads.get(subject)
        if want is not None and held is not None and held.seq == want:
            return  # found the sealed event already: keep it
        if want is not None:
            for e in events:
                if e.get("seq") == want and isinstance(e.get("hash"), str):
                    self.heads[subject] = Head(subject, stream_seq, want, e["hash"])
                    return
        self.heads[subject] = Head(subject, stream_seq, last["seq"], last["hash"])


def next_seal(previous: Seal | None, full: Mapping[str, Head], changed: Iterable[Head], state: StreamState,
              *, sealed_at: str, reason: str, signer: SealSigner) -> tuple[Seal, dict[str, Head]]:
    """The seal after ``previous`` (None: the first) for ``state``, given the heads before
    (``full``) and those that changed since; returns it signed and the new full set."""
    heads = dict(full)
    delta = {h.subject: h for h in changed}
    heads.update(delta)
    seal = Seal(
        number=(previous.number + 1) if previous else 1, stream=state.stream, created=state.created,
        first_seq=state.first_seq, last_seq=state.last_seq, messages=state.messages, runs=len(heads),
        heads_root=heads_root(heads.values()),
        heads=tuple(sorted_heads(heads.values() if previous is None else delta.values())),
        sealed_at=sealed_at, prev=previous.hash if previous else GENESIS, reason=reason,
    )
    return seal.signed(signer), heads


# -- checking ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SealProblem:
    """One thing the stream or the seals do not agree on. ``seal``: the seal's number;
    ``stream_seq``: the stream sequence it is about (if one); ``subject``: the run's subject."""

    kind: str
    message: str
    seal: int | None = None
    stream_seq: int | None = None
    subject: str | None = None

    def __str__(self) -> str:
        where = f"seal #{self.seal}" if self.seal is not None else "seals"
        if self.stream_seq is not None:
            where += f", stream seq {self.stream_seq}"
        return f"{where}: {self.kind}: {self.message}"


@dataclass
class SealChain:
    """A verified chain of seals: the latest good seal and the whole set of heads it seals."""

    latest: Seal | None = None
    heads: dict[str, Head] = field(default_factory=dict)
    problems: list[SealProblem] = field(default_factory=list)
    count: int = 0


def fold_seals(seals: Iterable[Seal | ValueError], verify: Verify) -> SealChain:
    """Check a chain of seals in order and rebuild the heads they seal. A seal that fails (bad
    signature, wrong prev or number, a digest that does not match) is reported and ends the
    chain: what it and later seals say cannot be trusted, so ``latest`` is the last good one."""
    chain = SealChain()
    for item in seals:
        chain.count += 1
        if isinstance(item, ValueError):
            chain.problems.append(SealProblem(SEAL_MALFORMED, f"seal {chain.count} is not a seal: {item}"))
            break
        seal, latest = item, chain.latest
        if not seal.signature_ok(verify):
            chain.problems.append(SealProblem(
                SEAL_SIGNATURE, f"the signature by {seal.signer or '(no signer)'} does not verify: the seal was "
                "forged or altered, or its key is not trusted to seal", seal.number))
            break
        expected_prev = latest.hash if latest else GENESIS
        expected_number = latest.number + 1 if latest else 1
        if seal.prev != expected_prev or seal.number != expected_number:
            chain.problems.append(SealProblem(
                SEAL_CHAIN, f"seal #{seal.number} (prev {seal.prev[:12]}…) does not follow "
                f"{f'seal #{latest.number} ({expected_prev[:12]}…)' if latest else 'the start of the chain'}: "
                "a seal is missing, reordered or from another chain", seal.number))
            break
        heads = dict(chain.heads) if latest else {}
        heads.update({h.subject: h for h in seal.heads})
        if len(heads) != seal.runs or heads_root(heads.values()) != seal.heads_root:
            chain.problems.append(SealProblem(
                SEAL_DIGEST, f"its {len(seal.heads)} heads, applied to the previous seal's, give {len(heads)} runs "
                f"with another root than the signed {seal.runs} runs / {seal.heads_root[:12]}…", seal.number))
            break
        chain.latest, chain.heads = seal, heads
    return chain


def _listed(seqs: Sequence[int]) -> str:
    shown = ", ".join(str(x) for x in seqs[:MAX_LISTED])
    return shown + (f" and {len(seqs) - MAX_LISTED} more" if len(seqs) > MAX_LISTED else "")


def check_stream(seal: Seal, state: StreamState) -> list[SealProblem]:
    """The stream as a whole against a seal: re-created, truncated, purged, messages deleted."""
    n = seal.number
    problems: list[SealProblem] = []
    if state.stream != seal.stream:
        return [SealProblem(SEAL_MALFORMED, f"the seal is of stream {seal.stream}, not {state.stream}", n)]
    recreated = state.created != seal.created
    if recreated:
        problems.append(SealProblem(
            STREAM_RECREATED, f"{state.stream} was deleted and created again: the sealed stream was created at "
            f"{seal.created}, this one at {state.created}", n))
    if state.last_seq < seal.last_seq:
        problems.append(SealProblem(
            STREAM_TRUNCATED, f"{state.stream} ends at seq {state.last_seq}, but the seal covers seqs "
            f"{seal.first_seq}..{seal.last_seq} ({seal.messages} messages)", n, state.last_seq + 1))
    if recreated:
        return problems  # sequences of another stream: the runs' heads say what was lost
    if seal.messages and state.first_seq > seal.first_seq:
        gone_to = min(state.first_seq - 1, seal.last_seq)
        problems.append(SealProblem(
            STREAM_PURGED, f"{state.stream} now starts at seq {state.first_seq}: sealed seqs "
            f"{seal.first_seq}..{gone_to} are gone", n, seal.first_seq))
    start = max(state.first_seq, seal.first_seq)
    end = min(state.last_seq, seal.last_seq)
    deleted = [d for d in state.deleted if start <= d <= end]
    span = max(0, end - start + 1)
    held = span - (len(deleted) if state.deleted else min(state.num_deleted, span))
    # what the seal held in start..end (truncation and a purged head are reported above)
    sealed_held = (seal.messages - max(0, min(seal.last_seq, start - 1) - seal.first_seq + 1)
                   - max(0, seal.last_seq - max(end, start - 1)))
    if held < sealed_held:
        which = f" (deleted: seq {_listed(deleted)})" if deleted else ""
        problems.append(SealProblem(
            MESSAGES_DELETED, f"{sealed_held - held} of the messages the seal covers in seqs {start}..{end} are "
            f"gone{which}", n, deleted[0] if deleted else None))
    return problems


def check_heads(seal: Seal, sealed: Mapping[str, Head], observed: Mapping[str, Head], *, recreated: bool,
                subjects: Iterable[str] | None = None) -> list[SealProblem]:
    """Each sealed run's head against what the stream holds for it now.

    ``observed``: per subject, the head found for it at the seal point (its last commit up to
    the seal's last seq; in a re-created stream, the event with the sealed seq if present, else
    its last). ``subjects``: check only these runs (a run-level verify)."""
    n = seal.number
    problems: list[SealProblem] = []
    names = sorted(sealed) if subjects is None else sorted(set(subjects))
    for subject in names:
        want = sealed.get(subject)
        got = observed.get(subject)
        if want is None:
            if got is not None and not recreated and got.stream_seq <= seal.last_seq:
                problems.append(SealProblem(
                    RUN_INSERTED, f"{subject} has a commit at stream seq {got.stream_seq}, before the seal point "
                    f"{seal.last_seq}, but the seal has no head for it", n, got.stream_seq, subject))
            continue
        at = f"event seq {want.seq} at stream seq {want.stream_seq} (hash {want.hash[:12]}…)"
        if got is None:
            problems.append(SealProblem(
                RUN_DELETED, f"{subject}: the log is gone; the seal has its head at {at}", n, want.stream_seq,
                subject))
        elif got.seq < want.seq:
            problems.append(SealProblem(
                RUN_ROLLED_BACK, f"{subject}: the log ends at event seq {got.seq} (stream seq {got.stream_seq}), "
                f"the seal has its head at {at}: events {got.seq + 1}..{want.seq} are gone", n, want.stream_seq,
                subject))
        elif got.seq > want.seq or got.hash != want.hash:
            problems.append(SealProblem(
                RUN_REWRITTEN, f"{subject}: event seq {got.seq} (stream seq {got.stream_seq}) has hash "
                f"{got.hash[:12]}…, the seal has its head at {at}", n, want.stream_seq, subject))
        elif not recreated and got.stream_seq != want.stream_seq:
            problems.append(SealProblem(
                RUN_MOVED, f"{subject}: the sealed head event is at stream seq {got.stream_seq}, the seal has "
                f"{at}", n, want.stream_seq, subject))
    if subjects is None:
        for subject in sorted(set(observed) - set(sealed)):
            got = observed[subject]
            if recreated or got.stream_seq <= seal.last_seq:
                problems.append(SealProblem(
                    RUN_INSERTED, f"{subject} has a commit at stream seq {got.stream_seq}"
                    f"{'' if recreated else f', before the seal point {seal.last_seq},'} but the seal has no head "
                    "for it", n, got.stream_seq, subject))
    return problems


MAX_PER_KIND = 100  # run problems of one kind listed one by one; the rest are counted


def capped(problems: Sequence[SealProblem], limit: int = MAX_PER_KIND) -> list[SealProblem]:
    """At most ``limit`` problems of each kind, then one that counts the rest (a purged stream of
    100,000 runs is one story, not 100,000 lines)."""
    kept: list[SealProblem] = []
    seen: dict[str, int] = {}
    for problem in problems:
        seen[problem.kind] = seen.get(problem.kind, 0) + 1
        if seen[problem.kind] <= limit:
            kept.append(problem)
    for kind, count in seen.items():
        if count > limit:
            seal = next(p.seal for p in problems if p.kind == kind)
            kept.append(SealProblem(kind, f"and {count - limit} more runs with this problem ({count} in all)", seal))
    return kept


def check_against_seal(seal: Seal, sealed: Mapping[str, Head], state: StreamState, observed: Mapping[str, Head],
                       *, subjects: Iterable[str] | None = None) -> list[SealProblem]:
    """Everything :func:`check_stream` and :func:`check_heads` find (see both), run problems
    :func:`capped`."""
    recreated = state.stream == seal.stream and state.created != seal.created
    return [*check_stream(seal, state),
            *capped(check_heads(seal, sealed, observed, recreated=recreated, subjects=subjects))]


def wanted_seqs(sealed: Mapping[str, Head]) -> dict[str, int]:
    """For :class:`HeadScanner`: the sealed event seq of every sealed subject."""
    return {subject: head.seq for subject, head in sealed.items()}


__all__ = [
    "GENESIS",
    "MESSAGES_DELETED",
    "RUN_DELETED",
    "RUN_INSERTED",
    "RUN_MOVED",
    "RUN_REWRITTEN",
    "RUN_ROLLED_BACK",
    "SEAL_CHAIN",
    "SEAL_DIGEST",
    "SEAL_MALFORMED",
    "SEAL_SIGNATURE",
    "SEAL_VERSION",
    "STREAM_PURGED",
    "STREAM_RECREATED",
    "STREAM_TRUNCATED",
    "Head",
    "HeadScanner",
    "Seal",
    "SealChain",
    "SealProblem",
    "SealSigner",
    "StreamState",
    "Verify",
    "capped",
    "check_against_seal",
    "check_heads",
    "check_stream",
    "fold_seals",
    "heads_root",
    "inclusion_proof",
    "leaf_hash",
    "next_seal",
    "sorted_heads",
    "verify_inclusion",
    "wanted_seqs",
]
