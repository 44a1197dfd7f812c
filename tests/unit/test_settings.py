"""Process settings: read from the environment when created, never at import; errors name the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from interlock.runtime import service as service_module
from interlock.runtime.payloads import DEFAULT_INLINE_LIMIT
from interlock.runtime.settings import ServiceSettings, SettingsError, WorkerSettings

VARIABLES = ["INTERLOCK_NATS_URL", "INTERLOCK_REPLICAS", "INTERLOCK_INLINE_LIMIT", "INTERLOCK_SWEEP_S",
             "INTERLOCK_PROVISION", "INTERLOCK_INSTANCE", "INTERLOCK_CONCURRENCY", "INTERLOCK_WORKER_CONCURRENCY",
             "INTERLOCK_TRACING", "INTERLOCK_CREDS"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(str(tmp_path))  # no .interlock/nats.url from a checkout


def test_defaults() -> None:
    settings = ServiceSettings()
    assert settings.nats_url == "nats://127.0.0.1:4222"
    # services do not provision unless told to: a service credential may not change streams
    assert (settings.provision, settings.replicas, settings.inline_limit) == (False, 1, DEFAULT_INLINE_LIMIT)
    assert (settings.creds, WorkerSettings().creds) == (None, None)
    assert (settings.concurrency, settings.sweep_interval) == (64, 15.0)
    assert settings.instance.endswith(f"-{os.getpid()}")
    worker = WorkerSettings()
    assert (worker.nats_url, worker.concurrency, worker.inline_limit) == ("nats://127.0.0.1:4222", 8,
                                                                          DEFAULT_INLINE_LIMIT)


def test_values_come_from_the_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERLOCK_NATS_URL", "nats://a:1,nats://b:2")
    monkeypatch.setenv("INTERLOCK_REPLICAS", "3")
    monkeypatch.setenv("INTERLOCK_INLINE_LIMIT", "1024")
    monkeypatch.setenv("INTERLOCK_SWEEP_S", "0.5")
    monkeypatch.setenv("INTERLOCK_PROVISION", "true")
    monkeypatch.setenv("INTERLOCK_CREDS", "/run/secrets/planner.creds")
    monkeypatch.setenv("INTERLOCK_WORKER_CONCURRENCY", "3")
    settings = ServiceSettings()
    assert settings.nats_url == "nats://a:1,nats://b:2"
    assert (settings.replicas, settings.inline_limit, settings.sweep_interval, settings.provision) == (3, 1024, 0.5,
                                                                                                       True)
    assert (str(settings.creds), str(WorkerSettings().creds)) == ("/run/secrets/planner.creds",) * 2
    assert settings.concurrency == 64  # INTERLOCK_WORKER_CONCURRENCY is the worker's
    assert (WorkerSettings().concurrency, WorkerSettings().inline_limit) == (3, 1024)


def test_read_when_created_not_when_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    first = ServiceSettings()
    monkeypatch.setenv("INTERLOCK_REPLICAS", "5")
    assert (first.replicas, ServiceSettings().replicas) == (1, 5)


def test_arguments_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERLOCK_SWEEP_S", "not even a number")  # not used: the argument wins
    monkeypatch.setenv("INTERLOCK_NATS_URL", "nats://env:1")
    settings = ServiceSettings(nats_url="nats://arg:2", provision=False, sweep_interval=0, inline_limit=1024)
    assert (settings.nats_url, settings.provision, settings.sweep_interval, settings.inline_limit) == (
        "nats://arg:2", False, 0.0, 1024)


def test_an_empty_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERLOCK_NATS_URL", "")
    monkeypatch.setenv("INTERLOCK_REPLICAS", "")
    assert (ServiceSettings().nats_url, ServiceSettings().replicas) == ("nats://127.0.0.1:4222", 1)


def test_the_url_written_by_interlock_up_is_the_fallback(tmp_path: object) -> None:
    os.makedirs(".interlock")
    with open(os.path.join(".interlock", "nats.url"), "w") as f:
        f.write("nats://127.0.0.1:4999\n")
    assert ServiceSettings().nats_url == WorkerSettings().nats_url == "nats://127.0.0.1:4999"


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("INTERLOCK_REPLICAS", "three", "INTERLOCK_REPLICAS: 'three' is not a whole number"),
    ("INTERLOCK_REPLICAS", "1.5", "INTERLOCK_REPLICAS: '1.5' is not a whole number"),
    ("INTERLOCK_REPLICAS", "0", "INTERLOCK_REPLICAS: '0' must be at least 1"),
    ("INTERLOCK_REPLICAS", "7", "INTERLOCK_REPLICAS: '7' must be at most 5"),
    ("INTERLOCK_INLINE_LIMIT", "256k", "INTERLOCK_INLINE_LIMIT: '256k' is not a whole number"),
    ("INTERLOCK_SWEEP_S", "soon", "INTERLOCK_SWEEP_S: 'soon' is not a number"),
    ("INTERLOCK_SWEEP_S", "-1", "INTERLOCK_SWEEP_S: '-1' must be at least 0"),
    ("INTERLOCK_PROVISION", "maybe", "INTERLOCK_PROVISION: 'maybe' is not true or false"),
    ("INTERLOCK_CONCURRENCY", "0", "INTERLOCK_CONCURRENCY: '0' must be at least 1"),
])
def test_a_bad_service_value_names_its_variable(monkeypatch: pytest.MonkeyPatch, variable: str, value: str,
                                                message: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as info:
        ServiceSettings()
    assert str(info.value).startswith(message)
    assert "validation error" not in str(info.value)  # pydantic's own wording stays out


def test_a_bad_worker_value_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERLOCK_WORKER_CONCURRENCY", "lots")
    with pytest.raises(SettingsError, match=r"^INTERLOCK_WORKER_CONCURRENCY: 'lots' is not a whole number$"):
        WorkerSettings()


def test_every_bad_value_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERLOCK_REPLICAS", "three")
    monkeypatch.setenv("INTERLOCK_SWEEP_S", "soon")
    with pytest.raises(SettingsError) as info:
        ServiceSettings()
    assert str(info.value) == ("INTERLOCK_REPLICAS: 'three' is not a whole number; "
                               "INTERLOCK_SWEEP_S: 'soon' is not a number")


def test_a_bad_argument_is_named_as_the_argument() -> None:
    with pytest.raises(SettingsError, match=r"^ServiceSettings\(replicas=…\): 'x' is not a whole number$"):
        ServiceSettings(replicas="x")


def test_an_unknown_argument_is_refused() -> None:
    with pytest.raises(SettingsError, match=r"^ServiceSettings\(nats_ulr=…\): 'nats://x:1' is not a setting$"):
        ServiceSettings(nats_ulr="nats://x:1")  # type: ignore[call-arg]


def test_other_interlock_variables_are_not_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERLOCK_TENANT", "acme")  # the CLI's, say
    monkeypatch.setenv("INTERLOCK_AUDITOR_DB", "/tmp/x.sqlite3")
    assert (ServiceSettings().replicas, WorkerSettings().concurrency) == (1, 8)


def test_importing_with_a_bad_environment_does_not_fail() -> None:
    env = {**os.environ, "INTERLOCK_REPLICAS": "three", "INTERLOCK_SWEEP_S": "soon"}
    code = ("import interlock.runtime.service, interlock.worker\n"
            "from interlock.runtime.service import ServiceSettings\n"
            "from interlock.runtime.settings import SettingsError\n"
            "try:\n    ServiceSettings()\nexcept SettingsError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("INTERLOCK_REPLICAS: 'three' is not a whole number")


def test_service_settings_are_importable_from_the_service_module() -> None:
    assert service_module.ServiceSettings is ServiceSettings


def test_worker_tracing_export_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert WorkerSettings().tracing == "off"
    monkeypatch.setenv("INTERLOCK_TRACING", "Console")
    assert WorkerSettings().tracing == "console"
    monkeypatch.setenv("INTERLOCK_TRACING", "otlp")
    with pytest.raises(SettingsError, match=r"^INTERLOCK_TRACING: 'otlp' is not one of 'off' or 'console'$"):
        WorkerSettings()


def test_a_worker_serves_the_tenant_in_its_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert WorkerSettings().tenant == "default"
    monkeypatch.setenv("INTERLOCK_TENANT", "acme")
    assert WorkerSettings().tenant == "acme"


def test_the_clients_principal_argument_then_env_then_creds_then_login(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    from interlock.client._errors import Unavailable
    from interlock.client._settings import ClientSettings
    from interlock.identity import IdentityHome

    creds = IdentityHome(tmp_path / "identity").issue("approver", "acme", name="carol")
    monkeypatch.delenv("INTERLOCK_PRINCIPAL", raising=False)
    monkeypatch.delenv("INTERLOCK_CREDS", raising=False)
    for name in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("USER", "Ada Lovelace")
    assert ClientSettings.load().resolve_principal() == "Ada-Lovelace"  # the login name, made one token
    assert ClientSettings.load(creds=creds).resolve_principal() == "carol"  # the credential's user name
    monkeypatch.setenv("INTERLOCK_PRINCIPAL", "dave")
    assert ClientSettings.load(creds=creds).resolve_principal() == "dave"
    assert ClientSettings.load(creds=creds, principal="erin").resolve_principal() == "erin"
    with pytest.raises(Unavailable, match=r"^principal: principal 'a.b' is not a valid subject token"):
        ClientSettings.load(principal="a.b")
    not_creds = tmp_path / "not.creds"
    not_creds.write_text("hello")
    monkeypatch.delenv("INTERLOCK_PRINCIPAL")
    with pytest.raises(Unavailable, match=r"not a NATS creds file"):
        ClientSettings.load(creds=not_creds).resolve_principal()
