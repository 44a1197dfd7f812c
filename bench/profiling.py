"""``--profile``: sample every Python process of the stack with py-spy while W2 runs.

py-spy (``pip install py-spy``; a dev extra) attaches to running processes without changing them.
Each process's collapsed stacks are saved as ``<out>/profile-<stamp>/<process>.txt`` (open them
in speedscope or any flame-graph tool) and summarised in the results: the share of samples per
function, on its own (self) and with what it calls (inclusive), restricted to the interesting
frames.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Profiler:
    def __init__(self, pids: dict[str, int], out_dir: Path, rate: int = 100) -> None:
        self.pids = pids
        self.out_dir = out_dir
        self.rate = rate
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        exe = py_spy()
        if exe is None:
            raise RuntimeError("--profile needs py-spy: pip install py-spy")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, pid in self.pids.items():
            if name == "nats-server":
                continue
            self.procs[name] = subprocess.Popen(
                [exe, "record", "--pid", str(pid), "--rate", str(self.rate), "--format", "raw", "--nonblocking",
                 "--output", str(self.out_dir / f"{name}.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)

    def stop(self) -> dict[str, Any]:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return {name: summarise(self.out_dir / f"{name}.txt") for name in self.procs}


def _label(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "/shared/", "/services/", "/contracts/", "/lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m.group('func')} ({path})"


_STDLIB_RUNNERS = ("(asyncio/", "(selectors.py)", "(threading.py)", "(runpy.py)", "(cli.py)", "(<frozen")


def _boring(label: str) -> bool:
    return any(marker in label for marker in _STDLIB_RUNNERS) or label.startswith("<module>")


def summarise(path: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares of the hottest functions in one collapsed-stack file."""
    if not path.exists():
        return {"error": "no profile written"}
    total = 0
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_label(f) for f in stack.split(";")]
        frames = [f for f in frames if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count

    def share(counter: Counter[str]) -> list[list[Any]]:
        return [[name, round(100 * n / total, 1)] for name, n in counter.most_common(top)] if total else []

    # inclusive lists are dominated by the event loop's and the entry point's frames: keep the rest
    informative = Counter({k: v for k, v in inclusive.items() if not _boring(k)})
    return {"samples": total, "self_pct": share(own), "inclusive_pct": share(informative)}
