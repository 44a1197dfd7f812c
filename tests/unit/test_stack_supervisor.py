"""``interlock up``'s supervisor: a child that exits comes back after a backoff that doubles, and
one that keeps exiting is given up on after the limit, with a message that says so."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from interlock.devstack.stack import Proc, RestartPolicy, Stack


def test_the_backoff_doubles_up_to_the_cap() -> None:
    policy = RestartPolicy(initial=0.5, cap=3.0)
    assert [policy.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    # no NATS: the supervisor only starts, watches and restarts processes
    stack = Stack(home=tmp_path / "home", nats_url="nats://127.0.0.1:1",
                  restart_policy=RestartPolicy(initial=0.05, cap=0.2, limit=3, stable=60))
    yield stack
    stack.stop(timeout=2)


def _add(stack: Stack, name: str, code: str) -> Proc:
    stack.creds[name] = stack.home / f"{name}.creds"
    return stack._spawn(name, [sys.executable, "-c", code])


def _supervise_until(stack: Stack, done: object, timeout: float = 20.0) -> list[str]:
    said: list[str] = []
    deadline = time.monotonic() + timeout
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not done after {timeout} s; said: {said}"
        said += stack.supervise()
        time.sleep(0.02)
    return said


def test_a_killed_child_comes_back(stack: Stack) -> None:
    proc = _add(stack, "sleeper", "import time; time.sleep(120)")
    first = proc.popen
    assert first is not None
    stack.kill("sleeper")
    said = _supervise_until(stack, lambda: proc.alive() and proc.popen is not first)
    assert said == ["sleeper exited (code -9); restarting it in 0.05 s (restart 1 of at most 3 in a row)"]
    assert not proc.given_up


def test_a_child_that_always_crashes_is_given_up_on_after_the_limit(stack: Stack) -> None:
    proc = _add(stack, "crasher", "import sys; sys.exit(3)")
    started = time.monotonic()
    said = _supervise_until(stack, lambda: proc.given_up)
    assert said[:3] == [f"crasher exited (code 3); restarting it in {d:g} s (restart {n} of at most 3 in a row)"
                        for n, d in ((1, 0.05), (2, 0.1), (3, 0.2))]
    assert said[3] == (f"crasher exited (code 3) 4 times in a row; giving up on it after 3 restarts "
                       f"(see {proc.log_path})")
    assert len(said) == 4
    assert time.monotonic() - started >= 0.35  # the backoff was waited: 0.05 + 0.1 + 0.2
    assert stack.supervise() == [] and not proc.alive()  # given up: never restarted again


def test_a_child_that_stayed_up_starts_a_new_row(stack: Stack) -> None:
    proc = _add(stack, "flaky", "import sys; sys.exit(1)")
    proc.crashes = 3  # three exits in a row before …
    proc.popen.wait()  # type: ignore[union-attr]
    said = stack.supervise(now=proc.started_at + 61)  # … this run, which lasted longer than `stable`
    assert said == ["flaky exited (code 1); restarting it in 0.05 s (restart 1 of at most 3 in a row)"]
