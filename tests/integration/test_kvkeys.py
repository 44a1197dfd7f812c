"""Listing a KV bucket's keys and a key's history (runtime/kvkeys.py) against a real nats-server
with its credentials: exact, filtered by subject pattern, deleted keys left out, nothing matching
an empty list, never short while the bucket is being written (nats-py's own ``keys()`` and
``history()`` can end early: nats.py issue #842), and allowed to every principal that may read the
bucket."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue

from interlock.contracts import subjects as s
from interlock.runtime.connect import connect
from interlock.runtime.kvkeys import key_history, matching_keys
from tests.principals import Principals

BUCKET = s.WORKFLOWS_BUCKET  # one the admin may write; keys under a test's own first token


@pytest.fixture
def scope() -> str:
    return f"kvtest{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def bucket(nc: NATS, scope: str) -> AsyncIterator[KeyValue]:
    kv = await nc.jetstream().key_value(BUCKET)
    yield kv
    for key in await matching_keys(kv, f"{scope}.>"):
        await kv.purge(key)


@pytest.fixture
async def as_viewer(provisioned: str, principals: Principals) -> AsyncIterator[KeyValue]:
    client = await connect(provisioned, creds=principals.person("viewer"), patient=False)
    yield await client.jetstream().key_value(BUCKET)
    await client.close()


async def test_no_matching_keys_is_an_empty_list(bucket: KeyValue, scope: str) -> None:
    assert await matching_keys(bucket, f"{scope}.>") == []


async def test_keys_are_listed_by_pattern_without_deleted_or_purged_ones(
        bucket: KeyValue, as_viewer: KeyValue, scope: str) -> None:
    for tenant in ("acme", "globex"):
        for topic in ("llm.summarize", "search"):
            await bucket.put(f"{scope}.{tenant}.{topic}.w1", b"{}")
    await bucket.delete(f"{scope}.acme.search.w1")
    await bucket.purge(f"{scope}.globex.search.w1")
    live = [f"{scope}.acme.llm.summarize.w1", f"{scope}.globex.llm.summarize.w1"]
    assert await matching_keys(bucket, f"{scope}.>") == live
    assert await matching_keys(as_viewer, f"{scope}.>") == live  # a reader's permissions suffice
    assert await matching_keys(bucket, f"{scope}.acme.>") == live[:1]
    assert await matching_keys(bucket, f"{scope}.acme.*") == []  # a subject pattern, not a substring


async def test_a_listing_is_never_short_while_the_bucket_is_written(bucket: KeyValue, scope: str) -> None:
    existing = [f"{scope}.k.{i:04d}" for i in range(1_500)]
    await asyncio.gather(*(bucket.put(k, b"x" * 64) for k in existing))
    consumers_before = (await bucket._js.stream_info(bucket._stream)).state.consumer_count
    stop = asyncio.Event()

    async def writer() -> None:  # keeps the connection busy with new keys while we list
        n = 0
        while not stop.is_set():
            await bucket.put(f"{scope}.new.{n}", b"y")
            n += 1

    writing = asyncio.create_task(writer())
    try:
        listings = await asyncio.gather(*(matching_keys(bucket, f"{scope}.k.>") for _ in range(12)))
    finally:
        stop.set()
        await writing
    for keys in listings:
        assert keys == existing
    # each listing deletes its consumer
    assert (await bucket._js.stream_info(bucket._stream)).state.consumer_count == consumers_before


async def test_a_key_never_written_has_an_empty_history(bucket: KeyValue, scope: str) -> None:
    assert await key_history(bucket, f"{scope}.never") == []


async def test_a_history_holds_every_revision_in_order_with_deletes(
        bucket: KeyValue, as_viewer: KeyValue, scope: str) -> None:
    key = f"{scope}.h"
    revisions = [await bucket.put(key, f"v{i}".encode()) for i in range(5)]
    await bucket.put(f"{scope}.other", b"not this key")
    await bucket.delete(key)
    for reader in (bucket, as_viewer):
        entries = await key_history(reader, key)
        assert [e.value for e in entries] == [b"v0", b"v1", b"v2", b"v3", b"v4", None]
        assert [e.revision for e in entries[:5]] == revisions
        assert entries[-1].operation == "DEL" and entries[0].operation is None
        assert {e.key for e in entries} == {key}


async def test_a_history_is_never_short_while_the_bucket_is_written(bucket: KeyValue, scope: str) -> None:
    key = f"{scope}.busy"
    for i in range(60):
        await bucket.put(key, f"{i}".encode())
    stop = asyncio.Event()

    async def writer() -> None:
        n = 0
        while not stop.is_set():
            await bucket.put(f"{scope}.noise.{n}", b"y" * 256)
            n += 1

    writing = asyncio.create_task(writer())
    try:
        histories = await asyncio.gather(*(key_history(bucket, key) for _ in range(12)))
    finally:
        stop.set()
        await writing
    for entries in histories:
        assert [e.value for e in entries] == [f"{i}".encode() for i in range(60)]
