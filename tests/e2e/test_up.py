"""``interlock up`` as a user runs it: a subprocess that prints "ready" once every service consumes,
keeps all its state under --home, and stops every child (services, workers, nats-server) on
SIGTERM (``docker stop``, systemd) and SIGHUP (the terminal closed) as on Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from interlock.client import Client

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

HERE = Path(__file__).resolve().parent


def _children(pid: int) -> dict[int, str]:
    """Every descendant of ``pid``: pid -> command line (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        parent = todo.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                try:
                    found[child] = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                todo.append(child)
    return found


def _alive(pid: int, cmdline: str) -> bool:
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
        now = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return now == cmdline and stat.rsplit(")", 1)[1].split()[0] != "Z"


def _start_up(cwd: Path, home: str) -> tuple[subprocess.Popen[str], list[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTERLOCK_")}
    proc = subprocess.Popen([sys.executable, "-m", "interlock.cli", "up", "--home", home,
                             "--worker", f"{HERE / 'agents.py'}:worker"],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip())
        if line.startswith("ready:") or proc.poll() is not None:
            break
    assert lines and lines[-1].startswith("ready:"), lines
    return proc, lines


def _clean_up(proc: subprocess.Popen[str], children: dict[int, str]) -> None:
    """After a failed assertion: stop the stack as a user would, and kill whatever is left of it
    (a SIGKILL of `up` alone would leave its children running)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
    for pid, cmdline in children.items():
        if _alive(pid, cmdline):
            os.kill(pid, signal.SIGKILL)


def _pulling_at_ready(home: Path) -> set[str]:
    """Which kinds of process hold a live pull request on a durable consumer, asked right after
    "ready" (through the home's URL file and admin credential, as the CLI finds them)."""
    async def ask() -> set[str]:
        async with await Client.connect((home / "nats.url").read_text(),
                                        creds=home / "identity" / "creds" / "admin.creds") as client:
            kinds = set()
            for stream in await client.js.streams_info():
                for info in await client.js.consumers_info(stream.config.name or ""):
                    if info.num_waiting and info.config.durable_name:
                        kinds.add(info.config.durable_name.split("_", 1)[0])
            return kinds

    return asyncio.run(ask())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_stops_every_child_and_state_stays_under_home(tmp_path: Path, sig: signal.Signals) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc, _ = _start_up(cwd, "state")
    children = _children(proc.pid)
    try:
        kinds = " ".join(children.values())
        assert "nats-server" in kinds and kinds.count("interlock.cli serve") == 5 and "worker" in kinds, children
        home = cwd / "state"
        # everything under --home: the server's store, identity, logs, the auditor's projection, the URL file
        assert sorted(p.name for p in cwd.iterdir()) == ["state"]
        for name in ("nats", "identity", "logs", "auditor.sqlite3", "nats.url"):
            assert (home / name).exists(), (name, sorted(p.name for p in home.iterdir()))
        assert (home / "nats.url").read_text().startswith("nats://")
        assert _pulling_at_ready(home) == {"planner", "policy", "approval", "dispatcher", "auditor", "worker"}
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        _clean_up(proc, children)
    assert proc.returncode == 0, out
    assert "stopped" in out.splitlines()
    deadline = time.monotonic() + 10
    survivors = {pid: cmd for pid, cmd in children.items() if _alive(pid, cmd)}
    while survivors and time.monotonic() < deadline:
        time.sleep(0.1)
        survivors = {pid: cmd for pid, cmd in survivors.items() if _alive(pid, cmd)}
    assert survivors == {}, f"left running after {sig.name}: {survivors}"
    assert sorted(p.name for p in cwd.iterdir()) == ["state"]  # nothing written outside --home, even at stop
    assert not (cwd / "state" / "nats.url").exists()  # the stack that wrote it removed it
