"""Shared helpers: the machine's description, percentiles, progress lines."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from interlock.client import TERMINAL_EVENTS

# a commit's bytes name its terminal event: the bench decodes only the commits that hold one
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


class Clock:
    """A perf_counter stopwatch."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0
