"""TLS on a real nats-server (port 0, temporary store) with certificates this test generates (trustme).

Each refusal is paired with the allowed connection, so a test cannot pass because nothing works.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from nats.aio.client import Client as NATS

from interlock.client import Client, Unavailable
from interlock.core.natsserver import EmbeddedNats
from interlock.core.topology import provision
from interlock.identity import IdentityHome, Permissions
from interlock.runtime.connect import connect as connect_as
from interlock.runtime.settings import ServiceSettings, WorkerSettings
from interlock.runtime.tls import TlsError, negotiated
from interlock.worker import JobContext, Worker
from tests.integration.harness import Harness, types, unique
from tests.principals import Principals

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ADMIN: list[Path] = []
"""These servers have auth on, as every server: the tests' raw JetStream round trips (a scratch
stream, no Interlock subjects) connect with a credential that may do anything."""


@pytest.fixture(autouse=True)
def tool_creds(identity_home: IdentityHome) -> None:
    if not ADMIN:
        ADMIN.append(identity_home.issue_custom("tls-tool", Permissions()))


async def connect(url: str, **options: Any) -> NATS:
    """The runtime's connect with that credential."""
    return await connect_as(url, creds=ADMIN[0], **options)


@dataclass
class Pki:
    """A CA, certificates it issued, and a stranger CA's client certificate (all PEM files)."""

    ca: Path
    server_cert: Path
    server_key: Path
    localhost_cert: Path  # issued for "localhost" only
    localhost_key: Path
    client_cert: Path
    client_key: Path
    stranger_ca: Path  # another CA
    stranger_cert: Path  # a client certificate from the other CA
    stranger_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, stranger = trustme.CA(), trustme.CA()

    def write(name: str, blob: trustme.Blob) -> Path:
        blob.write_to_path(str(d / name))
        return d / name

    server, local = ca.issue_cert("localhost", "127.0.0.1"), ca.issue_cert("localhost")
    client, other = ca.issue_cert("worker@interlock.test"), stranger.issue_cert("worker@interlock.test")
    return Pki(ca=write("ca.pem", ca.cert_pem),
               server_cert=write("server.pem", server.cert_chain_pems[0]),
               server_key=write("server.key", server.private_key_pem),
               localhost_cert=write("localhost.pem", local.cert_chain_pems[0]),
               localhost_key=write("localhost.key", local.private_key_pem),
               client_cert=write("client.pem", client.cert_chain_pems[0]),
               client_key=write("client.key", client.private_key_pem),
               stranger_ca=write("stranger-ca.pem", stranger.cert_pem),
               stranger_cert=write("stranger.pem", other.cert_chain_pems[0]),
               stranger_key=write("stranger.key", other.private_key_pem))


def _server(tmp_path_factory: pytest.TempPathFactory, identity: IdentityHome, name: str, cert: Path, key: Path,
            ca: Path | None = None) -> Iterator[EmbeddedNats]:
    store = tmp_path_factory.mktemp(name)
    server = EmbeddedNats(store_dir=store, port=0, log_file=store / "nats.log", tls_cert=cert, tls_key=key, tls_ca=ca,
                          config=identity.server_config(store / "resolver"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, pki: Pki,
               identity_home: IdentityHome) -> Iterator[EmbeddedNats]:
    """TLS required; clients are not asked for a certificate."""
    yield from _server(tmp_path_factory, identity_home, "tls", pki.server_cert, pki.server_key)


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory: pytest.TempPathFactory, pki: Pki,
               identity_home: IdentityHome) -> Iterator[EmbeddedNats]:
    """TLS required, and a client certificate signed by the CA (mutual TLS)."""
    yield from _server(tmp_path_factory, identity_home, "mtls", pki.server_cert, pki.server_key, ca=pki.ca)


@pytest.fixture(scope="module")
def localhost_server(tmp_path_factory: pytest.TempPathFactory, pki: Pki,
               identity_home: IdentityHome) -> Iterator[EmbeddedNats]:
    """TLS with a certificate for ``localhost`` only, reached via 127.0.0.1."""
    yield from _server(tmp_path_factory, identity_home, "localhost", pki.localhost_cert, pki.localhost_key)


