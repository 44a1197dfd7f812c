"""Sealed heads on the bus: reading a stream's state and commits, taking seals, checking against them.

- :class:`Sealer` (the auditor's): keeps the chain's latest seal and every run's head in memory,
  and on each :meth:`Sealer.seal` reads only the commits appended since the latest seal, so a
  seal costs what the stream grew by. A seal always covers a contiguous prefix of the stream
  (up to its ``last_seq``), read from the stream itself, not from a consumer that may deliver
  out of order. Before sealing it checks the stream against the latest seal: a stream that was
  truncated, purged or re-created is reported and never sealed over.
- :func:`verify_stream` (``interlock audit verify``): the stream and every run against the
  latest seal (IL_SEALS, or an exported file); :func:`verify_run_heads` one run's commits.

Reads are batched direct gets (the auditor and admin credentials may make them).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import Header

from interlock.contracts import headers as h
from interlock.contracts import permissions as p
from interlock.contracts import subjects as s
from interlock.core import codec
from interlock.core import seal as sl
from interlock.core.eventstore import EventStoreError
from interlock.identity import Keyring, verify_signature

log = logging.getLogger(__name__)

INTERVAL_ENV = "INTERLOCK_SEAL_INTERVAL_S"
DEFAULT_INTERVAL_S = 60.0
MAX_HEADS_PER_SEAL = 4000  # ~170 bytes each: a seal stays well under the server's 1 MB max payload
PAGE = 10_000
REQUEST_TIMEOUT = 5.0
NO_SEAL_STREAM = 10059  # "stream not found"

_STATUS = Header.STATUS.value
_DESCRIPTION = Header.DESCRIPTION.value


class SealError(EventStoreError):
    """A seal could not be read, taken or stored."""


class StreamMissing(SealError):
    """The stream to read does not exist."""


SEALER_ROLE = "auditor"
"""The role whose keys may sign seals."""


def seal_verifier(keyring: Keyring | None, *, also: str | None = None) -> sl.Verify:
    """A seal's signature must be Ed25519 by a key the keyring holds for the auditor role, not
    revoked (``also``: one more key id to accept, an auditor's own). ``keyring`` None: any key
    whose signature verifies is accepted (integrity only: for a copy with no keyring at hand)."""
    def verify(key_id: str, data: bytes, signature: bytes) -> bool:
        if keyring is not None and key_id != also:
            entry = keyring.get(key_id)
            if entry is None or entry.role != SEALER_ROLE or not entry.valid_at(None):
                return False
        return verify_signature(key_id, data, signature)
    return verify


# -- reading -----------------------------------------------------------------------------------
async def stream_state(nc: NATS, stream: str = s.EVENTS_STREAM) -> sl.StreamState:
    """The stream's creation time, sequences, message count and deleted sequences."""
    request = json.dumps({"deleted_details": True}).encode()
    try:
        reply = await nc.request(p.js_stream_info(stream), request, timeout=REQUEST_TIMEOUT)
    except nats.errors.TimeoutError:
        raise SealError(f"no answer to stream info of {stream} within {REQUEST_TIMEOUT:g}s (is the credential "
                        "allowed to ask?)") from None
    info = json.loads(reply.data)
    if "error" in info:
        raise SealError(f"stream info of {stream}: {info['error'].get('description', info['error'])}")
    st = info.get("state", {})
    return sl.StreamState(stream=stream, created=str(info.get("created", "")), first_seq=int(st.get("first_seq", 0)),
                          last_seq=int(st.get("last_seq", 0)), messages=int(st.get("messages", 0)),
                          num_deleted=int(st.get("num_deleted", 0)),
                          deleted=tuple(sorted(int(x) for x in st.get("deleted") or ())))


async def read_range(nc: NATS, stream: str, subjects: str, start: int, end: int | None = None
                     ) -> AsyncIterator[tuple[int, str, bytes]]:
    """(stream seq, subject, data) of every message on ``subjects`` from ``start`` to ``end``
    (inclusive; None: to the end), in order, by batched direct gets."""
    replies: asyncio.Queue[list[Msg]] = asyncio.Queue()
    batch: list[Msg] = []

    async def collect(msg: Msg) -> None:  # a whole batch is handed on at once (no wait per message)
        batch.append(msg)
        if (msg.headers or {}).get(_STATUS):
            replies.put_nowait(batch.copy())
            batch.clear()

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=collect)
    try:
        seq = max(1, start)
        while end is None or seq <= end:
            size = PAGE if end is None else min(PAGE, end - seq + 1)
            request = json.dumps({"seq": seq, "next_by_subj": subjects, "batch": size}).encode()
            await nc.publish(s.js_direct_get(stream), request, reply=inbox)
            try:
                msgs = await asyncio.wait_for(replies.get(), timeout=REQUEST_TIMEOUT)
            except TimeoutError:
                raise SealError(f"direct get of {stream} from seq {seq}: no answer within {REQUEST_TIMEOUT:g}s "
                                "(is the credential allowed to read it?)") from None
            *found, last_msg = msgs
            status = (last_msg.headers or {}).get(_STATUS)
            if status == "503":
                raise StreamMissing(f"{stream}: no stream answers direct gets (it does not exist)")
            if status not in ("204", "404"):
                raise SealError(f"direct get of {stream} from seq {seq} failed: {status} "
                                f"{(last_msg.headers or {}).get(_DESCRIPTION, '')}")
            last = 0
            for msg in found:
                headers = msg.headers or {}
                last = int(headers[h.SEQUENCE])
                if end is not None and last > end:
                    return
                yield last, headers.get(h.SUBJECT, ""), msg.data
            if status == "404" or not last or (end is not None and last >= end):
                return
            seq = last + 1
    finally:
        await sub.unsubscribe()


