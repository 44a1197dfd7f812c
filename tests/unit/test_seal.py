"""Sealed heads, pure: encoding, signatures, the Merkle root, the chain, and every check."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import pytest

from interlock.contracts import subjects as s
from interlock.core import seal as sl
from interlock.core.seal import Head, Seal, StreamState
from interlock.identity import KeyKind, NKey
from interlock.identity._keys import verify as nkey_verify

CREATED = "2026-12-02T00:00:00.000000001Z"


class KeySigner:
    def __init__(self) -> None:
        self.key = NKey.generate(KeyKind.USER)
        self.key_id = self.key.public_key

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data)


SIGNER = KeySigner()


def trusted(key_id: str, data: bytes, signature: bytes) -> bool:
    return key_id == SIGNER.key_id and nkey_verify(key_id, data, signature)


def subject(i: int) -> str:
    return s.run_events("acme", f"run{i:03d}")


def head(i: int, stream_seq: int, seq: int) -> Head:
    return Head(subject(i), stream_seq, seq, hashlib.sha256(f"{i}/{seq}".encode()).hexdigest())


def state(last: int, *, first: int = 1, messages: int | None = None, created: str = CREATED,
          deleted: tuple[int, ...] = ()) -> StreamState:
    held = last - first + 1 if messages is None else messages
    return StreamState("IL_EVENTS", created, first, last, held, len(deleted), deleted)


def first_seal() -> tuple[Seal, dict[str, Head]]:
    # run 0: events 1..3 at stream seqs 1, 3, 5; run 1: events 1..2 at 2, 4; run 2: 1 at 6
    heads = [head(0, 5, 3), head(1, 4, 2), head(2, 6, 1)]
    return sl.next_seal(None, {}, heads, state(6), sealed_at="t1", reason="interval", signer=SIGNER)


def test_a_seal_round_trips_and_its_signature_covers_every_field() -> None:
    seal, _heads = first_seal()
    assert seal.number == 1 and seal.prev == sl.GENESIS and seal.runs == 3 and seal.signer == SIGNER.key_id
    back = Seal.decode(seal.encode())
    assert back == seal and back.signature_ok(trusted)
    changed: dict[str, Any] = {"last_seq": 5, "runs": 2, "heads_root": "0" * 64, "created": "x", "prev": "1" * 64}
    for name, value in changed.items():
        assert not dataclasses.replace(seal, **{name: value}).signature_ok(trusted), name
    forged = dataclasses.replace(seal, signature=seal.signature[:-4] + "AAAA")
    assert not forged.signature_ok(trusted)
    other = KeySigner()
    assert not dataclasses.replace(seal, signer="").signed(other).signature_ok(trusted)  # untrusted key


def test_decode_names_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="not JSON"):
        Seal.decode(b"{nope")
    with pytest.raises(ValueError, match="unsupported seal version"):
        Seal.decode(b'{"v": 9}')
    raw = json.loads(first_seal()[0].encode())
    del raw["last_seq"]
    with pytest.raises(ValueError, match="last_seq"):
        Seal.decode(json.dumps(raw))


def test_the_encoding_is_canonical_json_and_the_hash_is_sha256_of_the_body() -> None:
    seal, _ = first_seal()
    body = {k: v for k, v in json.loads(seal.encode()).items() if k != "signature"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert text == seal.signed_bytes()
    assert seal.hash == hashlib.sha256(text).hexdigest()


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13])
def test_merkle_inclusion_proofs_verify_and_a_changed_head_does_not(size: int) -> None:
    heads = [head(i, i + 1, 1) for i in range(size)]
    root = sl.heads_root(heads)
    for index, h in enumerate(sl.sorted_heads(heads)):
        proof = sl.inclusion_proof(heads, h.subject)
        assert sl.verify_inclusion(h, index, size, proof, root)
        assert not sl.verify_inclusion(dataclasses.replace(h, seq=2), index, size, proof, root)


def test_merkle_root_follows_rfc6962() -> None:
    a, b, c = (head(i, i, 1) for i in range(3))
    leaf = sl.leaf_hash
    node = lambda x, y: hashlib.sha256(b"\x01" + x + y).digest()  # noqa: E731
    assert sl.heads_root([]) == hashlib.sha256(b"").hexdigest()
    assert sl.heads_root([c, a, b]) == node(node(leaf(a), leaf(b)), leaf(c)).hex()


def test_the_chain_carries_only_changed_heads_and_folds_back_to_the_whole_set() -> None:
    one, heads = first_seal()
    two, heads2 = sl.next_seal(one, heads, [head(1, 7, 3), head(3, 8, 1)], state(8), sealed_at="t2",
                               reason="run_ended", signer=SIGNER)
    assert [h.subject for h in two.heads] == [subject(1), subject(3)] and two.runs == 4 and two.prev == one.hash
    chain = sl.fold_seals([one, two], trusted)
    assert chain.problems == [] and chain.latest == two and chain.heads == heads2


def test_a_forged_seal_ends_the_chain_at_the_last_good_one() -> None:
    one, heads = first_seal()
    two, _ = sl.next_seal(one, heads, [head(1, 7, 3)], state(7), sealed_at="t2", reason="interval", signer=SIGNER)
    forged = dataclasses.replace(two, last_seq=99)
    chain = sl.fold_seals([one, forged], trusted)
    assert chain.latest == one and [p.kind for p in chain.problems] == [sl.SEAL_SIGNATURE]
    assert "seal #2" in str(chain.problems[0])
    resigned = dataclasses.replace(two, heads_root="0" * 64).signed(SIGNER)
    assert [p.kind for p in sl.fold_seals([one, resigned], trusted).problems] == [sl.SEAL_DIGEST]
    assert [p.kind for p in sl.fold_seals([two], trusted).problems] == [sl.SEAL_CHAIN]  # seal 1 missing
    assert [p.kind for p in sl.fold_seals([one, ValueError("x")], trusted).problems] == [sl.SEAL_MALFORMED]


def observed(heads: dict[str, Head]) -> dict[str, Head]:
    return dict(heads)


def kinds(problems: list[sl.SealProblem]) -> list[str]:
    return [p.kind for p in problems]


def test_a_stream_that_only_grew_agrees_with_its_seal() -> None:
    seal, heads = first_seal()
    assert sl.check_against_seal(seal, heads, state(20), observed(heads)) == []


def test_truncation_is_reported_with_the_sequence() -> None:
    seal, _heads = first_seal()
    problems = sl.check_stream(seal, state(4))
    assert kinds(problems) == [sl.STREAM_TRUNCATED]
    assert problems[0].stream_seq == 5 and "ends at seq 4" in problems[0].message and "1..6" in problems[0].message


def test_a_purged_head_of_the_stream_is_reported() -> None:
    seal, _heads = first_seal()
    problems = sl.check_stream(seal, state(6, first=4))
    assert kinds(problems) == [sl.STREAM_PURGED] and "1..3 are gone" in problems[0].message


def test_deleted_messages_are_listed() -> None:
    seal, _heads = first_seal()
    problems = sl.check_stream(seal, state(9, messages=7, deleted=(2, 4)))
    assert kinds(problems) == [sl.MESSAGES_DELETED]
    assert "seq 2, 4" in problems[0].message and problems[0].stream_seq == 2
    # deleted after the seal point: not the seal's business
    assert sl.check_stream(seal, state(9, messages=8, deleted=(8,))) == []
    # the server gave only a count
    assert kinds(sl.check_stream(seal, StreamState("IL_EVENTS", CREATED, 1, 9, 7, 2))) == [sl.MESSAGES_DELETED]


def test_a_recreated_stream_is_reported_and_compared_by_content() -> None:
    seal, heads = first_seal()
    # the same runs copied into a new stream at other sequences: only the re-creation is reported
    moved = {s: dataclasses.replace(h, stream_seq=h.stream_seq + 100) for s, h in heads.items()}
    problems = sl.check_against_seal(seal, heads, state(200, created="later"), moved)
    assert kinds(problems) == [sl.STREAM_RECREATED] and CREATED in problems[0].message
    # re-created shorter: truncated too, and the runs it lost
    shorter = {subject(0): heads[subject(0)]}
    got = kinds(sl.check_against_seal(seal, heads, state(3, created="later"), shorter))
    assert got == [sl.STREAM_RECREATED, sl.STREAM_TRUNCATED, sl.RUN_DELETED, sl.RUN_DELETED]


def test_a_run_rolled_back_rewritten_or_deleted_is_reported_per_run() -> None:
    seal, heads = first_seal()
    now = observed(heads)
    now[subject(0)] = head(0, 3, 2)  # ends at event 2: event 3 rolled back
    now[subject(1)] = dataclasses.replace(heads[subject(1)], hash="f" * 64)
    del now[subject(2)]
    problems = sl.check_heads(seal, heads, now, recreated=False)
    assert kinds(problems) == [sl.RUN_ROLLED_BACK, sl.RUN_REWRITTEN, sl.RUN_DELETED]
    rolled = problems[0]
    assert rolled.subject == subject(0) and rolled.stream_seq == 5 and "events 3..3 are gone" in rolled.message
    assert str(rolled).startswith("seal #1, stream seq 5: run_rolled_back:")
    # a run-level check looks at its own run only
    assert kinds(sl.check_heads(seal, heads, now, recreated=False, subjects=[subject(1)])) == [sl.RUN_REWRITTEN]


def test_a_run_the_seal_does_not_know_before_the_seal_point_is_reported() -> None:
    seal, heads = first_seal()
    now = {**heads, subject(9): head(9, 3, 1)}
    assert kinds(sl.check_heads(seal, heads, now, recreated=False)) == [sl.RUN_INSERTED]
    later = {**heads, subject(9): head(9, 30, 1)}  # after the seal point: a new run
    assert sl.check_heads(seal, heads, later, recreated=False) == []


def test_the_scanner_keeps_the_sealed_event_when_the_run_grew() -> None:
    def env(seq: int) -> dict[str, object]:
        return {"seq": seq, "hash": f"h{seq}"}

    scan = sl.HeadScanner(wanted={"a": 2})
    scan.add(1, "a", [env(1), env(2)])
    scan.add(2, "b", [env(1)])
    scan.add(3, "a", [env(3)])
    scan.add(4, "b", b"garbage")
    assert scan.heads == {"a": Head("a", 1, 2, "h2"), "b": Head("b", 2, 1, "h1")}
    assert scan.undecodable == [4] and scan.messages == 4 and scan.last_seq == 4


def test_a_stored_seal_is_the_contract_message_and_validates_against_its_schema() -> None:
    import jsonschema

    from interlock.contracts import generate
    from interlock.contracts import messages as msg

    seal, _ = first_seal()
    raw = json.loads(seal.encode())
    assert msg.Seal.model_validate(raw).model_dump(mode="json") == raw
    jsonschema.Draft202012Validator(generate.json_schema(msg.Seal)).validate(raw)


def test_the_signed_bytes_are_rfc8785() -> None:
    import rfc8785

    seal, _ = first_seal()
    assert rfc8785.dumps(seal.body()) == seal.signed_bytes()
    assert rfc8785.dumps(sl.Head("s", 1, 2, "h").to_json()) == b'{"hash":"h","seq":2,"stream_seq":1,"subject":"s"}'


def test_the_bottom_up_root_is_the_rfc6962_recursive_one() -> None:
    for size in range(0, 40):
        leaves = [hashlib.sha256(bytes([i])).digest() for i in range(size)]
        assert sl._root_bottom_up(leaves) == sl._root(leaves), size


def test_many_runs_with_one_problem_are_listed_up_to_a_limit_then_counted() -> None:
    heads = {h.subject: h for h in (head(i, i + 1, 1) for i in range(150))}
    seal, _ = sl.next_seal(None, {}, heads.values(), state(150), sealed_at="t", reason="interval", signer=SIGNER)
    problems = sl.check_against_seal(seal, heads, state(150, first=151, messages=0), {})
    assert kinds(problems) == [sl.STREAM_PURGED] + [sl.RUN_DELETED] * (sl.MAX_PER_KIND + 1)
    assert problems[-1].message == f"and {150 - sl.MAX_PER_KIND} more runs with this problem (150 in all)"
