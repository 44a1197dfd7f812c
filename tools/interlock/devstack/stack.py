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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nats.js import JetStreamContext

from interlock.client import ClientSettings
from interlock.contracts import subjects as s
from interlock.core.natsserver import EmbeddedNats, free_port
from interlock.core.topology import provision
from interlock.devstack.cluster import LocalCluster
from interlock.devstack.targets import worker_topics
from interlock.identity import IdentityHome, write_private
from interlock.runtime.connect import HOME_ENV, connect, url_file
from interlock.runtime.datakeys import FILE_ENV, DataKeyring

SERVICES = ("planner", "policy", "approval", "dispatcher", "auditor")
API = "api"
API_PORT = 8081
API_KEY_FILE = "api-admin.key"
API_SECRET_FILE = "api-session.secret"
DEFAULT_PORT = 4222
DEFAULT_TENANT = "default"
ADMIN = "admin"


ORPHAN_GRACE_S = 10.0
"""How long ``wait_ready`` waits for a service consumer nobody pulls from, once each service pulls."""


class NotReady(RuntimeError):
    """The stack did not become ready in time (str: what does not consume yet)."""


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@dataclass(frozen=True)
class RestartPolicy:
    """When ``interlock up`` restarts a child that exited: after ``initial`` seconds, doubling with
    every exit in a row up to ``cap``; after ``limit`` restarts in a row it gives up on the child.
    A child that stayed up ``stable`` seconds starts a new row (a crash an hour later is not a loop)."""

    initial: float = 0.5
    cap: float = 30.0
    limit: int = 5
    stable: float = 60.0

    def delay(self, crashes: int) -> float:
        """Seconds to wait before restart number ``crashes`` (1, 2, …) of a row."""
        return min(self.cap, self.initial * 2 ** (crashes - 1))