def _envelopes(data: bytes) -> Any:
    try:
        return codec.decode_commit_raw(data)["events"]
    except ValueError:
        return None  # undecodable: the scanner lists it, a head stays where it was


async def scan_heads(nc: NATS, start: int, end: int | None, scanner: sl.HeadScanner | None = None,
                     stream: str = s.EVENTS_STREAM) -> sl.HeadScanner:
    """Fold the stream's run commits from ``start`` to ``end`` into ``scanner`` (a new one if None)."""
    scanner = scanner or sl.HeadScanner()
    async for seq, subject, data in read_range(nc, stream, s.EVENTS_ALL, start, end):
        scanner.add(seq, subject, _envelopes(data))
    return scanner


@dataclass
class StoredSeals:
    """A stream's seal chain as stored: the seals (or why one is not), and the stream seq of the
    last one in IL_SEALS (the expected sequence of the next append)."""

    seals: list[sl.Seal | ValueError] = field(default_factory=list)
    last_stream_seq: int = 0


def _parse(data: bytes) -> sl.Seal | ValueError:
    try:
        return sl.Seal.decode(data)
    except ValueError as e:
        return e


async def read_seals(nc: NATS, stream: str = s.EVENTS_STREAM) -> StoredSeals:
    """Every stored seal of ``stream``, in order (none when IL_SEALS does not exist)."""
    stored = StoredSeals()
    try:
        async for seq, _, data in read_range(nc, s.SEALS_STREAM, s.seals(stream), 1):
            stored.seals.append(_parse(data))
            stored.last_stream_seq = seq
    except StreamMissing:
        pass
    return stored


