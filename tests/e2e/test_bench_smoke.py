"""`python -m bench --quick` runs end to end and writes its results (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]


def test_quick_bench_runs_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "W1,W4", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=220,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert "5-step run latency p50" in proc.stdout

    files = sorted(p.name for p in out.glob("*.json"))
    assert "latest.json" in files and len(files) == 2, files
    stamped = next(name for name in files if name != "latest.json")
    data = json.loads((out / "latest.json").read_text())
    assert data == json.loads((out / stamped).read_text())

    for key in ("schema", "started_at", "command", "quick", "sizes", "machine", "setup", "targets", "workloads",
                "table", "errors", "duration_s"):
        assert key in data, key
    assert data["quick"] is True
    assert data["errors"] == {}
    for key in ("cpu_model", "cores", "ram_gb", "python", "nats_server", "platform"):
        assert key in data["machine"], key
    assert set(data["workloads"]) == {"W1", "W4"}

    w1 = data["workloads"]["W1"]
    for key in ("runs", "warmup", "failed_runs", "p50_ms", "p99_ms", "latency_ms", "overhead_p50_ms",
                "stages_ms", "floor", "ratio"):
        assert key in w1, key
    assert w1["runs"] == data["sizes"]["w1_runs"] and w1["failed_runs"] == 0
    assert {"p50_ms", "p99_ms", "hops_per_run"} <= set(w1["floor"])
    assert {"p50", "p99"} <= set(w1["ratio"])
    # the one-hop floor (issue #15) is measured in the same run, and W1 is a ratio to it too
    assert w1["floor_onehop"]["p50_ms"] > 0 and w1["ratio_onehop"]["p50"] > 0
    [p50_row] = [row for row in data["table"] if row["metric"] == "5-step run latency p50"]
    assert p50_row["floor_onehop"] == w1["floor_onehop"]["p50_ms"]

    w4 = data["workloads"]["W4"]
    assert {"events", "commits", "p50_ms", "floor_p50_ms"} <= set(w4["load"])
    assert {"events", "commits", "seconds", "floor_seconds", "broken_runs"} <= set(w4["rebuild"])
    assert w4["rebuild"]["broken_runs"] == 0
    assert w4["rebuild"]["events"] >= data["sizes"]["w4_rebuild_events"]

    assert {row["workload"] for row in data["table"]} == {"W1", "W4"}
    for row in data["table"]:
        assert {"metric", "value", "unit", "target", "floor", "ratio"} <= set(row)