async def publish_and_read(nc: NATS) -> None:
    """A JetStream round trip: create a stream, publish, read the message back."""
    js = nc.jetstream()
    stream, subject = f"TLS_{uuid.uuid4().hex[:8]}", f"tls.{uuid.uuid4().hex[:8]}"
    await js.add_stream(name=stream, subjects=[subject])
    ack = await js.publish(subject, b"over tls")
    assert (await js.get_msg(stream, ack.seq)).data == b"over tls"
    await js.delete_stream(stream)


def test_the_server_requires_tls(tls_server: EmbeddedNats, mtls_server: EmbeddedNats) -> None:
    assert tls_server.url.startswith("tls://"), tls_server.url
    assert mtls_server.url.startswith("tls://"), mtls_server.url


async def test_with_the_ca_a_jetstream_round_trip_works(tls_server: EmbeddedNats, pki: Pki) -> None:
    nc = await connect(tls_server.url, patient=False, tls=WorkerSettings(tls_ca=pki.ca))
    try:
        assert negotiated(nc)
        await publish_and_read(nc)
    finally:
        await nc.close()


async def test_settings_read_the_ca_from_the_environment(tls_server: EmbeddedNats, pki: Pki,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERLOCK_TLS_CA", str(pki.ca))
    nc = await connect(tls_server.url, patient=False, tls=ServiceSettings(nats_url=tls_server.url))
    try:
        await publish_and_read(nc)
    finally:
        await nc.close()
    client = await Client.connect(tls_server.url, creds=ADMIN[0])  # the client reads INTERLOCK_TLS_CA too
    try:
        assert negotiated(client.nc)
        await publish_and_read(client.nc)
    finally:
        await client.close()


async def test_without_the_ca_the_error_says_to_set_it(tls_server: EmbeddedNats, pki: Pki) -> None:
    started = time.monotonic()
    with pytest.raises(TlsError) as refused:
        await connect(tls_server.url, patient=True, tls=WorkerSettings())  # patient, yet it fails at once
    assert time.monotonic() - started < 10, "an untrusted certificate must not be retried forever"
    message = str(refused.value)
    assert "not trusted by the system trust store" in message, message
    assert "INTERLOCK_TLS_CA" in message and tls_server.url in message, message
    with pytest.raises(Unavailable, match=r"not trusted.*INTERLOCK_TLS_CA"):
        await Client.connect(tls_server.url, creds=ADMIN[0])
    # the same server with the CA: allowed
    client = await Client.connect(tls_server.url, creds=ADMIN[0], tls_ca=pki.ca)
    await client.close()


async def test_another_ca_is_not_trusted_either(tls_server: EmbeddedNats, pki: Pki) -> None:
    with pytest.raises(TlsError, match=r"not trusted by the CA in INTERLOCK_TLS_CA"):
        await connect(tls_server.url, patient=False, tls=WorkerSettings(tls_ca=pki.stranger_ca))


async def test_plain_nats_url_to_a_tls_server(tls_server: EmbeddedNats, pki: Pki) -> None:
    plain = tls_server.url.replace("tls://", "nats://")
    with pytest.raises(TlsError) as refused:
        await connect(plain, patient=False)
    message = str(refused.value)
    assert "requires TLS" in message and "tls://" in message and "INTERLOCK_TLS_CA" in message, message
    with pytest.raises(Unavailable, match="requires TLS"):
        await Client.connect(plain, creds=ADMIN[0])
    # with the CA, nats-py upgrades a nats:// connection the server requires TLS on: still encrypted
    nc = await connect(plain, patient=False, tls=WorkerSettings(tls_ca=pki.ca))
    try:
        assert negotiated(nc)
    finally:
        await nc.close()


async def test_tls_url_to_a_plain_server_is_refused(nats_url: str, pki: Pki) -> None:
    assert nats_url.startswith("nats://")
    with pytest.raises(TlsError, match="asks for TLS but the server"):
        await connect(nats_url.replace("nats://", "tls://"), patient=False, tls=WorkerSettings(tls_ca=pki.ca))
    with pytest.raises(Unavailable, match="asks for TLS but the server"):
        await Client.connect(nats_url.replace("nats://", "tls://"), creds=ADMIN[0], tls_ca=pki.ca)
    nc = await connect(nats_url, patient=False)  # the plain URL to the plain server: allowed
    assert not negotiated(nc)
    await nc.close()


async def test_a_certificate_for_another_name_needs_tls_hostname(localhost_server: EmbeddedNats, pki: Pki) -> None:
    assert "127.0.0.1" in localhost_server.url
    with pytest.raises(TlsError, match=r"not for that host.*INTERLOCK_TLS_HOSTNAME"):
        await connect(localhost_server.url, patient=False, tls=WorkerSettings(tls_ca=pki.ca))
    nc = await connect(localhost_server.url, patient=False,
                       tls=WorkerSettings(tls_ca=pki.ca, tls_hostname="localhost"))
    try:
        await publish_and_read(nc)
    finally:
        await nc.close()


async def test_mutual_tls_needs_a_client_certificate(mtls_server: EmbeddedNats, pki: Pki) -> None:
    with pytest.raises(TlsError) as refused:
        await connect(mtls_server.url, patient=False, tls=WorkerSettings(tls_ca=pki.ca))
    message = str(refused.value)
    assert "INTERLOCK_TLS_CERT" in message and "INTERLOCK_TLS_KEY" in message, message
    with pytest.raises(Unavailable, match="INTERLOCK_TLS_CERT"):
        await Client.connect(mtls_server.url, creds=ADMIN[0], tls_ca=pki.ca)
    # a certificate from a CA the server does not trust: refused as well
    with pytest.raises(TlsError, match=r"refused the client certificate in INTERLOCK_TLS_CERT"):
        await connect(mtls_server.url, patient=False,
                      tls=WorkerSettings(tls_ca=pki.ca, tls_cert=pki.stranger_cert, tls_key=pki.stranger_key))
    # the CA's client certificate: allowed
    nc = await connect(mtls_server.url, patient=False,
                       tls=WorkerSettings(tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key))
    try:
        await publish_and_read(nc)
    finally:
        await nc.close()
    client = await Client.connect(mtls_server.url, creds=ADMIN[0], tls_ca=pki.ca, tls_cert=pki.client_cert,
                                  tls_key=pki.client_key)
    try:
        await publish_and_read(client.nc)
    finally:
        await client.close()


async def test_a_run_end_to_end_over_mutual_tls(mtls_server: EmbeddedNats, pki: Pki,
                                                principals: Principals) -> None:
    """Services (their own connection and FastStream's) and a worker, all over mutual TLS."""
    tls = WorkerSettings(tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key)
    nc = await connect(mtls_server.url, patient=False, tls=tls)
    await provision(nc.jetstream())
    await principals.home.publish_keyring(nc.jetstream())  # the services trust each other's signatures
    # services and worker with their own credentials
    harness = Harness(url=mtls_server.url, nc=nc, principals=principals, tls=tls)
    await harness.start_services(settings=ServiceSettings(nats_url=mtls_server.url, provision=False,
                                                          sweep_interval=0, tls_ca=pki.ca,
                                                          tls_cert=pki.client_cert, tls_key=pki.client_key))
    try:
        wf, topic = unique("tls"), unique("t")
        await harness.apply(f"id: {wf}\nversion: 1\nsteps:\n  a: {{topic: {topic}, input: {{n: 1}}}}\n")
        worker = Worker("tls", settings=tls)

        @worker.job(topic)
        async def double(ctx: JobContext) -> dict[str, int]:
            return {"n": int(ctx.input["n"]) * 2}

        await harness.start_worker(worker)
        run_id = await harness.trigger(wf)
        events = await asyncio.wait_for(harness.wait_end(run_id), 30)
        assert types(events)[-1] == "RunSucceeded", types(events)
        assert (await harness.run_state(run_id)).steps["a"].output == {"n": 2}
    finally:
        await harness.stop()
        await nc.close()