def load_seal_file(path: Path) -> list[sl.Seal | ValueError]:
    """An exported seal file (one seal per line, ``interlock audit seal export``)."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise SealError(f"{path}: cannot read the seal file ({e.strerror})") from None
    seals = [_parse(line) for line in lines if line.strip()]
    for number, item in enumerate(seals, start=1):
        if isinstance(item, ValueError):
            seals[number - 1] = ValueError(f"{path} line {number}: {item}")
    return seals


# -- checking ----------------------------------------------------------------------------------
@dataclass
class SealReport:
    """The stream (or one run) against the latest good seal. ``seal`` None: nothing was sealed
    yet (or no seal could be read: see ``note``)."""

    seal: sl.Seal | None
    problems: list[sl.SealProblem] = field(default_factory=list)
    seals: int = 0
    runs_checked: int = 0
    source: str = s.SEALS_STREAM
    note: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "source": self.source, "seals": self.seals, "runs_checked": self.runs_checked,
                "seal": self.seal.number if self.seal else None, "last_seq": self.seal.last_seq if self.seal else None,
                "note": self.note, "problems": [{"kind": x.kind, "message": x.message, "seal": x.seal,
                                                 "stream_seq": x.stream_seq, "subject": x.subject}
                                                for x in self.problems]}


def render_seal_report(report: SealReport) -> str:
    """Human-readable: one line when the stream agrees with its latest seal, else one per problem."""
    if report.seal is None:
        head = f"seals ({report.source}): {report.note or 'no seal yet: nothing to check against'}"
        return "\n".join([head, *(f"  {x}" for x in report.problems)])
    seal = report.seal
    where = (f"seals ({report.source}): {report.seals} seal{'s' if report.seals != 1 else ''}, latest #{seal.number} "
             f"of {seal.stream} up to seq {seal.last_seq} ({seal.runs} runs, sealed {seal.sealed_at})")
    if report.ok:
        return f"{where}: agrees ({report.runs_checked} run head{'s' if report.runs_checked != 1 else ''} checked)"
    count = len(report.problems)
    return "\n".join([f"{where}: {count} problem{'s' if count != 1 else ''}", *(f"  {x}" for x in report.problems)])


async def _chain(nc: NATS, verify: sl.Verify, seals: Sequence[sl.Seal | ValueError] | None,
                 source: str) -> tuple[sl.SealChain, str]:
    if seals is None:
        seals = (await read_seals(nc)).seals
    return sl.fold_seals(seals, verify), source


async def verify_stream(nc: NATS, verify: sl.Verify, *, seals: Sequence[sl.Seal | ValueError] | None = None,
                        source: str = s.SEALS_STREAM) -> SealReport:
    """``IL_EVENTS`` and every run in it against the latest good seal (of ``seals``, else IL_SEALS)."""
    chain, source = await _chain(nc, verify, seals, source)
    report = SealReport(chain.latest, list(chain.problems), chain.count, source=source)
    if chain.latest is None:
        return report
    seal = chain.latest
    state = await stream_state(nc)
    recreated = state.created != seal.created
    # the seal point of the sealed stream, or all of a re-created one (compared by content)
    end = state.last_seq if recreated else min(seal.last_seq, state.last_seq)
    scanner = await scan_heads(nc, 1, end, sl.HeadScanner(sl.wanted_seqs(chain.heads)))
    report.problems += sl.check_against_seal(seal, chain.heads, state, scanner.heads)
    report.runs_checked = len(chain.heads)
    return report


def run_head(commits: Iterable[tuple[int, Any]], subject: str, sealed: sl.Head | None, *, end: int | None
             ) -> sl.Head | None:
    """One run's head as :func:`check_heads` wants it, from its commits ((stream seq, envelopes))."""
    scanner = sl.HeadScanner({subject: sealed.seq} if sealed else None)
    for seq, envelopes in commits:
        if end is None or seq <= end:
            scanner.add(seq, subject, envelopes)
    return scanner.heads.get(subject)


async def verify_run_heads(nc: NATS, verify: sl.Verify, subject: str, commits: Sequence[tuple[int, Any]], *,
                           seals: Sequence[sl.Seal | ValueError] | None = None, source: str = s.SEALS_STREAM,
                           ) -> SealReport:
    """One run's commits (and the stream as a whole) against the latest good seal."""
    chain, source = await _chain(nc, verify, seals, source)
    report = SealReport(chain.latest, list(chain.problems), chain.count, source=source)
    if chain.latest is None:
        return report
    seal = chain.latest
    state = await stream_state(nc)
    recreated = state.created != seal.created
    sealed = chain.heads.get(subject)
    got = run_head(commits, subject, sealed, end=None if recreated else seal.last_seq)
    observed = {subject: got} if got else {}
    report.problems += sl.check_against_seal(seal, chain.heads, state, observed, subjects=[subject])
    report.runs_checked = 1
    return report


def verify_run_offline(subject: str, commits: Sequence[tuple[int, Any]], seals: Sequence[sl.Seal | ValueError],
                       verify: sl.Verify, *, source: str) -> SealReport:
    """An exported run's commits against a seal file, with no server: its head only (the stream's
    state is not in an export)."""
    chain = sl.fold_seals(seals, verify)
    report = SealReport(chain.latest, list(chain.problems), chain.count, source=source,
                        note="offline: the run's head only (the stream itself is checked online)")
    if chain.latest is None:
        return report
    sealed = chain.heads.get(subject)
    got = run_head(commits, subject, sealed, end=chain.latest.last_seq)
    report.problems += sl.check_heads(chain.latest, chain.heads, {subject: got} if got else {}, recreated=False,
                                      subjects=[subject])
    report.runs_checked = 1
    return report


