"""deploy/ and docker-compose.yml require credentials and publish no unauthenticated port (issue 10).

Docker does not run here, so the files are read: docker-compose.yml as YAML, deploy/nats/*.conf
with a small tolerant reader of NATS's config format, and each node's config is checked by the
real ``nats-server -t`` against an identity home made as the compose ``identity`` service makes it
(operator, accounts, ``server.json``). One node is also started from its file: an anonymous
client is refused and a credential issued from the home is let in.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import nats
import pytest
import yaml

from interlock.core.natsserver import free_port, nats_server_binary
from interlock.identity import IdentityHome, creds_inbox_prefix
from tests.integration.test_identity import refused_connect

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
NATS_CONFS = sorted((ROOT / "deploy" / "nats").glob("*.conf"))
IDENTITY_MOUNT = "/identity"  # where the identity volume is mounted in the init and server containers
CLIENT_PORT, ROUTE_PORT, MONITOR_PORT = 4222, 6222, 8222


# -- a tolerant reader of the NATS config format --------------------------------------------------
_TOKEN = re.compile(r"""
    (?P<comment>(?:\#|//)[^\n]*)
  | (?P<open>[{\[])
  | (?P<close>[}\]])
  | (?P<string>"(?:[^"\\]|\\.)*"|'[^']*')
  | (?P<sep>[:=,;\n])
  | (?P<word>[^\s{}\[\]:=,;"'#][^\s{}\[\]=,;"'#]*)
  | (?P<space>[ \t\r]+)
""", re.VERBOSE)


def _tokens(text: str) -> Iterator[tuple[str, str]]:
    for match in _TOKEN.finditer(text):
        kind = match.lastgroup or ""
        if kind in ("comment", "space"):
            continue
        value = match.group()
        if kind == "word" and value.endswith(":"):  # "key:" (a value such as host:port keeps its colon)
            yield kind, value[:-1]
            yield "sep", ":"
        else:
            yield kind, value[1:-1] if kind == "string" else value


def read_nats_conf(text: str) -> dict[str, Any]:
    """Keys and values of a NATS config (``key: value``, ``key = value``, ``key value``, blocks,
    arrays, ``include``); a key given twice keeps its last value, as nats-server does.
    ``include`` values are collected under the key ``include`` as a list."""
    tokens = list(_tokens(text))
    pos = 0

    def value() -> Any:
        nonlocal pos
        tok = tokens[pos][1]
        pos += 1
        if tok == "{":
            return block("}")
        if tok == "[":
            items: list[Any] = []
            while tokens[pos][1] != "]":
                if tokens[pos][0] == "sep":
                    pos += 1
                    continue
                items.append(value())
            pos += 1
            return items
        return tok

    def block(end: str | None) -> dict[str, Any]:
        nonlocal pos
        out: dict[str, Any] = {}
        while pos < len(tokens):
            kind, tok = tokens[pos]
            if tok == end:
                pos += 1
                return out
            pos += 1
            if kind == "sep":
                continue
            key = tok
            while tokens[pos][0] == "sep" and tokens[pos][1] in ":=":
                pos += 1
            if key == "include":
                out.setdefault("include", []).append(value())
            else:
                out[key] = value()
        return out

    return block(None)


def test_the_reader_reads_the_nats_format() -> None:
    conf = read_nats_conf("""
# comment
a: 1
b = "two" // comment
hostport: 0.0.0.0:4222
routes: [nats-route://n1:6222, nats-route://n2:6222]
c three
block { inner: [x, "y", {z: 1}], nested { k: v } }
include "other.conf"
a: 4
""")
    assert conf == {"a": "4", "b": "two", "c": "three", "hostport": "0.0.0.0:4222",
                    "routes": ["nats-route://n1:6222", "nats-route://n2:6222"],
                    "block": {"inner": ["x", "y", {"z": "1"}], "nested": {"k": "v"}}, "include": ["other.conf"]}


# -- the NATS server configs ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def confs() -> dict[str, dict[str, Any]]:
    assert len(NATS_CONFS) == 3, NATS_CONFS
    return {path.name: read_nats_conf(path.read_text()) for path in NATS_CONFS}


def _all_keys(tree: Any) -> Iterator[str]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield key
            yield from _all_keys(value)
    elif isinstance(tree, list):
        for item in tree:
            yield from _all_keys(item)


def test_servers_run_in_operator_mode_with_no_anonymous_user(confs: dict[str, dict[str, Any]],
                                                              tmp_path: Path) -> None:
    wanted = IdentityHome(tmp_path / "identity").server_config()  # what the embedded stack's server gets
    for name, conf in confs.items():
        keys = set(_all_keys(conf))
        # no anonymous user, and no users or tokens of the config file beside the operator's JWTs
        assert not keys & {"no_auth_user", "authorization", "accounts", "users", "token", "password"}, name
        assert conf["resolver"]["type"] == "full" and conf["resolver"]["allow_delete"] == "false", name
        # operator, system_account and resolver_preload come from the identity home's server.json
        assert conf["include"] == ["../../identity/server.json"], name
        assert str(PurePosixPath("/etc/nats", conf["include"][0])).replace("/etc/nats/../..", "") == \
            f"{IDENTITY_MOUNT}/server.json"
        assert int(conf["max_control_line"]) == wanted["max_control_line"] == 65536, name
        assert {k: conf["resolver"][k] for k in ("type", "interval", "timeout")} == \
            {k: wanted["resolver"][k] for k in ("type", "interval", "timeout")}, name
        assert conf["listen"].endswith(f":{CLIENT_PORT}"), name
        # monitoring: inside the container only
        assert conf["http"] == f"127.0.0.1:{MONITOR_PORT}", name


def node_files(tmp_path: Path, conf: Path) -> tuple[Path, IdentityHome]:
    """``conf`` laid out as in the container (``etc/nats/`` beside ``identity/``), its /data
    pointed into ``tmp_path``, with an identity home made as the compose ``identity`` service does."""
    home = IdentityHome(tmp_path / "identity")
    home.write_server_config(tmp_path / "identity" / "server.json")
    etc = tmp_path / "etc" / "nats"
    etc.mkdir(parents=True)
    target = etc / conf.name
    target.write_text(conf.read_text().replace("/data/", f"{tmp_path}/data/"))
    return target, home


@pytest.mark.parametrize("conf", NATS_CONFS, ids=lambda p: p.name)
def test_nats_server_accepts_each_config(conf: Path, tmp_path: Path) -> None:
    target, _ = node_files(tmp_path, conf)
    check = subprocess.run([nats_server_binary(), "-c", str(target), "-t"], capture_output=True, text=True,
                           timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    # and it fails without the identity home: the include is read, not ignored
    shutil.rmtree(tmp_path / "identity")
    check = subprocess.run([nats_server_binary(), "-c", str(target), "-t"], capture_output=True, text=True,
                           timeout=30)
    assert check.returncode != 0 and "server.json" in check.stdout + check.stderr


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[str, IdentityHome, Path]]:
    """nats1 started from its own file (only the ports moved; its routes never come up here):
    its URL, the identity home it trusts and its log."""
    target, home = node_files(tmp_path, NATS_CONFS[0])
    port, log = free_port(), tmp_path / "nats.log"
    proc = subprocess.Popen([nats_server_binary(), "-c", str(target), "-a", "127.0.0.1", "-p", str(port),
                             "-m", str(free_port()), "--cluster", f"nats://127.0.0.1:{free_port()}", "-l", str(log)])
    try:
        deadline = time.monotonic() + 10
        while "Server is ready" not in (log.read_text() if log.exists() else ""):
            assert proc.poll() is None and time.monotonic() < deadline, "nats1 did not start from n1.conf"
            time.sleep(0.02)
        yield f"nats://127.0.0.1:{port}", home, log
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_a_node_refuses_anonymous_clients_and_admits_credentials(node: tuple[str, IdentityHome, Path]) -> None:
    url, home, log = node
    assert "Authorization Violation" in str(await refused_connect(url))
    creds = home.issue("viewer", "acme", name="deploy-test")  # issued after the start: no restart, no push
    nc = await nats.connect(url, user_credentials=str(creds), inbox_prefix=creds_inbox_prefix(creds),
                            allow_reconnect=False, connect_timeout=5)
    assert nc.is_connected
    await nc.close()
    assert "authentication error" in log.read_text()


# -- docker-compose.yml ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def _interlock_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services built from Interlock's image, except the one-shot that creates the identity home."""
    return {name: svc for name, svc in compose["services"].items()
            if "build" in svc and svc.get("command", [])[:2] != ["creds", "init"]}


def _nats_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items() if str(svc.get("image", "")).startswith("nats")}


def _mounts(svc: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(source, subpath, target, read_only) of each volume of a service."""
    out = []
    for volume in svc.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            out.append((source, "", target, mode == ["ro"]))
        else:
            out.append((volume["source"], (volume.get("volume") or {}).get("subpath", ""), volume["target"],
                        bool(volume.get("read_only"))))
    return out


def test_every_interlock_service_has_its_credentials(compose: dict[str, Any]) -> None:
    services = _interlock_services(compose)
    assert {"provision", "planner", "policy", "approval", "dispatcher", "auditor-1", "auditor-2",
            "example-agents", "api"} <= set(services)
    for name, svc in services.items():
        env = svc.get("environment") or {}
        creds = env.get("INTERLOCK_CREDS")
        assert creds, f"{name} has no INTERLOCK_CREDS"
        # the file is in the identity volume's creds/ directory, mounted read-only; nothing else of
        # the home (the operator's and accounts' seeds) is visible to the service
        identity = [m for m in _mounts(svc) if m[0] == "identity"]
        assert identity == [("identity", "creds", f"{IDENTITY_MOUNT}/creds", True)], name
        assert PurePosixPath(creds).parent == PurePosixPath(identity[0][2]), name
        assert env.get("INTERLOCK_PROVISION") == "false", f"{name}: services do not provision (service credentials)"
    # one credential per service kind; only the provisioning one-shot holds admin's
    kinds = {PurePosixPath(svc["environment"]["INTERLOCK_CREDS"]).stem: name.split("-")[0]
             for name, svc in services.items()}
    assert kinds["admin"] == "provision" and list(kinds.values()).count("provision") == 1
    assert services["provision"]["command"] == ["provision"]


def test_the_identity_home_is_made_once_before_the_servers_start(compose: dict[str, Any]) -> None:
    init = compose["services"]["identity"]
    assert init["command"] == ["creds", "init", "--home", IDENTITY_MOUNT]
    assert _mounts(init) == [("identity", "", IDENTITY_MOUNT, False)]
    assert init.get("restart") == "no" and not init.get("ports")
    for name, svc in _nats_services(compose).items():
        assert svc["depends_on"]["identity"]["condition"] == "service_completed_successfully", name
        assert ("identity", "", IDENTITY_MOUNT, True) in _mounts(svc), name
        conf = svc["command"][svc["command"].index("-c") + 1]
        assert any(m[2] == conf and m[0] == f"./deploy/nats/{PurePosixPath(conf).name}" for m in _mounts(svc)), name


def _published(svc: dict[str, Any]) -> list[tuple[str, int]]:
    """(host address, container port) of each published port (short syntax, or long)."""
    out = []
    for port in svc.get("ports", []):
        if isinstance(port, dict):
            out.append((str(port.get("host_ip", "0.0.0.0")), int(port["target"])))
            continue
        parts = str(port).split("/")[0].split(":")
        host = parts[0] if len(parts) == 3 else "0.0.0.0"
        out.append((host, int(parts[-1])))
    return out


def test_no_unauthenticated_or_monitoring_port_is_published(compose: dict[str, Any],
                                                            confs: dict[str, dict[str, Any]]) -> None:
    nats_services = _nats_services(compose)
    assert len(nats_services) == 3
    for name, svc in compose["services"].items():
        if "expose" in svc:
            assert not svc["expose"], name
        published = _published(svc)
        if name == "api":  # every route needs an API key or a signed session: loopback only
            assert published == [("127.0.0.1", 8081)], published
            continue
        if name == "grafana":  # the observability profile's UI: a password sign-in, loopback only
            env = svc["environment"]
            assert published == [("127.0.0.1", 3000)], published
            assert env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?"), "no default password"
            assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false" and svc["profiles"] == ["observability"]
            continue
        if name not in nats_services:
            assert not published, f"{name} publishes {published}"
            continue
        for host, port in published:
            # only the client port, which requires credentials (operator mode, checked above)
            assert port == CLIENT_PORT, f"{name} publishes {port}"
            assert host == "127.0.0.1", f"{name} publishes the client port beyond the host's loopback"
        conf = confs[PurePosixPath(svc["command"][svc["command"].index("-c") + 1]).name]
        assert "no_auth_user" not in set(_all_keys(conf))


def test_the_identity_init_command_makes_what_compose_and_the_nodes_use(compose: dict[str, Any],
                                                                       tmp_path: Path) -> None:
    # the compose `identity` one-shot, for real: `interlock creds init --home DIR` (twice: idempotent)
    from typer.testing import CliRunner

    from interlock.cli import app

    home = tmp_path / "identity"
    argv = [*compose["services"]["identity"]["command"][:3], str(home)]
    first = CliRunner().invoke(app, argv)
    assert first.exit_code == 0, first.output
    keys_before = {p.name: p.read_text() for p in (home / "creds").iterdir()}
    second = CliRunner().invoke(app, argv)
    assert second.exit_code == 0, second.output
    assert {p.name: p.read_text() for p in (home / "creds").iterdir()} == keys_before  # reused, not re-issued
    # every INTERLOCK_CREDS file a compose service names exists, with the role that service needs
    principals = {u.name: u for u in IdentityHome(home).list() if u.active}
    for name, svc in _interlock_services(compose).items():
        file = PurePosixPath(svc["environment"]["INTERLOCK_CREDS"]).name
        assert (home / "creds" / file).is_file(), f"{name}: {file} not made by creds init"
        stem = PurePosixPath(file).stem
        wanted = {"admin": "admin", "example-agents": "worker"}.get(stem, stem)
        assert principals[stem].role == wanted, name
    # and the node configs accept the server.json it wrote
    for conf in NATS_CONFS:
        etc = tmp_path / conf.stem / "etc" / "nats"
        etc.mkdir(parents=True)
        (tmp_path / conf.stem / "identity").symlink_to(home)
        target = etc / conf.name
        target.write_text(conf.read_text().replace("/data/", f"{tmp_path / conf.stem}/data/"))
        check = subprocess.run([nats_server_binary(), "-c", str(target), "-t"], capture_output=True, text=True,
                               timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr


def test_the_dashboard_queries_metrics_the_services_export(tmp_path: Path) -> None:
    """Every metric deploy/grafana's dashboard plots is one a process serves on /metrics."""
    import json
    import re
    import subprocess
    import sys
    import textwrap

    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "interlock.json").read_text())
    wanted = {name for panel in dashboard["panels"] for target in panel["targets"]
              for name in re.findall(r"interlock_[a-z_]+", target["expr"])}
    assert len(wanted) >= 10, wanted
    script = textwrap.dedent("""
        import urllib.request
        from interlock.runtime import metrics as m, otel
        port = m.configure(otel.resource("dashboard-test"), prometheus_port=0)
        for counter in (m.runs_started, m.runs_ended, m.retries, m.timeouts, m.dead_letters, m.policy_decisions,
                        m.messages_handled, m.llm_tokens, m.llm_cost, m.approvals_requested):
            counter.add(1, {})
        for histogram in (m.step_duration, m.scheduling_delay, m.approval_wait):
            histogram.record(0.1, {})
        m.gauges.consumer_pending[("S", "c")] = 1
        m.gauges.consumer_ack_pending[("S", "c")] = 1
        m.gauges.approvals_pending["t"] = 1
        m.gauges.oldest_approval_age["t"] = 1.0
        print(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
    """)
    body = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          timeout=60).stdout
    served = {line.split("{")[0].split(" ")[0] for line in body.splitlines() if line.startswith("interlock_")}
    missing = {name for name in wanted if name not in served}
    assert not missing, f"the dashboard plots metrics nothing serves: {sorted(missing)}"
