"""Dead letters stay within the stream's message size, whatever the original's size."""

from __future__ import annotations

import base64
import hashlib
from types import SimpleNamespace

import pytest
from nats.js.errors import BadRequestError

from interlock.contracts import subjects as s
from interlock.core.topology import STREAMS
from interlock.runtime.consumer import MAX_UNHANDLED_DELIVERIES, PullConsumer
from interlock.runtime.deadletter import DATA_PREFIX_LIMIT, letter_for, read_letter
from interlock.runtime.service import Service


def test_a_small_original_is_kept_whole_with_its_size_and_hash() -> None:
    letter = letter_for("planner", s.trigger("acme", "wf"), b"not json", "invalid trigger")
    assert base64.b64decode(letter.data_b64) == b"not json"
    assert (letter.size, letter.sha256, letter.truncated) == (8, hashlib.sha256(b"not json").hexdigest(), False)


def test_a_large_original_keeps_a_bounded_prefix_its_size_and_hash() -> None:
    data = b"x" * (3900 * 1024)
    letter = letter_for("planner", s.trigger("acme", "wf"), data, "r" * 10_000, {"h": "v" * 100_000})
    assert letter.truncated and letter.size == len(data)
    assert letter.sha256 == hashlib.sha256(data).hexdigest()
    assert base64.b64decode(letter.data_b64) == data[:DATA_PREFIX_LIMIT]
    limit = next(spec.max_msg_size for spec in STREAMS if spec.name == s.DLQ_STREAM)
    assert len(letter.model_dump_json().encode()) < limit


class _Msg:
    subject = s.trigger("acme", "wf")
    data = b"x" * 10
    headers: dict[str, str] = {}

    class metadata:  # mirrors nats.aio.msg.Msg.metadata
        class sequence:
            stream = 7

    def __init__(self) -> None:
        self.settled: list[str] = []

    async def ack(self) -> None:
        self.settled.append("ack")

    async def term(self) -> None:
        self.settled.append("term")


class _RefusingJetStream:
    async def publish(self, *args: object, **kwargs: object) -> None:
        raise BadRequestError(code=400, err_code=10054, description="message size exceeds maximum allowed")


async def test_a_message_whose_dead_letter_cannot_be_stored_is_terminated_not_redelivered() -> None:
    msg = _Msg()
    service = SimpleNamespace(js=_RefusingJetStream(), name="planner")
    await Service._dead_letter(service, msg, "invalid trigger")  # type: ignore[arg-type]
    assert msg.settled == ["term"]


def test_a_foreign_message_on_a_dead_letter_subject_reads_as_an_unreadable_entry() -> None:
    entry = read_letter(s.dead_letter("planner"), b"\xff not a dead letter", 42)
    assert entry.service == "planner" and entry.subject == s.dead_letter("planner")
    assert "unreadable dead letter (stream seq 42, 19 bytes): (body): Invalid JSON" in entry.reason
    assert entry.size == 19 and base64.b64decode(entry.data_b64) == b"\xff not a dead letter"
    letter = letter_for("planner", s.trigger("acme", "wf"), b"x", "invalid trigger")
    assert read_letter(s.dead_letter("planner"), letter.model_dump_json().encode(), 43) == letter


class _Delivered(_Msg):
    def __init__(self, delivered: int) -> None:
        super().__init__()
        self.metadata = SimpleNamespace(num_delivered=delivered, sequence=SimpleNamespace(stream=7))  # type: ignore[assignment]


@pytest.mark.parametrize(("delivered", "settled"), [(1, []), (MAX_UNHANDLED_DELIVERIES - 1, []),
                                                    (MAX_UNHANDLED_DELIVERIES, ["term"])])
async def test_a_message_whose_handler_keeps_raising_is_terminated_after_a_bound(delivered: int,
                                                                                 settled: list[str]) -> None:
    async def failing(msg: object) -> None:
        raise RuntimeError("a bug outside the handler's own error handling")

    consumer = PullConsumer(None, None, stream=s.TRIGGERS_STREAM, durable="d", subject=s.TRIGGERS_ALL,  # type: ignore[arg-type]
                            handler=failing)
    msg = _Delivered(delivered)
    await consumer._handle(msg)  # type: ignore[arg-type]
    assert msg.settled == settled


# -- resolve and replay -------------------------------------------------------------------------
def test_replay_publishes_the_original_to_its_subject_without_its_old_message_id() -> None:
    from interlock.contracts import headers as h
    from interlock.contracts import subjects as s
    from interlock.runtime.deadletter import replay_of

    original = b'{"job_id": "j1"}'
    letter = letter_for("dispatcher", s.result("acme", "r1"), original, "boom",
                        {h.MSG_ID: "result:j1", h.TRACEPARENT: "00-abc-def-01"})
    subject, data, headers = replay_of(letter, True, 12)
    assert (subject, data) == (s.result("acme", "r1"), original)
    assert headers == {h.TRACEPARENT: "00-abc-def-01", h.REPLAY_OF: "12"}  # the caller adds the new id


@pytest.mark.parametrize("subject", [s.run_events("acme", "r1"), s.command("acme", "approve", "bob")],
                         ids=["run event", "command"])
def test_replay_refuses_what_must_not_be_published_again(subject: str) -> None:
    from interlock.runtime.deadletter import CannotReplay, replay_of

    with pytest.raises(CannotReplay, match="not a queue a replay may publish to"):
        replay_of(letter_for("planner", subject, b"{}", "x"), True, 3)
    with pytest.raises(CannotReplay, match="keeps only the first"):
        replay_of(letter_for("planner", s.trigger("acme", "wf"), b"x" * (DATA_PREFIX_LIMIT + 1), "x"), True, 3)
    with pytest.raises(CannotReplay, match="not a dead letter"):
        replay_of(letter_for("planner", s.dead_letter("planner"), b"junk", "x"), False, 3)


def test_actions_are_appended_never_replaced_and_each_replay_has_its_own_id() -> None:
    from datetime import UTC, datetime

    from interlock.contracts.messages import DeadLetterAction
    from interlock.runtime.deadletter import replay_msg_id, status_of, with_action

    at = datetime(2026, 12, 2, tzinfo=UTC)
    assert status_of(None) == "open" and replay_msg_id(5, None) == "dlq-replay:5:1"
    replayed = with_action(None, 5, DeadLetterAction(action="replayed", by="ann", at=at, msg_id="dlq-replay:5:1"))
    assert replay_msg_id(5, replayed) == "dlq-replay:5:2"
    resolved = with_action(replayed, 5, DeadLetterAction(action="resolved", by="bob", at=at, note="done"))
    assert status_of(resolved) == "resolved" and [a.by for a in resolved.actions] == ["ann", "bob"]
    assert replay_msg_id(5, resolved) == "dlq-replay:5:2"  # a resolve is not a replay
