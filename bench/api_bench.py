"""``python -m bench.api_bench``: the HTTP API's figures (see bench/README.md, "The HTTP API").

- ``POST /api/v1/workflows/{id}/runs`` → 201: latency of one request at a time, on an idle stack
  (target p50 ≤ 5 ms);
- ``GET /api/v1/workflow-runs?limit=50`` with 10,000 runs in the auditor's projection (seeded
  directly into its SQLite file): the first page and a page deep in the list through the cursor
  (target ≤ 300 ms).

The api service, the auditor and the planner run as their own processes (``Stack``), against an
embedded nats-server, with authentication on; the bench is an HTTP client (httpx, keep-alive).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from bench.common import machine, progress, summary
from bench.stackrun import _cwd
from interlock.client import Client, NotFound
from interlock.devstack.stack import Stack

WORKFLOW = "bench-api"
# one notify step: a started run costs the planner little, so the stack stays close to idle
WORKFLOW_YAML = f"""
id: {WORKFLOW}
version: 1
steps:
  tell: {{type: notify, channel: bench, message: "run {{{{ input.n }}}}"}}
"""
SEEDED_RUNS = 10_000
TARGETS = {"post_runs_p50_ms": 5.0, "runs_list_ms": 300.0}


def seed_projection(db: Path, tenant: str, count: int) -> None:
    """``count`` finished runs in the projection's ``runs`` table (what the auditor would hold)."""
    now = datetime.now(UTC)
    rows = []
    for i in range(count):
        started = (now - timedelta(seconds=count - i)).isoformat()
        rows.append((str(uuid.uuid4()), tenant, f"seeded-{i % 7}", "1", "h" * 12, ("succeeded", "failed")[i % 5 == 0],
                     f"seed-{i}", "bench", None, started, started, None, 9, "0" * 64, 1, "[]", 0, 0))
    with sqlite3.connect(db, timeout=30) as conn:
        conn.executemany("INSERT OR IGNORE INTO runs (run_id, tenant, workflow_id, workflow_version, definition_hash, "
                         "status, idempotency_key, requested_by, rerun_of, started_at, ended_at, reason, last_seq, "
                         "head_hash, chain_ok, problems, problem_count, last_stream_seq) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)


def timed(http: httpx.Client, method: str, url: str, expect: int, **kwargs: Any) -> tuple[float, httpx.Response]:
    start = time.perf_counter()
    response = http.request(method, url, **kwargs)
    elapsed = (time.perf_counter() - start) * 1000
    if response.status_code != expect:
        raise RuntimeError(f"{method} {url}: {response.status_code} {response.text[:300]}")
    return elapsed, response


def measure(api_url: str, key: str, *, posts: int, warmup: int, pages: int) -> dict[str, Any]:
    with httpx.Client(base_url=api_url, headers={"X-API-Key": key, "X-Tenant-ID": "default"}, timeout=30) as http:
        for i in range(warmup):
            timed(http, "POST", f"/api/v1/workflows/{WORKFLOW}/runs", 201, json={"input": {"n": i}},
                  headers={"Idempotency-Key": f"warm-{i}-{uuid.uuid4().hex}"})
        # the floor: an authenticated request that asks NATS nothing (the key's record is cached)
        floor_ms = [timed(http, "GET", "/console/session", 200)[0] for _ in range(posts)]
        post_ms = []
        for i in range(posts):
            elapsed, _ = timed(http, "POST", f"/api/v1/workflows/{WORKFLOW}/runs", 201, json={"input": {"n": i}},
                               headers={"Idempotency-Key": f"b-{i}-{uuid.uuid4().hex}"})
            post_ms.append(elapsed)
            time.sleep(0.01)  # one at a time on an idle stack: let the run's own work pass
        repeat_ms = [timed(http, "POST", f"/api/v1/workflows/{WORKFLOW}/runs", 200, json={"input": {"n": 0}},
                           headers={"Idempotency-Key": "repeat"})[0] for _ in range(max(5, posts // 10))]
        first_ms, deep_ms = [], []
        deep_cursor = None
        for _ in range(pages):
            elapsed, response = timed(http, "GET", "/api/v1/workflow-runs?limit=50", 200)
            first_ms.append(elapsed)
            deep_cursor = deep_cursor or response.json()["next_cursor"]
        # a cursor 5,000 runs down the list
        cursor = deep_cursor
        for _ in range(99):
            _, response = timed(http, "GET", "/api/v1/workflow-runs", 200, params={"limit": 50, "cursor": cursor})
            cursor = response.json()["next_cursor"]
        for _ in range(pages):
            elapsed, response = timed(http, "GET", "/api/v1/workflow-runs", 200, params={"limit": 50,
                                                                                       "cursor": cursor})
            deep_ms.append(elapsed)
            assert len(response.json()["items"]) == 50
        filtered_ms = [timed(http, "GET", "/api/v1/workflow-runs", 200,
                             params={"limit": 50, "status": "failed", "workflow": "seeded-3"})[0] for _ in range(pages)]
    return {"http_auth_floor_ms": summary(floor_ms), "post_runs_201_ms": summary(post_ms),
            "post_runs_repeat_200_ms": summary(repeat_ms),
            "runs_list_first_page_ms": summary(first_ms), "runs_list_page_at_5000_ms": summary(deep_ms),
            "runs_list_filtered_ms": summary(filtered_ms)}


async def run(quick: bool) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="interlock-api-bench-"))
    stack = Stack(home=home, port=0, services=("planner", "auditor"), api_port=0,
                  env={"INTERLOCK_AUDITOR_DB": str(home / "auditor.sqlite3")})
    try:
        with _cwd(home):
            stack.start_nats()
            await stack.provision()
            stack.start()
            await stack.wait_api(timeout=120)
            key, _ = await stack.first_api_key()
            assert key is not None
        async with await Client.connect(stack.url, creds=stack.admin_creds, name="api-bench") as client:
            await client.apply_workflow(WORKFLOW_YAML)
            # the auditor creates its tables at start; wait until it has projected a run
            run_id, _ = await client.submit_run(WORKFLOW, {"n": 0}, key="repeat")
            deadline = time.monotonic() + 60
            while True:
                try:
                    await client.status(run_id)
                    break
                except NotFound:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
        progress(f"seeding {SEEDED_RUNS} runs into the projection")
        seed_projection(home / "auditor.sqlite3", "default", SEEDED_RUNS)
        assert stack.api_url
        progress("measuring")
        figures = await asyncio.to_thread(measure, stack.api_url, key, posts=30 if quick else 200,
                                          warmup=5 if quick else 20, pages=5 if quick else 30)
        return {"figures": figures, "seeded_runs": SEEDED_RUNS, "targets": TARGETS, "machine": machine()}
    finally:
        with _cwd(home):
            stack.stop()
        shutil.rmtree(home, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.api_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer requests")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)
    result = asyncio.run(run(args.quick))
    f = result["figures"]
    print(f"POST …/runs -> 201      p50 {f['post_runs_201_ms']['p50']} ms  p99 {f['post_runs_201_ms']['p99']} ms  "
          f"(target p50 <= {TARGETS['post_runs_p50_ms']} ms)")
    print(f"floor (GET /console/session, no NATS) p50 {f['http_auth_floor_ms']['p50']} ms")
    for name in ("runs_list_first_page_ms", "runs_list_page_at_5000_ms", "runs_list_filtered_ms"):
        print(f"GET runs ?limit=50 {name.removeprefix('runs_list_').removesuffix('_ms'):<16} "
              f"p50 {f[name]['p50']} ms  p99 {f[name]['p99']} ms  ({SEEDED_RUNS} runs; target <= "
              f"{TARGETS['runs_list_ms']} ms)")
    text = json.dumps(result, indent=2, default=str)
    if args.out:
        args.out.write_text(text)
    print(text if os.environ.get("BENCH_JSON") else "", end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
