"""Shared helpers: the machine's description, percentiles, progress lines, a stream reader."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

TERMINAL_EVENTS = frozenset({"RunSucceeded", "RunFailed", "RunDenied", "RunCancelled", "RunTimedOut"})
TERMINAL_MARKERS = tuple(f'"{name}"'.encode() for name in TERMINAL_EVENTS)

# the 5-step workflow of tests/integration/test_flow.py: A -> (B, C) -> D -> E
FIVE_STEP_DEPS: dict[str, list[str]] = {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"], "e": ["d"]}


def progress(text: str) -> None:
    """A progress line (stderr, so the table on stdout stays clean)."""
    print(f"  … {text}", file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between closest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (pos - low))


def summary(values: Sequence[float], digits: int = 3) -> dict[str, Any]:
    """count, p50, p90, p99, min, max, mean of a sample (None when empty)."""

    def r(v: float | None) -> float | None:
        return None if v is None else round(v, digits)

    return {
        "count": len(values),
        "p50": r(percentile(values, 50)),
        "p90": r(percentile(values, 90)),
        "p99": r(percentile(values, 99)),
        "min": r(min(values)) if values else None,
        "max": r(max(values)) if values else None,
        "mean": r(sum(values) / len(values)) if values else None,
    }


def parse_at(value: str) -> float:
    """An event's ``at`` (ISO 8601 with offset) as a POSIX timestamp."""
    return datetime.fromisoformat(value).timestamp()


def ratio(value: float | None, floor: float | None) -> float | None:
    if value is None or floor is None or floor <= 0:
        return None
    return round(value / floor, 2)


# -- the machine -----------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def _nats_server_version() -> str:
    try:
        from interlock.core.natsserver import nats_server_binary

        out = subprocess.run([nats_server_binary(), "--version"], capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip()
    except Exception as e:  # the suite still runs; the report says why the version is missing
        return f"unknown ({e})"


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gb": _ram_gb(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "nats_server": _nats_server_version(),
        "nats_py": _package_version("nats-py"),
        "interlock": _package_version("interlock"),
        "platform": platform.platform(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# -- reading a run's log without the event store's replay ---------------------------------------
async def direct_get_raw(nc: Any, stream: str, subject: str, start: int = 1, batch: int = 10_000,
                         timeout: float = 10.0) -> list[Any]:
    """Every message on ``subject`` from stream seq ``start``: raw batched direct gets, no decoding.

    This is the floor of a run load: the same requests :meth:`EventStore.read_commits` makes.
    """
    msgs: list[Any] = []
    while True:
        inbox = nc.new_inbox()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def collect(msg: Any, queue: asyncio.Queue[Any] = queue) -> None:
            queue.put_nowait(msg)

        sub = await nc.subscribe(inbox, cb=collect)
        pending = 0
        last = 0
        got = 0
        try:
            request = json.dumps({"seq": start, "next_by_subj": subject, "batch": batch}).encode()
            await nc.publish(f"$JS.API.DIRECT.GET.{stream}", request, reply=inbox)
            while True:
                msg = await asyncio.wait_for(queue.get(), timeout=timeout)
                status = (msg.headers or {}).get("Status")
                if status == "404":
                    return msgs
                if status == "204":
                    pending = int(msg.headers.get("Nats-Num-Pending", "0"))
                    last = int(msg.headers.get("Nats-Last-Sequence", "0"))
                    break
                if status:
                    raise RuntimeError(f"direct get failed: {status} {msg.headers.get('Description', '')}")
                msgs.append(msg)
                got += 1
        finally:
            await sub.unsubscribe()
        if pending == 0 or got == 0:
            return msgs
        start = max(last, int(msgs[-1].headers["Nats-Sequence"])) + 1


class Clock:
    """A perf_counter stopwatch."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0
