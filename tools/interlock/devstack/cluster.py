"""A real JetStream cluster on loopback: ``size`` nats-server processes joined by routes.

Used by ``Stack(cluster=3)``, ``interlock drill --cluster`` and the clustered end-to-end tests.
Every node keeps its client port and store directory across :meth:`LocalCluster.kill` /
:meth:`LocalCluster.restart`, so clients given :attr:`LocalCluster.urls` reconnect to it, and
a restarted node catches up from its peers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.js.api import StorageType, StreamConfig

from interlock.contracts import subjects as s
from interlock.core.natsserver import ClusterSpec, EmbeddedNats, NatsServerError, stable_port
from interlock.identity import IdentityHome
from interlock.runtime.connect import creds_options

CLUSTER_NAME = "interlock"
PROBE_STREAM = "IL_CLUSTER_PROBE"


class ClusterError(NatsServerError):
    """The cluster did not form, or did not become healthy in time."""


@dataclass
class ClusterNode(EmbeddedNats):
    """One node: an embedded server that also serves HTTP monitoring (for ``/healthz``)."""

    monitor_port: int = 0

    def _command(self, ports_dir: Path) -> list[str]:
        return [*super()._command(ports_dir), "-m", str(self.monitor_port)]

    async def healthz(self, timeout: float = 2.0) -> tuple[bool, str]:
        """(ok, detail) from the node's ``/healthz``: ok once JetStream on this node is current
        (every stream and consumer replica it holds has caught up), which a restarted node is not."""
        if not self.running():
            return False, "not running"
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.monitor_port), timeout)
        except (OSError, TimeoutError) as e:
            return False, repr(e)
        try:
            writer.write(f"GET /healthz HTTP/1.0\r\nHost: {self.host}\r\n\r\n".encode())
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(), timeout)
        except (OSError, TimeoutError) as e:
            return False, repr(e)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        head, _, body = raw.decode(errors="replace").partition("\r\n\r\n")
        status = head.split(" ", 2)[1] if " " in head else "?"
        return status == "200", body.strip()[:300]


@dataclass
class LocalCluster:
    """``size`` JetStream nodes named n1..n{size}, each with its own store under ``home``."""

    home: Path
    size: int = 3
    host: str = "127.0.0.1"
    name: str = CLUSTER_NAME
    identity: IdentityHome | None = None
    """Operator mode with this identity home (each node keeps its own account store)."""
    creds: Path | None = None
    """The credential :meth:`connect` uses (admin: :meth:`wait_ready` creates a probe stream)."""
    nodes: dict[str, ClusterNode] = field(default_factory=dict)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> str:
        """Start every node, wait until JetStream has a meta leader and all peers; return :attr:`urls`."""
        if self.size < 1:
            raise ValueError("a cluster needs at least one node")
        self.home = Path(self.home)
        (self.home / "logs").mkdir(parents=True, exist_ok=True)
        names = [f"n{i}" for i in range(1, self.size + 1)]
        # kept across restarts of a killed node: outside the ephemeral range, so nothing takes them meanwhile
        cluster_ports = {name: stable_port() for name in names}
        routes = [f"nats://{self.host}:{port}" for port in cluster_ports.values()]
        for name in names:
            self.nodes[name] = ClusterNode(
                store_dir=self.home / name / "store", host=self.host, port=0, server_name=name,
                cluster=ClusterSpec(self.name, cluster_ports[name], routes),
                log_file=self.home / "logs" / f"nats-{name}.log", monitor_port=stable_port(),
                config=self.identity.server_config(self.home / name / "resolver") if self.identity else None,
            )
        try:
            for node in self.nodes.values():
                node.start()
            asyncio.run(self.wait_ready(timeout))
        except BaseException:
            self.stop()
            raise
        return self.urls

    @property
    def node_names(self) -> list[str]:
        return list(self.nodes)

    @property
    def url_list(self) -> list[str]:
        return [node.url for node in self.nodes.values()]

    @property
    def urls(self) -> str:
        """Every node's client URL, comma-joined (the form INTERLOCK_NATS_URL takes)."""
        return ",".join(self.url_list)

    def url_of(self, node: str) -> str:
        return self.nodes[node].url

    def running(self, node: str) -> bool:
        return self.nodes[node].running()

    def kill(self, node: str) -> None:
        """SIGKILL one node."""
        self.nodes[node].kill()

    def restart(self, node: str, timeout: float = 10.0) -> None:
        """Start a stopped or killed node again on the same ports and store."""
        server = self.nodes[node]
        if server.running():
            return
        deadline = time.monotonic() + timeout
        while True:  # the old listener's port may take a moment to be free again
            try:
                server.start(timeout=max(1.0, deadline - time.monotonic()))
                return
            except NatsServerError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()

    # -- JetStream state -----------------------------------------------------------------------
    async def connect(self, **kwargs: Any) -> NATS:
        options: dict[str, Any] = {"max_reconnect_attempts": -1, "reconnect_time_wait": 0.25,
                                   "connect_timeout": 2, **creds_options(self.creds), **kwargs}
        return await nats.connect(self.url_list, **options)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until JetStream answers (a meta leader exists) and an R{size} stream can be created."""
        deadline = time.monotonic() + timeout
        nc = await self.connect()
        try:
            last: object = None
            while time.monotonic() < deadline:
                try:
                    reply = await nc.request(s.JS_API_INFO, b"", timeout=1.0)
                    info = json.loads(reply.data)
                    if "error" in info:
                        last = info["error"]
                    else:
                        js = nc.jetstream(timeout=2.0)
                        await js.add_stream(StreamConfig(name=PROBE_STREAM, subjects=[s.CLUSTER_PROBE],
                                                         num_replicas=self.size, storage=StorageType.MEMORY))
                        await js.delete_stream(PROBE_STREAM)
                        return
                except Exception as e:  # no responders, timeouts, "insufficient resources" while peers join
                    last = e
                await asyncio.sleep(0.2)
            raise ClusterError(f"JetStream cluster of {self.size} did not become ready within {timeout}s: {last!r}")
        finally:
            await nc.close()

    async def stream_leader(self, stream: str, nc: NATS | None = None, timeout: float = 15.0) -> str:
        """Name of the node leading ``stream`` (waits through an election)."""
        own = nc is None
        conn = nc or await self.connect()
        try:
            deadline = time.monotonic() + timeout
            while True:
                with contextlib.suppress(Exception):
                    info = await conn.jetstream(timeout=2.0).stream_info(stream)
                    if info.cluster is not None and info.cluster.leader:
                        return str(info.cluster.leader)
                if time.monotonic() > deadline:
                    raise ClusterError(f"stream {stream} has no leader after {timeout}s")
                await asyncio.sleep(0.1)
        finally:
            if own:
                await conn.close()

    async def wait_healthy(self, streams: list[str] | None = None, nc: NATS | None = None,
                           timeout: float = 60.0) -> None:
        """Until every running node's ``/healthz`` is ok (its JetStream replicas have caught up),
        every stream (all, by default) has a leader and every replica is online and current.

        Call after :meth:`restart` before taking another node down: a node that has not caught
        up yet does not count towards a quorum. (Replica flags alone are not enough: just after a
        quick restart the leaders may still report the node's replicas as current.)
        """
        own = nc is None
        conn = nc or await self.connect()
        try:
            deadline = time.monotonic() + timeout
            problem = "not checked"
            while time.monotonic() < deadline:
                unhealthy = []
                for name, node in self.nodes.items():
                    if node.running():
                        ok, detail = await node.healthz()
                        if not ok:
                            unhealthy.append(f"{name}: {detail}")
                if unhealthy:
                    problem = "healthz: " + "; ".join(unhealthy)
                    await asyncio.sleep(0.2)
                    continue
                try:
                    js = conn.jetstream(timeout=2.0)
                    names = streams if streams is not None else [str(i.config.name) for i in await js.streams_info()]
                    problem = ""
                    for name in names:
                        info = await js.stream_info(name)
                        cluster = info.cluster
                        if cluster is None:
                            continue
                        if not cluster.leader:
                            problem = f"{name}: no leader"
                            break
                        bad = [str(r.name) for r in (cluster.replicas or []) if r.offline or not r.current]
                        if len(cluster.replicas or []) + 1 < min(self.size, info.config.num_replicas or 1):
                            problem = f"{name}: only {len(cluster.replicas or []) + 1} replicas known"
                            break
                        if bad:
                            problem = f"{name}: replicas {', '.join(bad)} not current"
                            break
                    if not problem:
                        return
                except Exception as e:
                    problem = repr(e)
                await asyncio.sleep(0.2)
            raise ClusterError(f"cluster not healthy after {timeout}s: {problem}")
        finally:
            if own:
                await conn.close()


__all__ = ["ClusterError", "ClusterNode", "LocalCluster"]
