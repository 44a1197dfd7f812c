"""TLS settings: INTERLOCK_TLS_* read by every process kind, bad files named by their variable, the
ssl context the standard library's (verifying), and the CLI's --tls-* options passed to the client."""

from __future__ import annotations

import json
import os
import ssl
import types
from pathlib import Path
from typing import Any

import pytest
import trustme
from typer.testing import CliRunner

from interlock.cli import _common
from interlock.cli._app import app
from interlock.client import ClientSettings, Unavailable
from interlock.core.natsserver import EmbeddedNats, NatsServerError
from interlock.runtime.settings import ServiceSettings, SettingsError, WorkerSettings
from interlock.runtime.tls import TlsError, TlsSettings, connect_options, describe_failure, ssl_context, wants_tls

VARIABLES = ["INTERLOCK_TLS_CA", "INTERLOCK_TLS_CERT", "INTERLOCK_TLS_KEY", "INTERLOCK_TLS_HOSTNAME",
             "INTERLOCK_NATS_URL", "INTERLOCK_TENANT", "INTERLOCK_CREDS"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no .interlock/nats.url from a checkout


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pem")
    ca = trustme.CA()
    leaf, other = ca.issue_cert("client@interlock.test"), ca.issue_cert("other@interlock.test")
    files = {"ca": ca.cert_pem, "cert": leaf.cert_chain_pems[0], "key": leaf.private_key_pem,
             "both": leaf.private_key_and_cert_chain_pem, "other_key": other.private_key_pem}
    for name, blob in files.items():
        blob.write_to_path(str(d / f"{name}.pem"))
    (d / "junk.pem").write_text("not a certificate\n")
    return {name: d / f"{name}.pem" for name in [*files, "junk"]}


# -- settings --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [ServiceSettings, WorkerSettings, ClientSettings])
def test_every_process_kind_reads_the_variables(cls: type[TlsSettings], pem: dict[str, Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    assert (cls().tls_ca, cls().tls_cert, cls().tls_key, cls().tls_hostname) == (None, None, None, None)
    monkeypatch.setenv("INTERLOCK_TLS_CA", str(pem["ca"]))
    monkeypatch.setenv("INTERLOCK_TLS_CERT", str(pem["cert"]))
    monkeypatch.setenv("INTERLOCK_TLS_KEY", str(pem["key"]))
    monkeypatch.setenv("INTERLOCK_TLS_HOSTNAME", "localhost")
    settings = cls()
    assert (settings.tls_ca, settings.tls_cert, settings.tls_key, settings.tls_hostname) == (
        pem["ca"], pem["cert"], pem["key"], "localhost")


@pytest.mark.parametrize("variable", ["INTERLOCK_TLS_CA", "INTERLOCK_TLS_CERT", "INTERLOCK_TLS_KEY"])
def test_a_missing_file_is_named_by_its_variable(variable: str, monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    monkeypatch.setenv(variable, str(missing))
    expected = f"{variable}: '{missing}' is not a file (no such file or directory)"
    for cls in (ServiceSettings, WorkerSettings):
        with pytest.raises(SettingsError) as error:
            cls()
        assert str(error.value) == expected
    with pytest.raises(Unavailable) as unavailable:
        ClientSettings.load()
    assert str(unavailable.value) == expected


def test_a_directory_is_not_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERLOCK_TLS_CA", str(tmp_path))
    with pytest.raises(SettingsError, match=r"^INTERLOCK_TLS_CA: .* is not a file \(it is a directory\)$"):
        WorkerSettings()


def test_an_argument_is_named_as_the_argument(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"^ServiceSettings\(tls_cert=…\): .* is not a file"):
        ServiceSettings(tls_cert=tmp_path / "nope.pem")
    with pytest.raises(Unavailable, match=r"^tls_key: .* is not a file"):
        ClientSettings.load(tls_key=tmp_path / "nope.pem")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file: an unreadable file cannot be made")
def test_an_unreadable_file(pem: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tmp_path / "locked.pem"
    locked.write_bytes(pem["ca"].read_bytes())
    locked.chmod(0)
    monkeypatch.setenv("INTERLOCK_TLS_CA", str(locked))
    with pytest.raises(SettingsError, match=r"^INTERLOCK_TLS_CA: .* cannot be read \(Permission denied\)$"):
        WorkerSettings()


def test_an_empty_variable_means_not_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERLOCK_TLS_CA", "")
    monkeypatch.setenv("INTERLOCK_TLS_HOSTNAME", "  ")
    assert WorkerSettings().tls_ca is None
    assert ServiceSettings().tls_hostname is None


# -- the ssl context -------------------------------------------------------------------------------
def test_the_context_verifies_the_server(pem: dict[str, Path]) -> None:
    context = ssl_context(pem["ca"])
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert len(context.get_ca_certs()) == 1  # the CA file's certificate, and nothing else


def test_a_client_certificate_with_its_key_or_in_one_file(pem: dict[str, Path]) -> None:
    ssl_context(pem["ca"], pem["cert"], pem["key"])
    ssl_context(pem["ca"], pem["both"])  # the key in the certificate's file: no INTERLOCK_TLS_KEY needed


def test_bad_pem_files_are_named(pem: dict[str, Path]) -> None:
    with pytest.raises(TlsError, match=r"^INTERLOCK_TLS_CA: .*junk.pem is not a PEM file of CA certificates"):
        ssl_context(pem["junk"])
    with pytest.raises(TlsError, match=r"^INTERLOCK_TLS_CERT \(.*cert.pem\): not a PEM certificate with its "
                                       r"private key .*; set INTERLOCK_TLS_KEY"):
        ssl_context(pem["ca"], pem["cert"])  # the key is in a file of its own
    with pytest.raises(TlsError, match=r"^INTERLOCK_TLS_CERT \(.*\) and INTERLOCK_TLS_KEY \(.*other_key.pem\)"):
        ssl_context(pem["ca"], pem["cert"], pem["other_key"])  # another certificate's key
    with pytest.raises(TlsError, match="INTERLOCK_TLS_KEY is set but INTERLOCK_TLS_CERT is not"):
        ssl_context(pem["ca"], key=pem["key"])
    with pytest.raises(TlsError, match=r"^--tls-ca: "):  # the CLI names its flags
        ssl_context(pem["junk"], names={"ca": "--tls-ca", "cert": "--tls-cert", "key": "--tls-key",
                                        "hostname": "INTERLOCK_TLS_HOSTNAME"})


def test_tls_is_used_for_tls_urls_or_tls_files(pem: dict[str, Path]) -> None:
    assert wants_tls("nats://a:1,tls://b:2") and wants_tls(["TLS://a:1"]) and not wants_tls("nats://a:1,b:2")
    assert connect_options("nats://a:1", None) == {}
    assert connect_options("nats://a:1", WorkerSettings()) == {}
    system = connect_options("tls://a:1", WorkerSettings())  # no CA: the system trust store
    assert set(system) == {"tls"} and system["tls"].verify_mode == ssl.CERT_REQUIRED
    with_ca = connect_options("nats://a:1", WorkerSettings(tls_ca=pem["ca"], tls_hostname="localhost"))
    assert with_ca["tls_hostname"] == "localhost" and with_ca["tls"].get_ca_certs()


def test_failures_that_are_not_about_tls_are_left_alone() -> None:
    assert describe_failure(ConnectionRefusedError(111, "Connection refused"), "nats://a:1", None,
                            tls_used=False) is None
    assert describe_failure(TimeoutError(), "tls://a:1", None, tls_used=True) is None


# -- the embedded server -----------------------------------------------------------------------------
def test_the_embedded_server_gets_a_tls_block(pem: dict[str, Path], tmp_path: Path) -> None:
    server = EmbeddedNats(store_dir=tmp_path, tls_cert=pem["cert"], tls_key=pem["key"])
    command = server._command(tmp_path)
    config = json.loads(Path(command[command.index("-c") + 1]).read_text())
    assert config["tls"] == {"cert_file": str(pem["cert"]), "key_file": str(pem["key"])}
    mutual = EmbeddedNats(store_dir=tmp_path, tls_cert=pem["cert"], tls_key=pem["key"], tls_ca=pem["ca"])
    mutual._command(tmp_path)
    assert json.loads((tmp_path / "server.conf").read_text())["tls"] == {
        "cert_file": str(pem["cert"]), "key_file": str(pem["key"]), "ca_file": str(pem["ca"]), "verify": True}
    EmbeddedNats(store_dir=tmp_path)._command(tmp_path)
    assert "tls" not in json.loads((tmp_path / "server.conf").read_text())
    with pytest.raises(NatsServerError, match="both a server certificate"):
        EmbeddedNats(store_dir=tmp_path, tls_cert=pem["cert"])._command(tmp_path)


# -- the CLI -------------------------------------------------------------------------------------------
def test_the_cli_passes_tls_options_before_or_after_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []

    class Fake:
        url, url_source = "tls://127.0.0.1:4222", "--nats"

        async def runs(self, **_: Any) -> list[Any]:
            return []

        async def close(self) -> None:
            pass

    async def connect(url: str | None = None, **options: Any) -> Fake:
        seen.append({k: options.get(k) for k in ("tls_ca", "tls_cert", "tls_key")})
        return Fake()

    monkeypatch.setattr(_common, "Client", types.SimpleNamespace(connect=connect))
    flags = ["--tls-ca", "ca.pem", "--tls-cert", "c.pem", "--tls-key", "k.pem"]
    assert CliRunner().invoke(app, [*flags, "run", "list"]).exit_code == 0
    assert CliRunner().invoke(app, ["runs", *flags]).exit_code == 0
    expected = {"tls_ca": Path("ca.pem"), "tls_cert": Path("c.pem"), "tls_key": Path("k.pem")}
    assert seen == [expected, expected]
    assert CliRunner().invoke(app, ["run", "list"]).exit_code == 0
    assert seen[-1] == {"tls_ca": None, "tls_cert": None, "tls_key": None}  # unset: INTERLOCK_TLS_* decide


def test_process_commands_hand_the_tls_options_on_as_variables(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    for name in ("INTERLOCK_TLS_CA", "INTERLOCK_TLS_CERT", "INTERLOCK_TLS_KEY"):
        monkeypatch.setenv(name, "")  # restored after the test, whatever export_tls sets
    _common.Globals(tls_ca=Path("ca.pem"), tls_key=tmp_path / "k.pem").export_tls()
    assert os.environ["INTERLOCK_TLS_CA"] == str(tmp_path / "ca.pem")  # absolute: children may chdir
    assert os.environ["INTERLOCK_TLS_KEY"] == str(tmp_path / "k.pem")
    assert os.environ["INTERLOCK_TLS_CERT"] == ""