# -- sealing -----------------------------------------------------------------------------------
def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class Sealer:
    """Takes the seals of ``IL_EVENTS`` for one auditor: see the module docstring.

    ``verify`` checks the stored chain when it is loaded (a chain that does not verify is not
    extended: :attr:`problems` says why)."""

    def __init__(self, nc: NATS, signer: sl.SealSigner, verify: sl.Verify, *, stream: str = s.EVENTS_STREAM,
                 max_heads: int = MAX_HEADS_PER_SEAL) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.signer = signer
        self.verify = verify
        self.stream = stream
        self.max_heads = max_heads
        self.latest: sl.Seal | None = None
        self.heads: dict[str, sl.Head] = {}
        self.problems: list[sl.SealProblem] = []
        self._stored_seq = 0
        self._loaded = False
        self._lock = asyncio.Lock()

    async def load(self) -> None:
        """Read and check the stored chain (the latest seal and every head it seals)."""
        stored = await read_seals(self.nc, self.stream)
        chain = sl.fold_seals(stored.seals, self.verify)
        self.latest, self.heads, self._stored_seq = chain.latest, chain.heads, stored.last_stream_seq
        self.problems = list(chain.problems)
        self._loaded = True

    async def seal(self, reason: str = "interval") -> list[sl.Seal]:
        """Seal what the stream holds now (nothing when it did not grow); the seals stored.

        A stream that disagrees with the latest seal is not sealed: the problems are logged as
        errors and kept in :attr:`problems`, and every later call reports them again."""
        async with self._lock:
            if not self._loaded or self.problems:
                # (again after a problem: once an admin accepted a re-created stream by exporting
                # and then removing the old chain, the next seal starts a new one)
                await self.load()
            if self.problems:
                for problem in self.problems:
                    log.error("seals: not sealing %s: %s", self.stream, problem)
                return []
            state = await stream_state(self.nc, self.stream)
            if self.latest is not None:
                problems = sl.check_stream(self.latest, state)
                if problems:
                    self.problems = problems
                    for problem in problems:
                        log.error("seals: %s disagrees with its latest seal: %s", self.stream, problem)
                    return []
                if state.last_seq <= self.latest.last_seq:
                    return []
            start = self.latest.last_seq + 1 if self.latest else 1
            return await self._seal_up_to(state, start, reason)

    async def _seal_up_to(self, state: sl.StreamState, start: int, reason: str) -> list[sl.Seal]:
        stored: list[sl.Seal] = []
        scanner = sl.HeadScanner()
        messages = self.latest.messages if self.latest else 0
        async for seq, subject, data in read_range(self.nc, self.stream, s.EVENTS_ALL, start, state.last_seq):
            scanner.add(seq, subject, _envelopes(data))
            if len(scanner.heads) >= self.max_heads:
                messages += scanner.messages
                stored.append(await self._store(state, scanner, seq, messages, reason))
                scanner = sl.HeadScanner()
        messages += scanner.messages
        if scanner.messages or not stored:
            stored.append(await self._store(state, scanner, state.last_seq, messages, reason))
        return stored

    async def _store(self, state: sl.StreamState, scanner: sl.HeadScanner, last_seq: int, messages: int,
                     reason: str) -> sl.Seal:
        point = sl.StreamState(state.stream, state.created, state.first_seq, last_seq, messages)
        seal, heads = sl.next_seal(self.latest, self.heads, scanner.heads.values(), point, sealed_at=_now(),
                                   reason=reason, signer=self.signer)
        headers = {h.MSG_ID: f"seal:{seal.hash}", h.EXPECTED_LAST_SUBJECT_SEQ: str(self._stored_seq)}
        try:
            ack = await self.js.publish(s.seals(self.stream), seal.encode(), headers=headers, timeout=REQUEST_TIMEOUT)
        except Exception as e:
            # another auditor copy sealed first (wrong last sequence), or no ack: read the chain again
            self._loaded = False
            raise SealError(f"storing seal #{seal.number} of {self.stream} failed: {e!r}") from e
        self.latest, self.heads, self._stored_seq = seal, heads, ack.seq
        log.info("seals: sealed %s up to seq %s (#%s, %s runs, %s)", self.stream, last_seq, seal.number, seal.runs,
                 reason)
        return seal


__all__ = [
    "DEFAULT_INTERVAL_S",
    "INTERVAL_ENV",
    "SealError",
    "SealReport",
    "Sealer",
    "StoredSeals",
    "StreamMissing",
    "load_seal_file",
    "read_range",
    "read_seals",
    "render_seal_report",
    "run_head",
    "scan_heads",
    "seal_verifier",
    "stream_state",
    "verify_run_heads", "verify_run_offline",
    "verify_stream",
]
