"""The whole stack on one machine: embedded NATS, the five services and workers as processes.

Used by ``interlock up``, ``interlock demo``, the end-to-end tests and crash drills (every
process can be SIGKILLed and started again). ``Stack(cluster=3)`` runs a 3-node JetStream
cluster on loopback (:class:`interlock.devstack.cluster.LocalCluster`) instead of one server: services
get every node's URL and R3 streams, and ``kill("n1")``/``restart("n1")`` take nodes down.

Authentication is on: the stack's identity home is ``{home}/identity`` (created on first start),
the embedded server runs in operator mode and refuses anonymous connections, and every process
connects with its own credential, issued on first start and reused after (get-or-issue): one per
service kind, one per worker process (role ``worker``, tenant ``default``, the topics that worker
serves), and ``admin`` for the local CLI and for provisioning (``{home}/identity/creds/admin.creds``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from interlock.client import ClientSettings
from interlock.core.natsserver import EmbeddedNats, free_port
from interlock.core.topology import provision
from interlock.devstack.cluster import LocalCluster
from interlock.devstack.targets import worker_topics
from interlock.identity import IdentityHome, write_private
from interlock.runtime.connect import URL_FILE, connect

SERVICES = ("planner", "policy", "approval", "dispatcher", "auditor")
API = "api"
API_PORT = 8081
API_KEY_FILE = "api-admin.key"
API_SECRET_FILE = "api-session.secret"
DEFAULT_PORT = 4222
DEFAULT_TENANT = "default"
ADMIN = "admin"


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@dataclass
class Proc:
    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)  # this process's own settings, kept for restarts

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


@dataclass
class Stack:
    home: Path = Path(".interlock")
    nats_url: str | None = None
    services: tuple[str, ...] = SERVICES
    workers: list[str] = field(default_factory=list)
    worker_tenants: tuple[str, ...] = ()  # each worker once per tenant; empty: INTERLOCK_TENANT, else default
    env: dict[str, str] = field(default_factory=dict)
    port: int | None = None
    procs: dict[str, Proc] = field(default_factory=dict)
    nats: EmbeddedNats | None = None
    cluster: int = 0  # > 0: run a LocalCluster of this many nodes instead of one server
    local_cluster: LocalCluster | None = None
    identity_dir: Path | None = None
    """The identity home (default ``{home}/identity``); with ``nats_url``, the one that server trusts."""
    tenant: str = DEFAULT_TENANT
    creds: dict[str, Path] = field(default_factory=dict)
    """The credential of each process by name, and ``admin``'s."""
    api_port: int | None = None
    """Run the api service (HTTP API and console) on this port (0: a free one); None: no api."""
    api_url: str | None = None
    _identity: IdentityHome | None = field(default=None, repr=False)

    @property
    def identity(self) -> IdentityHome:
        """The identity home, created on first use."""
        if self._identity is None:
            self._identity = IdentityHome(self.identity_dir or self.home / "identity")
        return self._identity

    def _principal(self, name: str, tenant: str | None = None) -> str:
        # another tenant's stack on the same identity home (a drill against `interlock up`)
        # must not take over (and revoke) the default tenant's credentials
        tenant = tenant or self.tenant
        return name if tenant == DEFAULT_TENANT else f"{name}-{tenant}"

    def worker_specs(self) -> list[tuple[str, str, str]]:
        """(process name, target, tenant) of every worker process: each worker once per tenant of
        ``worker_tenants``, else for INTERLOCK_TENANT (``env``, then this process's), else default."""
        fallback = (self.env.get("INTERLOCK_TENANT") or os.environ.get("INTERLOCK_TENANT") or self.tenant)
        tenants = self.worker_tenants or (fallback,)
        specs = [(target, tenant) for target in self.workers for tenant in tenants]
        return [(f"worker-{i}", target, tenant) for i, (target, tenant) in enumerate(specs)]

    @property
    def admin_creds(self) -> Path:
        """The admin credential (provisioning, the local CLI): ``{identity}/creds/admin.creds``."""
        if ADMIN not in self.creds:
            self.creds[ADMIN] = self.identity.get_or_issue("admin", self.tenant, name=self._principal(ADMIN))
        return self.creds[ADMIN]

    def issue_creds(self) -> dict[str, Path]:
        """Get or issue the credential of every service and worker process and the admin's."""
        self.admin_creds  # noqa: B018 - issued first: the CLI's default
        for service in (*self.services, *((API,) if self.api_port is not None else ())):
            if service not in self.creds:
                self.creds[service] = self.identity.get_or_issue(service, name=service)
        topics: dict[str, tuple[str, ...]] = {}
        for name, target, tenant in self.worker_specs():
            if name in self.creds:
                continue
            if target not in topics:
                topics[target] = worker_topics(target)
            # each worker process may pull its tenant's jobs of the topics it serves, and no other
            self.creds[name] = self.identity.get_or_issue("worker", tenant, topics[target],
                                                          name=self._principal(name, tenant))
        return self.creds

    @property
    def url(self) -> str:
        assert self.nats_url, "the stack is not started"
        return self.nats_url

    @property
    def replicas(self) -> int:
        """Stream replicas: the cluster's size, else INTERLOCK_REPLICAS from ``env``, else 1."""
        if self.cluster:
            return self.cluster
        return int(self.env.get("INTERLOCK_REPLICAS", "1"))

    @property
    def nodes(self) -> list[str]:
        """Names of the cluster's NATS nodes (n1, n2, …); empty for a single server."""
        return self.local_cluster.node_names if self.local_cluster is not None else []

    def start_nats(self) -> str:
        if self.nats_url:
            return self.nats_url
        self.issue_creds()  # before the server starts: it preloads the accounts (and revocations)
        if self.cluster:
            (self.home / "logs").mkdir(parents=True, exist_ok=True)
            self.local_cluster = LocalCluster(self.home / "cluster", self.cluster, identity=self.identity,
                                              creds=self.admin_creds)
            self.nats_url = self.local_cluster.start()
            return self.nats_url
        port = self.port if self.port is not None else (DEFAULT_PORT if _port_free(DEFAULT_PORT) else free_port())
        self.nats = EmbeddedNats(store_dir=self.home / "nats", port=port, log_file=self.home / "logs" / "nats.log",
                                 config=self.identity.server_config())
        (self.home / "logs").mkdir(parents=True, exist_ok=True)
        self.nats_url = self.nats.start()
        return self.nats_url

    async def provision(self) -> list[str]:
        """Create or update the streams and buckets, as admin (services do not provision)."""
        nc = await connect(self.url, creds=self.admin_creds, name="interlock-stack-provision", patient=False,
                           tls=ClientSettings())  # TLS: INTERLOCK_TLS_*
        try:
            return await provision(nc.jetstream(), self.replicas)
        finally:
            await nc.close()

    def _spawn(self, name: str, argv: list[str], own_env: dict[str, str] | None = None) -> Proc:
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        proc = self.procs.get(name) or Proc(name, argv, logs / f"{name}.log", env=own_env or {})
        env = {**os.environ, **self.env, **proc.env, "INTERLOCK_NATS_URL": self.url, "PYTHONUNBUFFERED": "1",
               "INTERLOCK_CREDS": str(self.creds[name]), "INTERLOCK_PROVISION": "false"}
        if self.cluster:
            env["INTERLOCK_REPLICAS"] = str(self.replicas)
        with proc.log_path.open("ab") as log:
            proc.popen = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL)
        self.procs[name] = proc
        return proc

    def start(self) -> None:
        """Start NATS (unless a URL was given) and every service and worker process."""
        self.start_nats()
        self.issue_creds()  # (a no-op after start_nats, unless a URL was given)
        URL_FILE.parent.mkdir(parents=True, exist_ok=True)
        URL_FILE.write_text(self.url)
        for service in self.services:
            self._spawn(service, [sys.executable, "-m", "interlock.cli", "serve", service])
        if self.api_port is not None:
            self.start_api()
        for name, target, tenant in self.worker_specs():
            self._spawn(name, [sys.executable, "-m", "interlock.cli", "--tenant", tenant, "worker", target])

    @property
    def api_key_file(self) -> Path:
        """Where the first admin API key is kept (0600): ``{home}/api-admin.key``."""
        return self.home / API_KEY_FILE

    def start_api(self) -> str:
        """Start the api service (HTTP API and console); its URL."""
        port = self.api_port or free_port()
        self._spawn(API, [sys.executable, "-m", "interlock.cli", "serve", API],
                    {"INTERLOCK_API_PORT": str(port),
                     "INTERLOCK_API_SESSION_SECRET_FILE": str((self.home / API_SECRET_FILE).resolve())})
        self.api_url = f"http://127.0.0.1:{port}"
        return self.api_url

    async def first_api_key(self) -> tuple[str | None, Path]:
        """The admin API key of the stack's tenant: created once (shown in clear then: the first
        element), kept in :attr:`api_key_file`; (None, file) when it exists and still works."""
        from interlock.client import Client

        path = self.api_key_file
        async with await Client.connect(self.url, creds=self.admin_creds, tenant=self.tenant,
                                        name="interlock-stack-keys") as client:
            if path.is_file() and await client.check_api_key(path.read_text().strip()) is not None:
                return None, path
            _, key = await client.create_api_key("admin", principal=ADMIN, by="interlock up")
        write_private(path, key + "\n")
        return key, path

    async def wait_api(self, timeout: float = 30.0) -> None:
        """Until the api service answers (its OpenAPI document)."""
        import urllib.request

        assert self.api_url, "the api service was not started"
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.api_url}/openapi.json", timeout=2) as reply:  # noqa: ASYNC210
                    if reply.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the api service did not answer on {self.api_url} within {timeout:g}s "
                                   f"(see {self.home}/logs/{API}.log)")
            await asyncio.sleep(0.2)

    def kill(self, name: str) -> None:
        """SIGKILL one process, or with a cluster one NATS node by name (crash drills)."""
        if name in self.nodes:
            assert self.local_cluster is not None
            self.local_cluster.kill(name)
            return
        proc = self.procs[name]
        if proc.popen is not None and proc.popen.poll() is None:
            proc.popen.kill()
            proc.popen.wait()

    def restart(self, name: str) -> None:
        if name in self.nodes:
            assert self.local_cluster is not None
            self.local_cluster.restart(name)
            return
        self._spawn(name, self.procs[name].argv)

    def dead(self) -> list[str]:
        return [name for name, proc in self.procs.items() if not proc.alive()]

    def stop(self, timeout: float = 10.0) -> None:
        for proc in self.procs.values():
            if proc.alive():
                assert proc.popen is not None
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            if proc.popen is None:
                continue
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
        if self.local_cluster is not None:
            self.local_cluster.stop()
        if self.nats is not None or self.local_cluster is not None:
            if self.nats is not None:
                self.nats.stop()
            with contextlib.suppress(FileNotFoundError):
                if URL_FILE.read_text().strip() == self.nats_url:
                    URL_FILE.unlink()
