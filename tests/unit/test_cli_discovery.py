"""Server discovery from a directory without ``.interlock/``: the CLI says which server it tries and
where the URL came from, and fails within 2 s naming that URL when no server answers."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from interlock.cli import app
from interlock.core.natsserver import free_port


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with no .interlock/, and no server named in the environment."""
    monkeypatch.chdir(tmp_path)
    for name in ("INTERLOCK_NATS_URL", "INTERLOCK_HOME", "INTERLOCK_CREDS", "INTERLOCK_CONNECT_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP port that accepts connections and never says anything (a hung or foreign server):
    the connect attempt waits for an INFO that never comes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"nats://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for sock in held:
        sock.close()
    listener.close()


def _timed(args: list[str], env: dict[str, str] | None = None) -> tuple[float, str, int]:
    started = time.monotonic()
    result = CliRunner().invoke(app, args, env=env)
    return time.monotonic() - started, result.stderr, result.exit_code


def test_a_closed_port_fails_within_two_seconds_naming_the_url_and_the_flag(elsewhere: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    took, err, code = _timed(["run", "list", "--nats", url])
    assert code == 1
    assert f"cannot reach NATS at {url} (from --nats)" in err, err
    assert took < 2.0, f"took {took:.2f} s"


def test_a_server_that_never_answers_fails_within_two_seconds(elsewhere: Path, silent_server: str) -> None:
    took, err, code = _timed(["run", "list"], env={"INTERLOCK_NATS_URL": silent_server})
    assert code == 1
    assert f"no NATS server answered at {silent_server} within 1.2 s (URL from INTERLOCK_NATS_URL)" in err, err
    assert took < 2.0, f"took {took:.2f} s"


def test_the_default_url_is_named_as_the_default_and_why(elsewhere: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    closed = f"nats://127.0.0.1:{free_port()}"
    monkeypatch.setattr("interlock.client._settings.DEFAULT_URL", closed)  # never someone's real :4222
    took, err, code = _timed(["run", "list"])
    assert code == 1
    assert f"cannot reach NATS at {closed} (from default: no --nats, INTERLOCK_NATS_URL or .interlock/nats.url)" \
        in err, err
    assert took < 2.0, f"took {took:.2f} s"


def test_the_home_url_file_is_named(elsewhere: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = elsewhere / "somewhere"
    home.mkdir()
    url = f"nats://127.0.0.1:{free_port()}"
    (home / "nats.url").write_text(url)
    monkeypatch.setenv("INTERLOCK_HOME", str(home))
    _, err, code = _timed(["run", "list"])
    assert code == 1 and f"cannot reach NATS at {url} (from {home / 'nats.url'})" in err, err