@dataclass
class Proc:
    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)  # this process's own settings, kept for restarts
    started_at: float = 0.0
    crashes: int = 0
    """Exits in a row (reset once the child stays up ``RestartPolicy.stable`` seconds)."""
    restart_at: float | None = None
    """When the supervisor restarts it (None: not scheduled)."""
    given_up: bool = False

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
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)
    _topics: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)
    metrics: bool = False
    """Give every process a Prometheus ``/metrics`` endpoint on a free port (``metrics_ports``)."""
    metrics_ports: dict[str, int] = field(default_factory=dict)
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
        for name, target, tenant in self.worker_specs():
            if name in self.creds:
                continue
            # each worker process may pull its tenant's jobs of the topics it serves, and no other
            self.creds[name] = self.identity.get_or_issue("worker", tenant, self.topics_of(target),
                                                          name=self._principal(name, tenant))
        return self.creds

    def topics_of(self, target: str) -> tuple[str, ...]:
        """The job topics of a worker target (loaded once)."""
        if target not in self._topics:
            self._topics[target] = worker_topics(target)
        return self._topics[target]

    @property
    def data_keys_file(self) -> Path:
        """The tenants' data keys every process of the stack shares: ``INTERLOCK_DATA_KEYS_FILE``
        (``env``, then this process's), else ``{home}/data-keys.json`` (mode 0600)."""
        given = self.env.get(FILE_ENV) or os.environ.get(FILE_ENV)
        return Path(given) if given else self.home / "data-keys.json"

    def ensure_data_keys(self) -> None:
        """Create the keyring with a key for the stack's tenants, unless they have one (or were forgotten)."""
        ring = DataKeyring(self.data_keys_file)
        known = ring.tenants()
        for tenant in {self.tenant, *self.worker_tenants}:
            if tenant not in known:
                ring.rotate(tenant)

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
        env = {**os.environ, **self.home_env(), **self.env, **proc.env, "INTERLOCK_NATS_URL": self.url,
               "PYTHONUNBUFFERED": "1", "INTERLOCK_CREDS": str(self.creds[name]), "INTERLOCK_PROVISION": "false",
               FILE_ENV: str(self.data_keys_file)}
        if self.cluster:
            env["INTERLOCK_REPLICAS"] = str(self.replicas)
        if self.metrics:  # the same port across restarts, so a scraper keeps finding it
            env["INTERLOCK_METRICS_PORT"] = str(self.metrics_ports.setdefault(name, free_port()))
        with proc.log_path.open("ab") as log:
            proc.popen = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL)
        proc.started_at = time.monotonic()
        proc.restart_at = None
        self.procs[name] = proc
        return proc

    def home_env(self) -> dict[str, str]:
        """What keeps every child's state under ``home``: INTERLOCK_HOME (the URL file and admin
        credential the CLI looks for) and the auditor's projection file, unless the caller's
        environment names one."""
        home = self.home.resolve()
        env = {HOME_ENV: str(home)}
        if not os.environ.get("INTERLOCK_AUDITOR_DB"):
            env["INTERLOCK_AUDITOR_DB"] = str(home / "auditor.sqlite3")
        return env

    @property
    def url_file(self) -> Path:
        """Where the stack writes its server's URL for the other commands: ``{home}/nats.url``."""
        return url_file(self.home)

    def start(self) -> None:
        """Start NATS (unless a URL was given) and every service and worker process."""
        self.start_nats()
        self.issue_creds()  # (a no-op after start_nats, unless a URL was given)
        self.ensure_data_keys()
        self.url_file.parent.mkdir(parents=True, exist_ok=True)
        self.url_file.write_text(self.url)
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

    def supervise(self, now: float | None = None) -> list[str]:
        """One pass of ``interlock up``'s supervisor: schedule the restart of each child that exited
        (exponential backoff, :attr:`restart_policy`), restart those whose time has come, give up
        on a child that exited too many times in a row. Returns what to tell the user."""
        now = time.monotonic() if now is None else now
        policy, said = self.restart_policy, []
        for name, proc in self.procs.items():
            if proc.given_up or proc.alive():
                continue
            if proc.restart_at is None:  # exited since the last pass
                code = proc.popen.returncode if proc.popen is not None else None
                if now - proc.started_at >= policy.stable:
                    proc.crashes = 0
                proc.crashes += 1
                if proc.crashes > policy.limit:
                    proc.given_up = True
                    said.append(f"{name} exited (code {code}) {proc.crashes} times in a row; giving up on it "
                                f"after {policy.limit} restarts (see {proc.log_path})")
                    continue
                wait = policy.delay(proc.crashes)
                proc.restart_at = now + wait
                said.append(f"{name} exited (code {code}); restarting it in {wait:g} s "
                            f"(restart {proc.crashes} of at most {policy.limit} in a row)")
            elif now >= proc.restart_at:
                self.restart(name)
        return said

    async def wait_ready(self, timeout: float = 60.0, *, interval: float = 0.2,
                         supervise: Callable[[str], None] | None = None) -> list[str]:
        """Return once every service and worker consumes: each one's durable consumers exist and
        hold a live pull request (requests expire within seconds, so a dead holder's do not count),
        and the auditor answers a query (the readiness probe). Raises :class:`NotReady` naming what
        is missing. ``supervise``: restart children that exit meanwhile (:meth:`supervise`) and
        tell it what happened; else a child that exits fails the wait at once.

        A service consumer nobody pulls from once every service pulls on some consumer is waited
        for :data:`ORPHAN_GRACE_S` more, then taken for one an earlier copy left behind (a renamed
        auditor instance, say): returned as a note instead of blocking forever."""
        from interlock.client import Client, ClientError

        deadline = time.monotonic() + timeout
        all_pulling_since: float | None = None
        client = await Client.connect(self.url, creds=self.admin_creds, name="interlock-stack-ready")
        try:
            while True:
                if supervise is not None:
                    for line in self.supervise():
                        supervise(line)
                    missing = [f"{n} was given up on (see {p.log_path})" for n, p in self.procs.items() if p.given_up]
                else:
                    missing = [f"{n} exited (code {p.popen.returncode if p.popen else None}; see {p.log_path})"
                               for n, p in self.procs.items() if not p.alive()]
                    if missing:
                        raise NotReady("; ".join(missing))
                blocking, idle = await self._not_consuming(client.js)
                missing += blocking
                now = time.monotonic()
                all_pulling_since = (all_pulling_since or now) if not blocking else None
                if idle and all_pulling_since is not None and now - all_pulling_since >= ORPHAN_GRACE_S:
                    notes, idle = [f"{i} (left by an earlier copy? delete it if so)" for i in idle], []
                else:
                    notes = []
                missing += idle
                if not missing:
                    try:
                        await client.runs(limit=1)  # the readiness probe: the auditor answers queries
                    except ClientError as e:
                        missing.append(f"the auditor does not answer queries yet ({e})")
                if not missing:
                    return notes
                if now >= deadline:
                    raise NotReady(f"not ready after {timeout:g} s: {'; '.join(missing)}")
                await asyncio.sleep(interval)
        finally:
            await client.close()

    async def _not_consuming(self, js: JetStreamContext) -> tuple[list[str], list[str]]:
        """(what does not consume yet: a service without a pulling consumer, a worker's topic
        without a pulling consumer; service consumers that nobody pulls from)."""
        pulling: dict[str, bool] = {}
        for stream in await js.streams_info():
            for info in await js.consumers_info(stream.config.name or ""):
                if info.config.durable_name:
                    pulling[info.config.durable_name] = pulling.get(info.config.durable_name, False) or \
                        bool(info.num_waiting)
        blocking, idle = [], []
        for service in self.services:
            own = [n for n in pulling if n == service or n.startswith(f"{service}_")]
            if not any(pulling[n] for n in own):
                blocking.append(f"{service} does not consume yet")
            idle += [f"{service}'s consumer {n} is not pulled from" for n in own if not pulling[n]]
        for name, target, tenant in self.worker_specs():
            for topic in self.topics_of(target):
                if not pulling.get(s.worker_consumer(tenant, topic)):
                    blocking.append(f"{name} does not pull {topic} jobs yet")
        return blocking, idle

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
                if self.url_file.read_text().strip() == self.nats_url:
                    self.url_file.unlink()
